"""The whole DAG on the ci preset on the shared local Ray instance, through the CLI entry point."""

from pipeline import cli, config as C, dag, store


def test_ci_dag_runs_end_to_end_then_is_fully_cached(ray_session, tmp_path, capsys):
    storage = str(tmp_path / "artifacts")
    assert cli.main(["run", "--config", "ci", "--storage", storage]) == 0
    printed = capsys.readouterr().out
    cfg = C.load_config("ci", storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    st = store.Store(storage)
    for stage, key in keys.items():
        assert st.artifact(stage, key).state() == "done", stage
    report = st.artifact("evaluate", keys["evaluate"])
    outputs = report.manifest()["outputs"]
    assert outputs["metric"] == "FD (random-weight Inception)"
    assert [(m["sigma_rel"], m["nfe"]) for m in outputs["models"]] == [(0.05, 15), (0.1, 15), (None, 1)]
    assert outputs["models"][-1]["name"] == "student (1 step)"
    md = store.read_bytes(report.path("report.md")).decode()
    assert "RANDOM weights" in md and "Best teacher EMA length" in md
    best = min(m["fd"] for m in outputs["models"][:-1])
    assert outputs["student_fd_over_best_teacher"] == round(outputs["models"][-1]["fd"] / best, 4)
    assert f"**{outputs['student_fd_over_best_teacher']:.2f}x** the best teacher's (1 vs 15" in md
    for m in outputs["models"]:
        assert report.exists(m["grid"]) and m["fd"] > 0
    assert f"report: {report.path('report.md')}" in printed  # the closing lines: where the report is
    assert f"{outputs['student_fd_over_best_teacher']:.2f}x the best teacher variant's" in printed
    assert cli.main(["run", "--config", "ci", "--storage", storage]) == 0
    plan = capsys.readouterr().out.split("action\n", 1)[1].split("report:", 1)[0].splitlines()
    assert len(plan) == len(keys) and all(line.endswith(" cached") for line in plan)  # every stage cached

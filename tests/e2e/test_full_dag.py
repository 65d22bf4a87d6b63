"""The whole DAG on the ci preset on the shared local Ray instance, through the CLI entry point."""

import numpy as np

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
    assert outputs["metric"] == "fd_probe"  # the demo's and ci's metrics: no downloads, the probe's features
    assert [(m["model"], m["sigma_rel"], m["nfe"]) for m in outputs["models"]] == [
        ("teacher", 0.05, 15), ("teacher", 0.1, 15), ("student", None, 1), ("real", None, 0)]
    md = store.read_bytes(report.path("report.md")).decode()
    assert "Best teacher EMA length by FD probe" in md and "inception: not computed" in md
    best = min(m["fd_probe"] for m in outputs["models"][:2])
    assert outputs["student_over_best_teacher"] == round(outputs["models"][2]["fd_probe"] / best, 4)
    assert f"**{outputs['student_over_best_teacher']:.2f}x** the best teacher's (1 vs 15" in md
    for m in outputs["models"]:
        assert report.exists(m["grid"]) and m["fd_inception"] is None and m["fd_dinov2"] is None
        assert all(np.isfinite(m[k]) for k in ("fd_probe", "class_accuracy", "precision", "recall")), m
    assert f"report: {report.path('report.md')}" in printed  # the closing lines: where the report is
    assert f"{outputs['student_over_best_teacher']:.2f}x the best teacher variant's" in printed
    assert cli.main(["run", "--config", "ci", "--storage", storage]) == 0
    plan = capsys.readouterr().out.split("action\n", 1)[1].split("report:", 1)[0].splitlines()
    assert len(plan) == len(keys) and all(line.endswith(" cached") for line in plan)  # every stage cached

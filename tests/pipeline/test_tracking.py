"""The tracking adapter without a server: its config never reaches a cache key, rows flatten to scalars,
TensorBoard event files land in the artifact, and a tracker that stops answering mid-run costs one
warning line, not the run."""

import logging
import pickle
import socket

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import config as C
from pipeline import dag, store, tracking
from pipeline.executor import InlineExecutor
from pipeline.stage import DRIVER, Stage
from pipeline.training import MetricsLog
from test_dag import FakeConfig

ROW = {"nimg": 8, "loss": 0.5, "loss_by_sigma": {"0-0.1": 0.25, "10.0-inf": 2.0}, "lr": 0.01, "diverged": "no"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh(monkeypatch):
    """No backend dropped by an earlier test; MLflow's client does not retry."""
    monkeypatch.setattr(tracking, "_dropped", set())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_tracking_settings_never_change_a_cache_key():
    base = C.load_config("ci")
    tracked = C.load_config("ci", ["tracking.backends=[tensorboard,mlflow,wandb]", "tracking.experiment=other",
                                   "tracking.mlflow_uri=http://127.0.0.1:1", "tracking.wandb_mode=offline"])
    assert dag.cache_keys(dag.graph(), tracked) == dag.cache_keys(dag.graph(), base)


@pytest.mark.parametrize("override, message", [
    ("tracking.backends=[tensorboard,neptune]", "tracking.backends = 'neptune': expected one of tensorboard, mlflow, wandb"),
    ("tracking.backends=[mlflow,mlflow]", "a backend is named twice"),
    ("tracking.wandb_mode=disabled", "tracking.wandb_mode = 'disabled': expected one of online, offline"),
    ("tracking.mlflow_uri=mlruns", "use sqlite:///mlruns.db, or http://HOST:PORT"),
])
def test_bad_tracking_settings_name_the_field_and_the_fix(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        C.load_config("ci", [override])


def test_rows_flatten_to_named_scalars_and_headlines_come_from_the_outputs():
    assert tracking.scalars(ROW) == {"loss": 0.5, "loss_by_sigma/0-0.1": 0.25, "loss_by_sigma/10.0-inf": 2.0, "lr": 0.01}
    outputs = {"metrics": {"loss_g": 0.3}, "validation": {"kept": {"nimg": 64, "fd_probe": 2.5}}}
    assert tracking.headline("distill", outputs) == {"metrics.loss_g": 0.3, "validation.kept.fd_probe": 2.5}


def test_rank_0_writes_one_event_file_per_chunk_and_the_other_ranks_none(tmp_path, fresh):
    artifact = store.Artifact(str(tmp_path / "teacher" / "0123456789abcdef"))
    run = pickle.loads(pickle.dumps(tracking.StageRun(C.TrackingConfig(), "teacher", "0123456789abcdef")))
    for rank in (1, 0):
        log = MetricsLog("teacher", 32, rank, run)
        for chunk in (0, 16):
            log.add({**ROW, "nimg": chunk + 8})
            log.add({**ROW, "nimg": chunk + 16, "loss": 0.25})
            log.flush(artifact, chunk)
    folder = tmp_path / "teacher" / "0123456789abcdef" / tracking.TENSORBOARD_DIR
    assert sorted(p.name for p in folder.iterdir()) == [f"events.out.tfevents.{n:012d}.onestep" for n in (0, 16)]
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(8, 0.5), (16, 0.25), (24, 0.5), (32, 0.25)]
    assert "loss_by_sigma/10.0-inf" in events.Tags()["scalars"]


def test_a_tracking_server_that_stops_answering_mid_run_costs_one_warning_line(tmp_path, fresh, caplog):
    artifact = store.Artifact(str(tmp_path / "distill" / "0123456789abcdef"))
    cfg = C.TrackingConfig(backends=("tensorboard", "mlflow"))
    run = tracking.StageRun(cfg, "distill", "0123456789abcdef", mlflow_run="0" * 32,
                            mlflow_uri=f"http://127.0.0.1:{_closed_port()}")
    log = MetricsLog("distill", 32, 0, run)
    with caplog.at_level(logging.WARNING, logger="onestep"):
        for nimg in (8, 16, 24, 32):
            log.add({**ROW, "nimg": nimg})
        log.flush(artifact, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "tracking: mlflow failed while logging distill's metrics" in warnings[0]
    assert "check tracking.mlflow_uri" in warnings[0]
    assert (tmp_path / "distill" / "0123456789abcdef" / tracking.event_file(0)).exists()  # TensorBoard goes on


def _failing_dag(calls: list[str]) -> dict[str, Stage]:
    """a -> b -> c where b raises after a has been committed."""
    def run(name):
        def stage(ctx, cfg, inputs):
            calls.append(name)
            if name == "b":
                raise ValueError("b broke")
            with ctx.artifact.open("report.md", "wb") as f:
                f.write(b"# a report")
            return {"total": 1}
        return stage
    return {n: Stage(n, "1", n, up, DRIVER, run(n)) for n, up in {"a": (), "b": ("a",), "c": ("b",)}.items()}


def test_a_failed_stage_ends_its_mlflow_run_failed_and_the_dag_run_too(tmp_path, fresh, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = FakeConfig(storage=str(tmp_path / "store"), tracking=C.TrackingConfig(
        backends=("mlflow",), mlflow_uri=uri, experiment="failing"))
    calls: list[str] = []
    with pytest.raises(ValueError, match="b broke"):
        dag.run(cfg, executor=InlineExecutor(), nodes=_failing_dag(calls))
    assert calls == ["a", "b"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    status = {r.info.run_name.split("-")[0]: r.info.status for r in runs}
    assert status == {"a": "FINISHED", "b": "FAILED", "fake": "FAILED"}  # fake: the DAG run, named by its preset


def test_a_report_file_that_cannot_be_read_after_the_commit_costs_a_warning_not_the_run(tmp_path, fresh, caplog,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    cfg = FakeConfig(storage=str(tmp_path / "store"), tracking=C.TrackingConfig(
        backends=("mlflow",), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="unreadable"))
    real = store.Artifact.read_bytes

    def unreadable(self, rel):
        if rel == "report.md":
            raise OSError("the storage hiccuped")
        return real(self, rel)

    monkeypatch.setattr(store.Artifact, "read_bytes", unreadable)
    nodes = {"a": _failing_dag([])["a"]}
    with caplog.at_level(logging.WARNING, logger="onestep"):
        plan = dag.run(cfg, executor=InlineExecutor(), nodes=nodes)
    assert store.Store(cfg.storage).artifact("a", plan.keys["a"]).state() == "done"
    assert any("report.md could not be read" in r.getMessage() for r in caplog.records)

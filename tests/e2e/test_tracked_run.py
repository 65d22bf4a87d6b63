"""Live tracking of a ci DAG run, read back as a researcher's tools read it: a real MLflow tracking server
(sqlite backend, artifacts through the server) on 127.0.0.1 and its client API, TensorBoard's event
reader, W&B's offline run files; a worker in another process logging to its stage's run; a server that
is down; and `onestep runs` over the same storage."""

import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import DISTILL_TINY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import cli, dag, integrity, store, tracking
from pipeline import config as C
from pipeline.executor import InlineExecutor

TINY = [*DISTILL_TINY, "teacher.batch=8", "distill.duration_nimg=16", "distill.checkpoint_nimg=8", "distill.log_nimg=8",
        "distill.val_every_nimg=8", "distill.val_images=8", "distill.val_batch=8", "distill.keep=best",
        "probe.epochs=1", "probe.holdout=0.5", "refstats.num_images=16", "eval.num_images=8", "eval.num_steps=2",
        "eval.grid_rows=2", "eval.grid_columns=2", "eval.images_per_task=8", "eval.batch=8", "executor=inline"]
STAGES = list(dag.graph())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server did not answer in 180 s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (sqlite store, artifacts proxied by the server); its URL."""
    folder = tmp_path_factory.mktemp("mlflow")
    port, log = _free_port(), folder / "server.log"
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        server = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # uvicorn and its worker: nothing of theirs outlives the test
        server.wait()


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """The ci DAG (tiny) run inline with all three trackers: (config, MLflow client, W&B folder)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    cfg = C.load_config("ci", [*TINY, "tracking.backends=[tensorboard,mlflow,wandb]",
                               f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=tracking-test",
                               "tracking.wandb_mode=offline", f"tracking.wandb_dir={root}"],
                        storage=str(root / "store"))
    dag.run(cfg, executor=InlineExecutor())
    return cfg, MlflowClient(mlflow_server), root / "wandb"


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


def test_the_dag_run_is_one_mlflow_parent_with_a_child_per_stage(tracked):
    cfg, client, _ = tracked
    keys = dag.cache_keys(dag.graph(), cfg)
    experiment = client.get_experiment_by_name("tracking-test")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`onestep.stages` != ''")
    assert parent.info.status == "FINISHED" and parent.data.params["preset"] == "ci"
    children = {r.data.tags["onestep.stage"]: r for r in client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(children) == sorted(STAGES)
    teacher = children["teacher"]
    assert teacher.info.run_name == f"teacher-{keys['teacher']}" and teacher.info.status == "FINISHED"
    assert teacher.data.tags["onestep.key"] == keys["teacher"]
    assert teacher.data.tags["onestep.upstream.encode"] == keys["encode"]
    assert teacher.data.params["lr"] == str(cfg.teacher.lr) and teacher.data.params["channels"] == "16"
    # one point per log row, at the images seen: teacher.log_nimg=8 over 32 images, distill the same
    for stage, steps in (("teacher", [8, 16, 24, 32]), ("distill", [0, 8, 16])):  # a point per row (distill's
        # first: its validation at 0 images), at the images seen
        rows = [json.loads(line) for line in _artifact(cfg, stage).read_bytes("metrics.jsonl").splitlines()]
        assert [r["nimg"] for r in rows] == steps
        for name in {k for r in rows for k in tracking.scalars(r)}:
            history = client.get_metric_history(children[stage].info.run_id, name)
            expected = [(r["nimg"], tracking.scalars(r)[name]) for r in rows if name in tracking.scalars(r)]
            assert [(m.step, m.value) for m in history] == expected, (stage, name)
    evaluate = children["evaluate"].info.run_id
    files = {a.path for a in client.list_artifacts(evaluate)} | {a.path for a in client.list_artifacts(evaluate, "plots")}
    assert {"report.html", "report.md", "results.json", "grids", "plots/metric-fd_probe.png"} <= files
    report = Path(client.download_artifacts(evaluate, "report.html")).read_text()
    assert report == store.read_bytes(_artifact(cfg, "evaluate").path("report.html")).decode()
    assert {"student/fd_probe", "teacher 0.100/fd_probe", "real/count"} <= set(children["evaluate"].data.metrics)


def test_tensorboard_reads_the_event_files_inside_the_training_artifacts_and_verify_accepts_them(tracked):
    cfg, _, _ = tracked
    for stage, tags, steps in (("teacher", {"loss", "lr", "img_per_s"}, [8, 16, 24, 32]),
                               ("distill", {"loss_g", "loss_dm", "loss_fake", "loss_reg", "grad_norm", "img_per_s"}, [8, 16])):
        folder = Path(_artifact(cfg, stage).path(tracking.TENSORBOARD_DIR))
        assert len(list(folder.iterdir())) == 2  # one event file per checkpoint chunk
        events = EventAccumulator(str(folder))
        events.Reload()
        assert tags <= set(events.Tags()["scalars"]), (stage, events.Tags())
        assert [e.step for e in events.Scalars("img_per_s")] == steps
        assert any(rel.startswith(tracking.TENSORBOARD_DIR) for rel in _artifact(cfg, stage).manifest()["files"])
    # distill's validation: its curve, and a grid of the student's samples (a row per class) at each validation
    events = EventAccumulator(str(Path(_artifact(cfg, "distill").path(tracking.TENSORBOARD_DIR))), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val_fd_probe")] == [0, 8, 16]
    grids = events.Images("validation/samples")
    assert [e.step for e in grids] == [0, 8, 16] and grids[0].height == 10 * 16 + 9 * 4 and grids[0].width == 8 * 16 + 7 * 4
    assert integrity.verify(cfg, executor=InlineExecutor())[1] == []


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""  # after the ':W&B' header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def _name(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_folders_hold_each_stage_its_config_and_its_metrics(tracked):
    cfg, _, folder = tracked
    keys = dag.cache_keys(dag.graph(), cfg)
    runs: dict[str, dict] = {}
    for path in folder.glob("offline-run-*/run-*.wandb"):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(record.run.run_id, {"history": [], "summary": {}})
                run.update(group=record.run.run_group, name=record.run.display_name,
                           config={i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                run["history"].append({_name(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({_name(i): json.loads(i.value_json) for i in record.summary.update})
    by_stage = {}
    for run_id, run in runs.items():
        by_stage.setdefault(run_id.split("-")[0], []).append(run)
    assert sorted(by_stage) == sorted(STAGES)
    assert len({run["group"] for group in by_stage.values() for run in group}) == 1  # one DAG run
    teacher = by_stage["teacher"]
    assert teacher[0]["name"] == f"teacher-{keys['teacher']}" and teacher[0]["config"]["lr"] == cfg.teacher.lr
    rows = [row for run in teacher for row in run["history"] if "loss" in row]
    assert [row["nimg"] for row in rows] == [8, 16, 24, 32]
    assert {"lr", "img_per_s"} <= set(rows[0]) and any(k.startswith("loss_by_sigma/") for k in rows[0])
    evaluate = by_stage["evaluate"][0]
    assert "student_over_best_teacher" in evaluate["summary"] and "student/fd_probe" in evaluate["summary"]
    logged = {name for row in evaluate["history"] for name in row}
    assert any(n.startswith("report/") for n in logged) and any(n.startswith("files/grids/") for n in logged)


def test_onestep_runs_tabulates_the_storage_from_the_manifests_alone(tracked, capsys):
    cfg, _, _ = tracked
    keys = dag.cache_keys(dag.graph(), cfg)
    assert cli.main(["runs", "--storage", cfg.storage]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert sorted(rows) == sorted(STAGES)
    assert all(f" {keys[s]}  done " in rows[s] for s in STAGES)
    assert "ci: batch=8 channels=16" in rows["teacher"] and "loss=" in rows["teacher"]
    assert "student_over_best_teacher=" in rows["evaluate"] and "num_samples=32" in rows["encode"]


def test_a_training_worker_in_another_process_logs_live_to_its_stage_run(mlflow_server, tmp_path):
    """The picklable StageRun carries the run id and URI to a worker process; rank 0 logs rows and an image."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("worker-test")
    run_id = client.create_run(experiment).info.run_id
    run = tracking.StageRun(C.TrackingConfig(backends=("tensorboard", "mlflow")), "distill", "0123456789abcdef",
                            mlflow_run=run_id, mlflow_uri=mlflow_server)
    artifact = store.Artifact(str(tmp_path / "distill" / "0123456789abcdef"))
    (tmp_path / "run.pkl").write_bytes(pickle.dumps((run, artifact)))
    worker = ("import pickle, sys, numpy as np\nfrom pipeline.training import MetricsLog\n"
              "run, artifact = pickle.load(open(sys.argv[1], 'rb'))\nlog = MetricsLog('distill', 16, 0, run)\n"
              "log.add({'nimg': 8, 'loss_g': 0.5})\nlog.image('val_grid', np.full((20, 30, 3), 200, np.uint8), 8)\n"
              "log.add({'nimg': 16, 'loss_g': 0.25})\nlog.flush(artifact, 0)\n")
    subprocess.run([sys.executable, "-c", worker, str(tmp_path / "run.pkl")], check=True, timeout=120)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss_g")] == [(8, 0.5), (16, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["images"]
    events = EventAccumulator(artifact.path(tracking.TENSORBOARD_DIR), size_guidance={"images": 0})
    events.Reload()
    [image] = events.Images("val_grid")
    assert (image.step, image.width, image.height) == (8, 30, 20)


def test_a_tracking_server_that_is_down_warns_once_and_the_run_finishes(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tracking, "_dropped", set())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = C.load_config("ci", [*TINY, "tracking.backends=[tensorboard,mlflow]",
                               f"tracking.mlflow_uri=http://127.0.0.1:{closed}"], storage="memory://tracking-down")
    with caplog.at_level(logging.WARNING, logger="onestep"):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"http://127.0.0.1:{closed}" in warnings[0], warnings
    assert "the run goes on without mlflow" in warnings[0]
    assert _artifact(cfg, "teacher").state() == "done"
    assert _artifact(cfg, "teacher").exists(tracking.event_file(0))

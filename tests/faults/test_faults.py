"""Fault injection on the ci DAG (shrunk): the driver SIGKILLed at seeded moments in every stage, a
Ray node removed under running tasks, each kind of artifact file cut or bit-flipped. A rerun always
finishes, with the same bytes as an uninterrupted run, and damage is always named."""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import ray

from pipeline import config as C
from pipeline import dag, integrity, store
from pipeline.executor import InlineExecutor
from pipeline.training import STATE_FILE, load_state

from helpers import NodeRecordingExecutor, ray_cluster

SMALL = ["encode.num_images=200", "encode.shard_size=100", "teacher.batch=16", "teacher.checkpoint_nimg=32",
         "teacher.snapshot_nimg=32", "teacher.duration_nimg=96", "teacher.log_nimg=16", "teacher.lr_rampup_nimg=0",
         "eval.images_per_task=16"]
STAGES = list(dag.graph())


def _cfg(storage, *extra: str) -> C.Config:
    return C.load_config("ci", [*SMALL, *extra], storage=str(storage))


def _artifacts(cfg: C.Config) -> dict[str, store.Artifact]:
    keys = dag.cache_keys(dag.graph(), cfg)
    return {name: store.Store(cfg.storage).artifact(name, keys[name]) for name in keys}


def _content(cfg: C.Config) -> dict[str, Any]:
    """Every stage's files and checksums, and evaluate's results, what records wall times left out: the
    training logs, and the report's task times."""
    content: dict[str, Any] = {name: integrity._content(art.manifest()) for name, art in _artifacts(cfg).items()}
    for rel in ("report.md", "report.html", "results.json"):
        content["evaluate"].pop(rel)
    rows = _artifacts(cfg)["evaluate"].manifest()["outputs"]["models"]
    content["evaluate results"] = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    return content


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    cfg = _cfg(tmp_path_factory.mktemp("reference"), "executor=inline")
    dag.run(cfg, executor=InlineExecutor())
    return cfg


def _driver(storage) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.cli", "run", "--config", "ci", "--storage", str(storage),
            *(a for s in [*SMALL, "executor=inline"] for a in ("--set", s))]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _files(art: store.Artifact) -> int:
    return sum(len(files) for _, _, files in os.walk(art.url))


def test_driver_killed_at_seeded_moments_in_every_stage_then_the_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    cfg = _cfg(tmp_path, "executor=inline")
    arts, rng = _artifacts(cfg), random.Random(14)
    made = {name: len(art.manifest()["files"]) for name, art in _artifacts(reference).items()}
    interrupted = []
    for stage in STAGES:  # a moment in each stage: once it holds its lease and has written k of its files
        k = rng.randint(0, max(0, made[stage] - 2))
        driver, lease_url = _driver(tmp_path), arts[stage].url + ".lease"
        deadline = time.time() + 120
        while driver.poll() is None and time.time() < deadline:
            if os.path.exists(lease_url) and (k == 0 or _files(arts[stage]) >= k):
                break
            time.sleep(0.005)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        if arts[stage].manifest() is None:
            interrupted.append(stage)
        for name in STAGES[STAGES.index(stage) + 1:]:
            assert arts[name].manifest() is None, name  # nothing after the moment was committed
    assert len(interrupted) >= 6, interrupted  # stages of one file may commit before the kill lands
    driver = _driver(tmp_path)
    assert driver.wait(timeout=300) == 0
    assert _content(cfg) == _content(reference)


def test_a_node_removed_under_running_tasks_the_stage_still_finishes_with_the_same_bytes(reference, tmp_path):
    cfg = _cfg(tmp_path / "run", "shared_storage=true", "encode.num_tasks=2", "pairs.spread=true")
    shutil.copytree(reference.storage, cfg.storage)
    arts = _artifacts(cfg)
    with ray_cluster({"num_cpus": 1}, {"num_cpus": 1}) as cluster:
        head = ray.get_runtime_context().get_node_id()
        for stage in ("encode", "pairs", "evaluate"):
            arts[stage].delete()
            executor = NodeRecordingExecutor(delay_s=1.0)  # tasks still in their first second at removal
            assert executor.num_nodes() == 2
            run = threading.Thread(target=dag.run, args=(cfg,), kwargs={"only": [stage], "executor": executor})
            run.start()
            while not store.exists(arts[stage].url + ".lease") and run.is_alive():
                time.sleep(0.01)
            time.sleep(0.5)  # a task started on each node, both still in their first second
            cluster.remove_node(cluster.list_all_nodes()[-1], allow_graceful=False)
            run.join(300)
            assert arts[stage].manifest() is not None, stage
            assert set(executor.nodes) == {head}, stage  # the removed node's task was redone on the head
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
    assert _content(cfg) == _content(reference)


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


KINDS = {  # file kind -> (stage, file, the stage that reads it)
    "encode shard": ("encode", "shards/data-000001.tar", "teacher"),
    "encode index": ("encode", "index.parquet", "probe"),
    "teacher snapshot": ("teacher", "snapshots/ema-0.0500-000000000064.safetensors", "phema"),
    "network config": ("phema", "network.json", "pairs"),
    "phema variant": ("phema", "phema-0.1000.safetensors", "pairs"),
    "pairs shard": ("pairs", "shards/pairs-000000.tar", "distill"),
    "probe weights": ("probe", "probe.safetensors", "evaluate"),
    "distill student": ("distill", "student.safetensors", "evaluate"),
    "manifest": ("phema", "manifest.json", "pairs"),
}


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_each_kind_of_file_damaged_is_named_by_the_stage_that_reads_it(reference, tmp_path, damage):
    cfg = _cfg(tmp_path, "executor=inline")
    for kind, (stage, rel, reader) in KINDS.items():
        shutil.rmtree(tmp_path, ignore_errors=True)
        shutil.copytree(reference.storage, cfg.storage)
        arts = _artifacts(cfg)
        path = arts[stage].path(rel)
        os.truncate(path, os.path.getsize(path) // 2) if damage == "truncated" else _flip(path)
        arts[reader].delete()
        try:
            dag.run(cfg, only=[reader], executor=InlineExecutor())
            message = f"{kind} {damage}: not detected"
        except store.ChecksumMismatch as error:
            message = str(error)
        assert rel in message and (f"onestep verify {stage}" in message or f"--force {stage}" in message), (kind, message)
        assert arts[reader].manifest() is None, kind
    checkpoint = str(tmp_path / "ckpt")  # a checkpoint of a run in progress (no manifest yet): its own checksum
    shutil.copytree(_artifacts(reference)["teacher"].path("checkpoints/ckpt-000000"), checkpoint)
    path = os.path.join(checkpoint, STATE_FILE)
    os.truncate(path, os.path.getsize(path) // 2) if damage == "truncated" else _flip(path)
    with pytest.raises(store.ChecksumMismatch, match=f"checkpoint {path} does not match its checksum"):
        load_state(checkpoint)


def test_the_s3_endpoint_stopped_mid_stage_fails_clearly_commits_nothing_and_a_rerun_completes(reference, s3_bucket):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # moto's state outlives its servers
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}  # the driver's endpoint; ours stays up
    cfg = _cfg(f"{s3_bucket}/outage-{time.time_ns()}", "executor=inline")
    teacher = _artifacts(cfg)["teacher"]
    args = [sys.executable, "-m", "pipeline.cli", "run", "--config", "ci", "--storage", cfg.storage, "--until", "teacher",
            *(a for s in [*SMALL, "executor=inline"] for a in ("--set", s))]
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not store.exists(teacher.path("_pieces/snapshot-000000000032.json")) and time.time() < deadline:
        time.sleep(0.02)
    server.stop()  # mid-teacher: its first snapshot is stored, the rest is not
    log = driver.communicate(timeout=180)[0]
    assert driver.returncode == 2, log
    assert f"onestep: error: stage teacher: lost the connection to the storage {cfg.storage} (" in log, log
    assert "rerun the same command once the storage answers" in log and "Traceback" not in log, log
    assert teacher.manifest() is None and teacher.state() == "partial"  # never visible as done
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    finally:
        server.stop()
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert integrity._content(teacher.manifest()) == integrity._content(_artifacts(reference)["teacher"].manifest())

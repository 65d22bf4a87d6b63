"""One writer per artifact: two drivers started at once on one storage (local, and the moto S3 server)
make each artifact once, the second using the first's; a killed driver's lease is taken over."""

import signal
import subprocess
import sys
import time

import pytest

from pipeline import config as C
from pipeline import dag, integrity, store
from pipeline.executor import InlineExecutor

SMALL = ["encode.num_images=200", "encode.shard_size=100", "teacher.batch=16", "teacher.checkpoint_nimg=32",
         "teacher.snapshot_nimg=32", "teacher.duration_nimg=96", "teacher.log_nimg=16", "teacher.lr_rampup_nimg=0",
         "executor=inline"]


def _driver(storage: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.cli", "run", "--config", "ci", "--storage", storage, "--until", "teacher",
            *(a for s in SMALL for a in ("--set", s)), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _intact(storage: str) -> None:
    cfg = C.load_config("ci", SMALL, storage=storage)
    states, damage = integrity.verify(cfg, ["encode", "teacher"], InlineExecutor())
    assert states == {"encode": "done", "teacher": "done"} and damage == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_at_once_make_each_artifact_once(where, tmp_path, s3_bucket):
    storage = str(tmp_path) if where == "local" else f"{s3_bucket}/two-drivers-{time.time_ns()}"
    drivers = [_driver(storage), _driver(storage)]
    logs = [d.communicate(timeout=300)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], logs
    both = "".join(logs)
    for stage in ("encode", "teacher"):
        assert both.count(f"{stage}: running (key") == 1, both  # made once ...
    assert "waiting for it to finish" in both and "made by another run meanwhile" in both, both  # ... and used
    _intact(storage)


def test_a_killed_drivers_lease_is_taken_over_and_the_rerun_finishes(tmp_path, caplog):
    storage = str(tmp_path)
    cfg = C.load_config("ci", SMALL, storage=storage)
    teacher = store.Store(storage).artifact("teacher", dag.cache_keys(dag.graph(), cfg)["teacher"])
    driver = _driver(storage)
    deadline = time.time() + 120
    while not store.exists(teacher.url + ".lease") and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert store.exists(teacher.url + ".lease") and teacher.manifest() is None  # killed while it held the lease
    dag.run(cfg, until="teacher", wait=False)  # no waiting for a lease whose process is gone
    assert "taking over the lease of owner" in caplog.text and "on this host has exited" in caplog.text
    assert not store.exists(teacher.url + ".lease")
    _intact(storage)

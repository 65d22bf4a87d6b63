"""`ray job submit` of the ci preset to a head node started from this venv, as a user would:
artifacts on the moto S3 server, credentials passed from the environment at submit time
(`onestep runtime-env`), never written into a file. The whole DAG's outputs and report are checked,
then a rerun from here is fully cached. (This is the suite's one whole-DAG run under Ray.)"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline import config as C
from pipeline import dag, store

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # `ray` and `onestep` of this venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` on 127.0.0.1 in its own temp dir and process group; the jobs'
    `python` is this venv's (first on the PATH of `ray start`). Yields the dashboard address."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", f"--temp-dir={temp}", "--disable-usage-stats",
         # ports of their own: the session's Ray instance (and a user's) hold the default ones
         *(f"--{name}-port={_free_port()}" for name in ("dashboard-agent-listen", "dashboard-agent-grpc",
                                                        "runtime-env-agent", "metrics-export", "ray-client-server"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(dashboard).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head node did not come up (exit code {head.poll()})")
                time.sleep(1)
        yield dashboard, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=5)  # a graceful stop takes half a minute; the group is killed below, its temp dir removed
        except subprocess.TimeoutExpired:
            pass
        subprocess.run(["pkill", "-KILL", "-g", str(head.pid)], check=False)  # stragglers of the group
        shutil.rmtree(temp, ignore_errors=True)


# The ci preset with a quarter of its teacher's training: the job's Ray work (tasks, two Ray Train jobs, S3
# checkpoints) is the same, the minutes of training are not what this test is about.
SHORTER = ["teacher.duration_nimg=256", "teacher.snapshot_nimg=128", "teacher.checkpoint_nimg=128",
           "teacher.log_nimg=64", "teacher.lr_rampup_nimg=64"]


def test_ray_job_submit_runs_the_ci_dag_on_s3(head_node, s3_bucket):
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard, env = head_node
    storage = f"{s3_bucket}/job-{uuid.uuid4().hex[:8]}"
    runtime_env = subprocess.run(
        [str(BIN / "onestep"), "runtime-env", "--env", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
         "FSSPEC_S3_ENDPOINT_URL"], cwd=REPO, env=env, check=True, capture_output=True, text=True,
    ).stdout
    assert json.loads(runtime_env)["working_dir"] == "."
    job_id = f"onestep-ci-{uuid.uuid4().hex[:8]}"
    for attempt in range(30):  # the head's job agent comes up a little after its dashboard
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id, "--no-wait",
             "--runtime-env-json", runtime_env, "--", "python", "workflows/full.py", "--config", "ci",
             "--storage", storage, *(a for s in SHORTER for a in ("--set", s))],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + 800
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not finish in time:\n" + client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logs  # credentials never reach a log

    cfg = C.load_config("ci", SHORTER, storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    st = store.Store(storage)
    for stage, key in keys.items():
        assert st.artifact(stage, key).state() == "done", stage
    _check_report(st.artifact("evaluate", keys["evaluate"]), logs)
    for stage in ("teacher", "distill"):  # Ray Train's checkpoints, written to S3 through pyarrow
        files = store.walk_files(st.artifact(stage, keys[stage]).path("checkpoints"))
        assert any(f.startswith(f"{storage}/") and "/checkpoint_" in f and f.endswith("/state.pt") for f in files), files
    assert dag.run(cfg, executor=None, dry_run=True).to_run == []  # a rerun is fully cached


def _check_report(report: store.Artifact, logs: str) -> None:
    """The ci DAG's evaluation: the probe's metrics for each model, the report, the grids, and the
    run's closing lines (where the report is, the student/teacher ratio)."""
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
    assert f"report: {report.path('report.md')}" in logs
    assert f"{outputs['student_over_best_teacher']:.2f}x the best teacher variant's" in logs

"""A wrong RAY_ADDRESS, an unreachable storage endpoint, missing credentials, a bucket that does
not exist: each is a one-line error (exit code 2) naming the thing and the fix, within seconds,
before any stage runs. Through the real command line; S3 is the session's moto server."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import cli, dag

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 20  # a bound on hanging (botocore's defaults retry for minutes), not a benchmark


@pytest.fixture
def no_stage(monkeypatch):
    """Fails the test if a stage or an executor (Ray) starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("a stage or an executor started before the bad input was reported")

    monkeypatch.setattr(dag, "run_stage", refuse)
    monkeypatch.setattr(dag, "make_executor", refuse)


@pytest.fixture
def s3_env(s3_bucket, monkeypatch):
    """The session's S3 settings, restored after the test; no S3 filesystem made under a test's
    broken settings outlives it."""
    import fsspec
    import s3fs

    monkeypatch.setattr(fsspec.config, "conf", {k: dict(v) for k, v in fsspec.config.conf.items()})
    yield s3_bucket
    s3fs.S3FileSystem.clear_instance_cache()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(capsys, *argv: str) -> tuple[int, str, float]:
    start = time.monotonic()
    code = cli.main(list(argv))
    return code, capsys.readouterr().err, time.monotonic() - start


def _args(storage: str) -> list[str]:
    return ["--config", "ci", "--storage", storage]


@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["status"], ["show", "encode"]])
def test_missing_bucket(s3_env, no_stage, capsys, command):
    import fsspec

    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    code, err, took = _cli(capsys, *command, *_args(f"s3://{bucket}/run"))
    assert code == 2 and took < BOUND_S
    assert f"error: cannot read storage s3://{bucket}/run: the bucket {bucket} does not exist. Create it" in err
    assert not fsspec.filesystem("s3").exists(bucket)  # the check made no bucket


def test_missing_credentials(s3_env, no_stage, capsys, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    storage = f"{s3_env}/run-{uuid.uuid4().hex[:8]}"
    code, err, took = _cli(capsys, "run", *_args(storage))
    assert code == 2 and took < BOUND_S
    assert f"cannot read storage {storage}: no credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_endpoint(s3_env, no_stage, capsys, monkeypatch, request, kind):
    import fsspec

    endpoint = f"http://127.0.0.1:{_closed_port()}" if kind == "refused" else request.getfixturevalue("silent_endpoint")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)
    fsspec.config.set_conf_env(fsspec.config.conf)  # as at start-up with this environment
    storage = f"{s3_env}/run"
    code, err, took = _cli(capsys, "run", *_args(storage))
    assert code == 2 and took < BOUND_S
    assert f"cannot read storage {storage}: no connection to {endpoint}" in err
    assert "Check the URL (--storage), FSSPEC_S3_ENDPOINT_URL and the network." in err


def test_unwritable_local_path(no_stage, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    storage = str(tmp_path / "a-file" / "run")
    code, err, took = _cli(capsys, "run", *_args(storage))
    assert code == 2 and took < BOUND_S
    assert f"cannot read storage {storage}: NotADirectoryError" in err and "Choose a folder you can write" in err


def test_wrong_ray_address(tmp_path):
    """What a user runs, in a fresh process: this session's Ray, if started, would be reused."""
    address = f"127.0.0.1:{_closed_port()}"
    storage = tmp_path / "a"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "workflows/full.py", *_args(str(storage))], cwd=REPO,
                         env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert f"cannot reach the Ray cluster at RAY_ADDRESS='{address}'" in out.stderr
    assert "Unset RAY_ADDRESS to start a local instance, or fix the address." in out.stderr
    assert took < 2 * BOUND_S  # a fresh interpreter imports the pipeline and Ray first
    assert not storage.exists() or not any(storage.iterdir())  # no stage wrote anything

"""`onestep run | status | show` in-process, on the inline executor."""

import json

from pipeline import cli


def _args(storage, *extra):
    return ["--config", "ci", "--storage", storage, "--set", "executor=inline",
            "--set", "encode.num_images=40", "--set", "encode.shard_size=20", *extra]


def test_dry_run_prints_config_and_plan_and_runs_nothing(tmp_path, capsys):
    storage = str(tmp_path / "a")
    assert cli.main(["run", *_args(storage, "--dry-run")]) == 0
    out = capsys.readouterr().out
    assert "num_images: 40" in out and "encode" in out and "missing  run" in out
    assert not (tmp_path / "a").exists()


def test_run_status_show(tmp_path, capsys):
    storage = str(tmp_path / "a")
    assert cli.main(["status", *_args(storage)]) == 0
    assert "missing" in capsys.readouterr().out
    assert cli.main(["run", *_args(storage, "--until", "encode")]) == 0
    capsys.readouterr()
    assert cli.main(["status", *_args(storage)]) == 0
    status = capsys.readouterr().out
    assert "encode" in status and "done" in status and " s" in status
    assert cli.main(["show", "encode", *_args(storage)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["outputs"]["num_samples"] == 40 and manifest["config"]["shard_size"] == 20
    assert cli.main(["run", *_args(storage)]) == 0
    assert "cached" in capsys.readouterr().out


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert cli.main(["run", *_args(str(tmp_path), "--set", "encode.resolution=abc")]) == 2
    assert "encode.resolution: expected int" in capsys.readouterr().err
    assert cli.main(["show", "encode", *_args(str(tmp_path / "empty"))]) == 2
    assert "onestep run --until encode" in capsys.readouterr().err
    assert cli.main(["run", *_args(str(tmp_path), "--only", "nope")]) == 2
    assert "unknown stage" in capsys.readouterr().err

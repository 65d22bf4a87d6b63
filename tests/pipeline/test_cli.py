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
    ran = capsys.readouterr().out  # after a run: every stage's state, no report before evaluate
    assert "state" in ran and "done" in ran and "report:" not in ran
    assert cli.main(["status", *_args(storage)]) == 0
    status = capsys.readouterr().out
    assert "encode" in status and "done" in status and " s" in status
    assert cli.main(["show", "encode", *_args(storage)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["outputs"]["num_samples"] == 40 and manifest["config"]["shard_size"] == 20
    assert cli.main(["run", *_args(storage, "--until", "encode")]) == 0
    assert "cached" in capsys.readouterr().out


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert cli.main(["run", *_args(str(tmp_path), "--set", "encode.resolution=abc")]) == 2
    assert "encode.resolution: expected int" in capsys.readouterr().err
    assert cli.main(["show", "encode", *_args(str(tmp_path / "empty"))]) == 2
    assert "onestep run --until encode" in capsys.readouterr().err
    assert cli.main(["run", *_args(str(tmp_path), "--only", "nope")]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_sample_writes_the_requested_images(tmp_path, capsys):
    from PIL import Image

    storage = str(tmp_path / "a")
    tiny = ["--set", "teacher.duration_nimg=256", "--set", "teacher.snapshot_nimg=128",
            "--set", "teacher.checkpoint_nimg=256", "--set", "pairs.num_pairs=8", "--set", "pairs.num_steps=2",
            "--set", "distill.duration_nimg=16", "--set", "refstats.num_images=8"]
    assert cli.main(["run", *_args(storage, *tiny, "--until", "distill")]) == 0
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--model", "student", "--num", "4", "--out", str(grid), *_args(storage, *tiny)]) == 0
    assert Image.open(grid).size == (32, 32)  # 2 x 2 images of 16 px
    folder = tmp_path / "teacher"
    assert cli.main(["sample", "--model", "teacher:0.05", "--steps", "2", "--seeds", "10-12", "--classes", "3",
                     "--out", str(folder), *_args(storage, *tiny)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["000010.png", "000011.png", "000012.png"]
    assert cli.main(["sample", "--model", "teacher:0.07", "--out", str(grid), *_args(storage, *tiny)]) == 2
    assert "no teacher variant at sigma_rel 0.07" in capsys.readouterr().err

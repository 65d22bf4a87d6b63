"""`onestep sweep`: two trials under Ray Tune share the teacher (made once) and make two students, each
trial's validation reaching Tune (what ASHA reads); the comparison table, csv and curves are written; inline, a trial that
fails is a row with its error and the others finish."""

import csv
import io
import json
import logging

import pytest

from pipeline import cli, store
from pipeline import sweep as S
from pipeline.executor import RayExecutor, TrialSchedule
from helpers import DISTILL_TINY, VALIDATION

TINY_EVAL = ["eval.num_images=8", "eval.num_steps=2", "eval.images_per_task=8", "eval.grid_rows=2",
             "eval.grid_columns=2", "eval.batch=8", "refstats.num_images=8", "distill.duration_nimg=64"]
BASE = [*DISTILL_TINY, *VALIDATION, *TINY_EVAL]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: the inline sweep finds the upstream artifacts the Tune sweep made (and
    makes them itself when it runs alone)."""
    return str(tmp_path_factory.mktemp("sweep"))


def test_a_sweep_of_two_values_shares_the_teacher_and_makes_two_students(ray_session, storage, caplog):
    caplog.set_level(logging.INFO, logger="onestep")
    trials = S.expand("ci", BASE, storage, ["distill.lr=1e-4,1e-3"], [])
    folder, table = S.sweep(trials, RayExecutor(), asha=False)
    assert caplog.text.count("teacher: running (key") == 1  # made once, before the trials, for both
    assert [r["status"] for r in table] == ["done", "done"]
    assert sorted(r["trial"] for r in table) == ["distill.lr=0.0001", "distill.lr=0.001"]
    assert table[0]["keys"]["teacher"] == table[1]["keys"]["teacher"]
    assert table[0]["keys"]["distill"] != table[1]["keys"]["distill"]  # two students, each its own key
    for row in table:
        student = store.Store(storage).artifact("distill", row["keys"]["distill"]).manifest()["outputs"]
        assert [p[0] for p in row["curve"]] == [0, 32, 64] and student["student"]["nimg"] == row["kept_nimg"]
        assert row["reported"] == row["curve"]  # each validation reached Ray Tune (what ASHA reads)
        assert row["student_metric"] > 0 and 0 <= row["class_accuracy"] <= 1
    assert table[0]["student_metric"] <= table[1]["student_metric"]  # sorted by evaluate's metric
    md = store.read_bytes(store.join(folder, "table.md")).decode()
    assert "| distill.lr=0.0001 | done |" in md and "| distill.lr=0.001 | done |" in md
    rows = list(csv.DictReader(io.StringIO(store.read_bytes(store.join(folder, "table.csv")).decode())))
    assert [r["trial"] for r in rows] == [r["trial"] for r in table]
    assert json.loads(rows[0]["keys"]) == table[0]["keys"]
    assert store.read_bytes(store.join(folder, "curves.png"))[:4] == b"\x89PNG"


def test_inline_a_failing_trial_is_a_row_with_its_error_and_the_cli_prints_the_table(storage, capsys):
    args = ["sweep", "--config", "ci", "--storage", storage, "--no-asha",
            *(a for s in [*BASE, "executor=inline"] for a in ("--set", s)),
            "--trial", "distill.lr=1e-4", "--trial", "distill.lr=1e6 distill.fake_lr=1e6 distill.keep=last"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| distill.lr=1e-4 | done |" in out
    assert "| distill.lr=1e6 distill.fake_lr=1e6 distill.keep=last | failed |" in out and "diverged" in out


def test_asha_starts_after_two_validations_and_needs_validation():
    cfg = S.Trial("ci", tuple(BASE), None, ()).config()
    schedule = S.schedule(cfg, asha=True, concurrency=0)
    assert (schedule.metric, schedule.mode, schedule.time_attr) == ("val_fd_probe", "min", "nimg")
    assert schedule.grace_t == 2 * cfg.distill.val_every_nimg and schedule.max_t == cfg.distill.duration_nimg
    off = S.Trial("ci", (*BASE, "distill.val_every_nimg=0", "distill.keep=last"), None, ()).config()
    with pytest.raises(ValueError, match="ASHA stops trials on their validation fd_probe.*--no-asha"):
        S.schedule(off, asha=True, concurrency=0)
    with pytest.raises(ValueError, match="a sweep needs trials"):
        S.expand("ci", BASE, None, [], [])


def _curve_trial(values, executor):
    """A trial that only reports a validation curve to Ray Tune, one point per 'image', as distill's
    validations reach it."""
    from ray import tune

    for nimg, value in enumerate(values, 1):
        tune.report({"nimg": nimg, "val_fd_probe": value})
    return {"last": values[-1]}


def test_asha_stops_the_trial_whose_validation_is_worse_at_its_first_rung(ray_session):
    good, bad = [1.0, 0.9, 0.8, 0.7], [5.0, 5.0, 5.0, 5.0]
    items = [good, bad]
    schedule = TrialSchedule(max_t=4, grace_t=1, concurrency=1)  # one at a time: the good curve sets the rung
    outcomes = RayExecutor().trials(_curve_trial, items, schedule)
    assert outcomes[0].status == "done" and outcomes[0].result == {"last": 0.7}
    assert [r["val_fd_probe"] for r in outcomes[0].reports] == good
    assert outcomes[1].status == "stopped" and outcomes[1].result is None
    assert 1 <= len(outcomes[1].reports) < len(bad)  # stopped at a rung, before its end

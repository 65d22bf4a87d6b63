"""The divergence guard's rules on hand-made losses: the ratio to the starting loss, patience, the
streak reset by a good interval, and the floor of 1 for small or negative starting losses."""

import math

import pytest

from pipeline.training import DivergenceGuard, Diverged


def _guard(**start: float) -> DivergenceGuard:
    guard = DivergenceGuard("teacher", max_ratio=100.0, patience=3, fix="Lower teacher.lr.")
    guard.start(**start)
    return guard


def test_a_loss_that_stays_high_for_k_intervals_stops_the_run():
    guard = _guard(loss=2.0)
    for nimg, loss in ((1, 150.0), (2, 199.0)):  # at and below 100 x 2: within range
        guard.row({"nimg": nimg, "loss": loss})
    assert not guard.suspect()
    guard.row({"nimg": 3, "loss": 201.0})
    guard.row({"nimg": 4, "loss": 5e16})
    assert guard.suspect()
    with pytest.raises(Diverged, match=r"teacher diverged at 5 images: loss = inf, above 100 x its starting value 2, "
                                       r"for 3 log intervals in a row\. Lower teacher.lr\."):
        guard.row({"nimg": 5, "loss": math.inf})


def test_a_good_interval_resets_the_streak_and_small_starts_are_held_to_one():
    guard = _guard(loss=-0.3, loss_fake=1000.0)  # EDM2's loss with u(sigma) may be negative
    for nimg, loss in enumerate((150.0, 150.0, 50.0, 150.0, 150.0, 99.0)):  # limit: 100 x max(0.3, 1)
        guard.row({"nimg": nimg, "loss": loss, "loss_fake": 9e4})  # loss_fake's limit is 1e5
    assert not guard.suspect()


def test_non_finite_steps_in_a_row_stop_the_run():
    guard = _guard(loss=1.0)
    for nimg, finite in enumerate((False, False, True, False, False)):
        guard.step(finite, nimg)
    with pytest.raises(Diverged, match="teacher diverged at 9 images: the loss or its gradients were not finite "
                                       "for 3 steps in a row"):
        guard.step(False, 9)

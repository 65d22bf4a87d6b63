"""Validation's pieces: its seeds, its scores reduced over ranks, and what it decides (keep, stop)."""

import numpy as np
import pytest
import torch

from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.probe import ProbeFeatures, ProbeNet
from pipeline.metrics.validation import Reference, Watch, score
from pipeline import config as C
from pipeline.diffusion.sampler import SEED_LIMIT, seeded_noise
from pipeline.seeds import PAIRS_SEED_BASE, counts_per_class, evaluation_seeds, scored_labels, validation_seeds


def test_validation_pairs_and_evaluation_draw_different_noise():
    """Checked on the noise itself: torch's generator keeps only a seed's low 32 bits, so 2^40 + i would
    draw evaluate's noise of seed i."""
    shape, n = (3, 4, 4), 200
    evaluated = seeded_noise(evaluation_seeds(0, n), shape, 0, "cpu")[0]
    validated = seeded_noise(validation_seeds(n), shape, 0, "cpu")[0]
    paired = seeded_noise([PAIRS_SEED_BASE + i for i in range(n)], shape, 0, "cpu")[0]
    rows = {tuple(r.tolist()) for r in torch.cat([evaluated, validated, paired]).flatten(1)}
    assert len(rows) == 3 * n
    assert validation_seeds(3) == validation_seeds(5)[:3]  # fixed: the same seeds at every validation
    assert max(validation_seeds(50_000)) < SEED_LIMIT and min(validation_seeds(1)) >= PAIRS_SEED_BASE + 50_000
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\^32\).*would repeat"):
        seeded_noise([5 + (1 << 32)], shape, 0, "cpu")


def test_pairs_seeds_that_overlap_evaluations_are_refused():
    with pytest.raises(ValueError, match=r"pairs.seed = 0: the pairs' seeds \[0, 64\) overlap evaluate's"):
        C.load_config("ci", ["pairs.seed=0"])
    assert C.load_config("ci").pairs.seed == PAIRS_SEED_BASE


@pytest.mark.parametrize("seeds", [evaluation_seeds(0, 256), evaluation_seeds(999, 1255), validation_seeds(256)])
def test_scored_samples_hold_every_class_in_the_datas_proportion(seeds):
    """256 consecutive seeds give each class its share of the data within one image; labels drawn at
    random would miss it by several (each class's count has a standard deviation of about 5 here)."""
    equal = np.bincount(scored_labels(seeds, [50] * 10), minlength=10)
    assert equal.sum() == 256 and set(equal) <= {25, 26}
    assert np.bincount(scored_labels(seeds, [100, 200, 0, 100]), minlength=4).tolist() == [64, 128, 0, 64]
    shares = np.array([3, 7, 1, 9, 5])
    uneven = np.bincount(scored_labels(seeds, shares), minlength=5)
    assert np.all(np.abs(uneven - 256 * shares / shares.sum()) < 1)
    assert set(np.bincount(scored_labels(seeds[:64], [50] * 10), minlength=10)) <= {6, 7}
    assert scored_labels(seeds[:10], [50] * 10) == [s % 10 for s in seeds[:10]]  # equal classes: seed mod K


def test_a_scored_samples_class_depends_on_its_seed_alone():
    """So evaluate's tasks, validation's ranks and any batch size give every sample the same class."""
    seeds, counts = validation_seeds(100), [4, 1, 3]
    whole = scored_labels(seeds, counts)
    assert scored_labels(seeds[1::2], counts) == whole[1::2] and scored_labels(seeds[37:41], counts) == whole[37:41]
    assert counts_per_class({"0": 5, "2": 7}, 3) == [5, 0, 7]
    assert counts_per_class({}, 3) == [1, 1, 1]  # no counts recorded: equal shares


def _probe() -> ProbeFeatures:
    torch.manual_seed(0)
    return ProbeFeatures(ProbeNet(num_classes=3, resolution=8, channels=(4,), feature_dim=5), "cpu")


def _sampler(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels that depend only on each seed."""
    x = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return x.clamp(-1, 1), torch.tensor([s % 3 for s in seeds])


def _decode(x: torch.Tensor) -> np.ndarray:
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_the_score_of_two_ranks_sharing_the_seeds_is_the_score_of_one_rank_with_all():
    probe, seeds = _probe(), list(range(40))
    ref = Reference(np.zeros(5), np.eye(5))
    one = score(_sampler, _decode, probe, ref, seeds, 16, lambda t: t, torch.device("cpu"))
    sent = []
    score(_sampler, _decode, probe, ref, seeds[1::2], 16, lambda t: sent.append(t.clone()) or t, torch.device("cpu"))
    two = score(_sampler, _decode, probe, ref, seeds[0::2], 7, lambda t: t + sent[0], torch.device("cpu"))
    assert two["count"] == one["count"] == 40
    assert two["fd_probe"] == pytest.approx(one["fd_probe"], rel=1e-9)
    assert two["class_accuracy"] == one["class_accuracy"]
    features, predicted = probe.embed(_decode(_sampler(seeds)[0]))  # by hand
    stats = FeatureStats(5)
    stats.add(features)
    assert one["fd_probe"] == pytest.approx(frechet_distance(stats.mean(), stats.cov(), ref.mu, ref.sigma), rel=1e-9)
    assert one["class_accuracy"] == np.mean(predicted == np.arange(40) % 3)


def _weights(value: float):
    return lambda: {"w": torch.full((2,), value)}


def test_watch_keeps_the_best_weights_and_stops_after_patience_validations_above_ratio_x_best():
    watch = Watch(keep_best=True, ratio=2.0, patience=2)
    assert watch.add(0, {"fd_probe": 10.0}, _weights(0))
    assert watch.add(100, {"fd_probe": 4.0}, _weights(1))
    assert not watch.add(200, {"fd_probe": 9.0}, _weights(2)) and watch.worse == 1 and not watch.stopped
    assert not watch.add(300, {"fd_probe": 7.0}, _weights(3)) and watch.worse == 0  # within 2x: the count restarts
    assert not watch.add(400, {"fd_probe": 8.5}, _weights(4)) and not watch.stopped
    assert not watch.add(500, {"fd_probe": 30.0}, _weights(5))
    assert "above 2 x its best (4 at 100 images) for 2 validations" in watch.stopped
    assert watch.best["nimg"] == 100 and torch.equal(watch.best_weights["w"], torch.full((2,), 1.0))
    resumed = Watch(keep_best=True, ratio=2.0, patience=2)
    resumed.load(watch.state())
    assert resumed.state() == watch.state()


def test_watch_without_keep_best_holds_no_weights_and_patience_0_never_stops():
    watch = Watch(keep_best=False, ratio=1.5, patience=0)
    for nimg, fd in enumerate([1.0, 50.0, 60.0, 70.0, 80.0]):
        watch.add(nimg, {"fd_probe": fd}, _weights(nimg))
    assert watch.best_weights is None and watch.best["fd_probe"] == 1.0 and watch.worse == 4 and not watch.stopped


def test_with_keep_last_a_collapse_never_stops_the_run_and_the_last_validation_is_kept():
    """Stopping early would commit the collapsed last student: keep: last runs to its end."""
    last, best = Watch(keep_best=False, ratio=2.0, patience=2), Watch(keep_best=True, ratio=2.0, patience=2)
    for watch in (last, best):
        for nimg, fd in enumerate([4.0, 1.0, 5.0, 6.0, 7.0]):
            watch.add(nimg, {"fd_probe": fd}, _weights(nimg))
    assert last.worse == 3 and not last.stopped and last.kept == last.curve[-1] == {"nimg": 4, "fd_probe": 7.0}
    assert "above 2 x its best (1 at 1 images)" in best.stopped and best.kept == best.best == {"nimg": 1, "fd_probe": 1.0}

"""Validation while a generator trains: its samples on fixed seeds, scored with the probe.

Every rank draws its share of the validation seeds (pipeline/seeds.py, disjoint from evaluate's),
embeds the decoded images with the probe and sums what the metrics need; one all-reduce gives every
rank the same sums, so every rank reaches the same figures, and the same decisions from them
(which checkpoint is best, whether to stop: `Watch`). The training loop (pipeline/trainer.py)
validates where due. No I/O here: the worker loads the probe and its reference statistics and
passes them in (pipeline/distill/student.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import report
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.probe import ProbeFeatures
from pipeline.sampling import Generator
from pipeline.seeds import scored_labels, validation_seeds

Sampler = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]]  # seeds -> (x model space, labels)
Decode = Callable[[torch.Tensor], np.ndarray]  # model space -> uint8 [B, H, W, 3]
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks, in place


@dataclass(frozen=True)
class Reference:
    """The probe's training-image statistics that fd_probe is measured against."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]


def _pack(stats: FeatureStats, correct: int, labelled: int) -> torch.Tensor:
    """[count, correct, labelled, sum (D), sum of outer products (D*D)] as one float64 vector."""
    head = np.array([stats.count, correct, labelled], np.float64)
    return torch.from_numpy(np.concatenate([head, stats.sum, stats.sum_outer.ravel()]))


def _unpack(packed: np.ndarray, dim: int) -> tuple[FeatureStats, int, int]:
    stats = FeatureStats(dim)
    stats.count = int(round(packed[0]))
    stats.sum = packed[3:3 + dim].copy()
    stats.sum_outer = packed[3 + dim:].reshape(dim, dim).copy()
    return stats, int(round(packed[1])), int(round(packed[2]))


def score(sample: Sampler, decode: Decode, probe: ProbeFeatures, reference: Reference, seeds: list[int],
          batch: int, all_reduce: AllReduce, device: torch.device) -> dict[str, float]:
    """fd_probe and class_accuracy (None for an unconditional generator) of the images of `seeds`
    (this rank's share), reduced over every rank; `count` is the number of images behind them."""
    stats, correct, labelled = FeatureStats(probe.dim), 0, 0
    for lo in range(0, len(seeds), batch):
        with torch.no_grad():
            x, labels = sample(seeds[lo:lo + batch])
        features, predicted = probe.embed(decode(x))
        stats.add(features)
        if labels is not None:
            correct += int((predicted == labels.cpu().numpy()).sum())
            labelled += len(predicted)
    packed = all_reduce(_pack(stats, correct, labelled).to(device)).cpu().numpy()
    total, correct, labelled = _unpack(packed, probe.dim)
    return {"fd_probe": frechet_distance(total.mean(), total.cov(), reference.mu, reference.sigma),
            "class_accuracy": correct / labelled if labelled else None, "count": total.count}


@dataclass(frozen=True)
class Validation:
    """What a worker validates with: the probe, its reference statistics, the decoder, its share of the
    seeds, the data's images per class (each seed's class follows from them, seeds.scored_labels; empty:
    unconditional samples) and the images per forward."""

    probe: ProbeFeatures
    reference: Reference
    decode: Decode
    seeds: list[int]
    class_counts: list[int]
    batch: int

    def labels(self, seeds: list[int], device: torch.device) -> torch.Tensor | None:
        return torch.tensor(scored_labels(seeds, self.class_counts), device=device) if self.class_counts else None

    def score(self, generator: Generator, all_reduce: AllReduce, device: torch.device) -> dict[str, float]:
        """The generator's figures on the validation seeds, the same on every rank (`score`)."""
        return score(lambda seeds: generator(seeds, self.labels(seeds, device), device), self.decode, self.probe,
                     self.reference, self.seeds, self.batch, all_reduce, device)

    def grid(self, generator: Generator, device: torch.device) -> np.ndarray:
        """The trackers' picture: samples of the first 8 validation seeds, a row per class (up to 10); an
        unconditional generator's of the first 16, in two rows."""
        seeds = validation_seeds(16)
        classes = generator.net.num_classes
        if not classes:
            return report.grid([list(self.decode(generator(s, None, device)[0])) for s in (seeds[:8], seeds[8:])])
        rows = [generator(seeds[:8], torch.full((8,), c, device=device), device)[0] for c in range(min(classes, 10))]
        return report.grid([list(self.decode(x)) for x in rows])


@dataclass
class Watch:
    """What validation decides over a run: the best validation so far (and the generator's weights
    then, with `keep: best`), and whether to stop early: with `keep: best`, fd_probe above `ratio` x
    its best for `patience` validations in a row is a collapse (patience 0: never stop); with `keep:
    last` nothing stops the run, since the last step's weights are the ones kept. Its `state()` goes
    into every checkpoint, so a resumed run decides exactly as an uninterrupted one."""

    keep_best: bool
    ratio: float
    patience: int
    curve: list[dict[str, Any]] = field(default_factory=list)  # {nimg, fd_probe, class_accuracy, count}
    best: dict[str, Any] | None = None  # the best point of the curve
    best_weights: dict[str, torch.Tensor] | None = None
    worse: int = 0  # validations in a row above ratio x best
    stopped: str = ""  # why the run stopped early ("" while it goes on)

    def add(self, nimg: int, figures: dict[str, Any], weights: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record a validation at `nimg`; True when it is the best so far. `weights` is called only then."""
        point = {"nimg": nimg, **figures}
        self.curve.append(point)
        improved = self.best is None or point["fd_probe"] < self.best["fd_probe"]
        if improved:
            self.best = point
            if self.keep_best:
                self.best_weights = {k: v.detach().cpu().clone() for k, v in weights().items()}
        self.worse = 0 if point["fd_probe"] <= self.ratio * self.best["fd_probe"] else self.worse + 1
        if self.keep_best and self.patience and self.worse >= self.patience:
            self.stopped = (f"validation fd_probe has been above {self.ratio:g} x its best ({self.best['fd_probe']:.4g} "
                            f"at {self.best['nimg']} images) for {self.worse} validations in a row, the last "
                            f"{point['fd_probe']:.4g} at {nimg} images")
        return improved

    @property
    def kept(self) -> dict[str, Any] | None:
        """The validation of the weights kept: the best (keep: best) or the last."""
        return self.best if self.keep_best else (self.curve[-1] if self.curve else None)

    def state(self) -> dict[str, Any]:
        return {"curve": self.curve, "best": self.best, "best_weights": self.best_weights, "worse": self.worse,
                "stopped": self.stopped}

    def load(self, state: dict[str, Any]) -> None:
        self.curve, self.best, self.worse = list(state["curve"]), state["best"], int(state["worse"])
        self.best_weights, self.stopped = state["best_weights"], str(state["stopped"])

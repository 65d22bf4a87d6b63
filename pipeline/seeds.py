"""Which random stream each piece of work draws from.

Randomness is keyed to the work, not to the order it runs in: a training step's stream comes from
(seed, rank, images seen), a sample's from its own seed (pipeline/diffusion/sampler.py: seeded_draws).
torch's generator keeps only a seed's low 32 bits, so the sample seeds split [0, 2^32) into regions
that never meet: evaluation draws sample i from seed i, DMD's regression pairs from PAIRS_SEED_BASE + i
(`pairs.seed`), validation during training from VALIDATION_SEED_BASE + i. A student is then never
scored on the noise it was regressed on, and a model chosen on validation is measured on other images.
The samples that are scored (validation, the teacher's choice, evaluation) take their class from the seed
as well (`scored_labels`): every class in proportion to the data, where drawn labels would vary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

EVALUATION_SEED_LIMIT = 1 << 30  # evaluation's seeds are [0, 2^30)
PAIRS_SEED_BASE = 1 << 30  # pairs.seed's default: pairs in [2^30, 2^31)
VALIDATION_SEED_BASE = 1 << 31  # validation sample i uses seed VALIDATION_SEED_BASE + i, below 2^32


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, images seen, ...): independent streams per tuple."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def evaluation_seeds(start: int, stop: int) -> list[int]:
    """evaluate's seeds for its images [start, stop) of every model (and its grids' first seeds)."""
    return list(range(start, stop))


def validation_seeds(count: int) -> list[int]:
    """The fixed seeds of validation during training: disjoint from evaluation's and the pairs'."""
    return [VALIDATION_SEED_BASE + i for i in range(count)]


def counts_per_class(class_counts: Mapping[str, int], num_classes: int) -> list[int]:
    """The data's images per class (encode's `class_counts`, keyed by the class as a string), for classes
    0..num_classes-1; equal counts where it has none (a network whose classes the data does not list)."""
    counts = [int(class_counts.get(str(c), 0)) for c in range(num_classes)]
    return counts if sum(counts) else [1] * num_classes


@lru_cache(maxsize=8)
def _class_cycle(counts: tuple[int, ...]) -> tuple[int, ...]:
    """One cycle of the classes in proportion to `counts` (over their gcd), interleaved: class c's j-th
    place is at (j + 1/2) / n_c of the cycle (ties to the lower class), so that any run of consecutive
    places holds each class in proportion within about one. Equal counts: 0, 1, ..., K - 1."""
    n = np.asarray(counts, dtype=np.int64) // math.gcd(*counts)
    keys = np.concatenate([(np.arange(k) + 0.5) / k for k in n if k > 0])
    classes = np.repeat(np.arange(len(n)), n)
    return tuple(classes[np.argsort(keys, kind="stable")].tolist())


def scored_labels(seeds: Sequence[int], counts: Sequence[int]) -> list[int]:
    """The class a scored sample (validation, the teacher's choice, evaluation) is drawn for: the seed's
    place in a cycle of the classes in the data's proportions (equal classes: seed mod K). Consecutive seeds
    then hold every class in proportion (256 seeds, 10 equal classes: 25 or 26 each), where labels drawn
    at random move each class's count by about 5 of 256, and with it the samples' mean in the probe's
    features (docs/results.md, "Balanced classes"). A cycle and not, say, the seed's bits reversed: seeds
    that share their low bits share part of torch's first draws from them."""
    cycle = _class_cycle(tuple(int(c) for c in counts))
    return [cycle[int(s) % len(cycle)] for s in seeds]

"""Which random stream each piece of work draws from.

Randomness is keyed to the work, not to the order it runs in: a training step's stream comes from
(seed, rank, images seen), a sample's from its own seed (pipeline/diffusion/sampler.py: seeded_draws).
torch's generator keeps only a seed's low 32 bits, so the sample seeds split [0, 2^32) into regions
that never meet: evaluation draws sample i from seed i, DMD's regression pairs from PAIRS_SEED_BASE + i
(`pairs.seed`), validation during training from VALIDATION_SEED_BASE + i. A student is then never
scored on the noise it was regressed on, and a model chosen on validation is measured on other images.
"""

from __future__ import annotations

import hashlib

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

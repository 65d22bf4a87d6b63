"""Which random stream each piece of work draws from.

Randomness is keyed to the work, not to the order it runs in: a training step's stream comes from
(seed, rank, images seen), a sample's from its own seed. Evaluation draws sample i from seed i;
validation during training draws from seeds of its own, far above any evaluation's, so that a model
chosen on validation is measured on images it was not chosen on.
"""

from __future__ import annotations

import hashlib

VALIDATION_SEED_BASE = 1 << 40  # validation sample i uses seed VALIDATION_SEED_BASE + i


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, images seen, ...): independent streams per tuple."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def evaluation_seeds(start: int, stop: int) -> list[int]:
    """evaluate's seeds for its images [start, stop) of every model (and its grids' first seeds)."""
    return list(range(start, stop))


def validation_seeds(count: int) -> list[int]:
    """The fixed seeds of validation during training: disjoint from `evaluation_seeds` for any run
    of fewer than 2^40 images."""
    return [VALIDATION_SEED_BASE + i for i in range(count)]

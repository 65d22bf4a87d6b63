"""DMD's regression pairs (noise z, teacher output y): made a shard at a time, and read back.

Pair i is the teacher's sample of seed `pairs.seed + i` (its noise, label and Heun trajectory), so the
pairs are the same whatever the number of tasks, workers or nodes. A shard is a WebDataset tar of
`pairs_per_shard` samples (noise.npy, target.npy, cls, seed), committed alone as a piece of the pairs
artifact (tar, then its marker): a rerun after a crash makes only the missing shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import PairsConfig
from pipeline.data.shards import iterate_samples, load_npy, shard_name, write_shard
from pipeline.models.edm2_import import load_guide
from pipeline.sampling import Generator
from pipeline.store import Artifact
from pipeline.weights import load_denoiser

PREFIX = "shards/pairs"


@dataclass(frozen=True)
class PairsJob:
    artifact: Artifact
    teacher: Artifact  # the phema artifact
    weights: str  # the variant's file in it
    guide: str  # URL of the guiding network (folder or EDM2 .pkl), or ""
    cfg: PairsConfig
    device: str


def piece_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def teacher_generator(job: PairsJob, weights: str) -> Generator:
    """The variant `weights` of the phema artifact with the pairs' sampler: Heun steps, guidance and guide."""
    net = load_denoiser(job.teacher, "network", weights).to(job.device)
    guide = load_guide(job.guide).to(job.device) if job.guide else None
    return Generator.teacher(net, job.cfg.num_steps, job.cfg.guidance, guide)


def _pairs(job: PairsJob, gen: Generator, first: int, stop: int) -> Iterator[dict[str, Any]]:
    """Batches end at multiples of `batch` in the global index, so that when pairs_per_shard is a
    multiple of it, every pair is computed in the same batch (bit for bit) whatever the shard layout."""
    batch, lo = job.cfg.batch, first
    while lo < stop:
        hi = min((lo // batch + 1) * batch, stop)
        seeds = list(range(job.cfg.seed + lo, job.cfg.seed + hi))
        lo = hi
        out = gen.sample(seeds, device=job.device)
        for i, seed in enumerate(seeds):
            yield {"key": f"{seed - job.cfg.seed:08d}", "noise": out.noise[i].cpu().numpy(),
                   "target": out.x[i].cpu().numpy(), "cls": -1 if out.labels is None else int(out.labels[i]),
                   "seed": seed}


def make_shard(job: PairsJob, shard: int) -> int:
    """Sample and commit one shard of pairs (skipped if committed); returns pairs made."""
    if job.artifact.piece_done(piece_name(shard)):
        return 0
    gen = teacher_generator(job, job.weights)
    first = shard * job.cfg.pairs_per_shard
    stop = min(first + job.cfg.pairs_per_shard, job.cfg.num_pairs)
    count = write_shard(job.artifact.path(shard_name(PREFIX, shard)), _pairs(job, gen, first, stop))
    job.artifact.commit_piece(piece_name(shard), {"count": count, "first": first}, files=[shard_name(PREFIX, shard)])
    return count


def read_pairs(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(noise, target, labels, seeds) of one pairs shard, in order (for tests and inspection)."""
    samples = list(iterate_samples(url))
    noise = np.stack([load_npy(s["noise.npy"]) for s in samples])
    target = np.stack([load_npy(s["target.npy"]) for s in samples])
    labels = np.array([int(s["cls"]) for s in samples])
    seeds = np.array([int(s["seed"]) for s in samples])
    return noise, target, labels, seeds

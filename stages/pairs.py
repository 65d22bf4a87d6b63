"""pairs: DMD's regression pairs (noise z, teacher output y) from the multi-step sampler.

    onestep run --config ci --until pairs --storage /tmp/onestep

Pair i uses seed `pairs.seed + i` for its noise and label, so the pairs are the same whatever
the number of tasks, workers or nodes. Each task makes one shard of `pairs_per_shard` pairs and
commits it alone (tar, then its marker): a rerun after a crash makes only the missing shards.

The teacher is one phema variant: `select: fixed` takes the one at `sigma_rel`; `select: best` samples
`select_images` validation seeds (pipeline/seeds.py, apart from evaluate's) with every variant, a
task each, scores them with the probe and takes the lowest fd_probe. The manifest records the
teacher and every variant's figures; distill (and DMD2, with no pairs) uses that teacher.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch

from pipeline import store
from pipeline.config import PairsConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import encoder_from_info
from pipeline.data.shards import iterate_samples, load_npy, shard_name, write_shard
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import Resources
from pipeline.metrics.probe import ProbeFeatures
from pipeline.metrics.validation import score
from pipeline.models.edm2 import Denoiser
from pipeline.seeds import counts_per_class, scored_labels, validation_seeds
from pipeline.store import Artifact
from pipeline.models.edm2_release import check_guide, load_guide
from pipeline.weights import load_network, load_probe, load_reference

VERSION = "3"  # 2: select: best; 3: the variants' samples in the data's class proportions (seeds.scored_labels)
UPSTREAM = ("encode", "probe", "phema")
UPSTREAM_IF = {"encode": ("select", "best"), "probe": ("select", "best")}  # only the teacher's choice reads them
PIECEWISE = True  # a rerun makes only the pieces not committed: `onestep run --repair` remakes damaged ones
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


def _load(job: PairsJob, weights: str) -> tuple[Denoiser, Denoiser | None]:
    net = load_network(job.teacher, "network", weights).to(job.device)
    guide = load_guide(job.guide).to(job.device) if job.guide else None
    return net, guide


def _sample(job: PairsJob, net: Denoiser, guide: Denoiser | None, seeds: list[int],
            classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(noise, the teacher's sample, labels) of `seeds`, with this stage's sampler; `classes`, if given,
    replace the labels drawn from the seeds."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise, labels = seeded_noise(seeds, shape, net.num_classes, job.device, classes)
    with torch.no_grad():
        out = edm_sampler(net, noise, labels, num_steps=job.cfg.num_steps, guidance=job.cfg.guidance, guide=guide)
    return noise, out, labels


def _pairs(job: PairsJob, net: Denoiser, guide: Denoiser | None, first: int, stop: int) -> Iterator[dict[str, Any]]:
    """Batches end at multiples of `batch` in the global index, so that when pairs_per_shard is a
    multiple of it, every pair is computed in the same batch (bit for bit) whatever the shard layout."""
    batch, lo = job.cfg.batch, first
    while lo < stop:
        hi = min((lo // batch + 1) * batch, stop)
        seeds = list(range(job.cfg.seed + lo, job.cfg.seed + hi))
        lo = hi
        noise, target, labels = _sample(job, net, guide, seeds)
        for i, seed in enumerate(seeds):
            yield {"key": f"{seed - job.cfg.seed:08d}", "noise": noise[i].cpu().numpy(),
                   "target": target[i].cpu().numpy(), "cls": -1 if labels is None else int(labels[i]), "seed": seed}


def make_shard(job: PairsJob, shard: int) -> int:
    """Sample and commit one shard of pairs (skipped if committed); returns pairs made."""
    if job.artifact.piece_done(piece_name(shard)):
        return 0
    net, guide = _load(job, job.weights)
    first = shard * job.cfg.pairs_per_shard
    stop = min(first + job.cfg.pairs_per_shard, job.cfg.num_pairs)
    count = write_shard(job.artifact.path(shard_name(PREFIX, shard)), _pairs(job, net, guide, first, stop))
    job.artifact.commit_piece(piece_name(shard), {"count": count, "first": first}, files=[shard_name(PREFIX, shard)])
    return count


def score_variant(job: PairsJob, probe: Artifact, encode: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """fd_probe and class accuracy of one variant's samples of the first `select_images` validation seeds,
    their classes in the data's proportions (`encode`: encode's manifest outputs)."""
    net, guide = _load(job, variant["file"])
    decode = encoder_from_info(encode["encoder"], job.device).decode
    counts = counts_per_class(encode, net.num_classes)
    figures = score(lambda seeds: _sample(job, net, guide, seeds, scored_labels(seeds, counts) if counts else None)[1:],
                    decode,
                    ProbeFeatures(load_probe(probe), job.device), load_reference(probe),
                    validation_seeds(job.cfg.select_images), job.cfg.batch, lambda t: t, torch.device(job.device))
    return {"sigma_rel": variant["sigma_rel"], **figures}


def _variant(phema: Artifact, sigma_rel: float) -> dict[str, Any]:
    variants = phema.manifest()["outputs"]["variants"]
    for v in variants:
        if math.isclose(v["sigma_rel"], sigma_rel, rel_tol=1e-6):
            return v
    raise ValueError(f"pairs.sigma_rel = {sigma_rel} is not among the phema variants "
                     f"{[v['sigma_rel'] for v in variants]}: add it to phema.sigma_rels or pick one of these")


def select_teacher(ctx: StageContext, job: PairsJob, inputs: dict[str, Artifact],
                   resources: Resources) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The variant with the lowest validation fd_probe (ties: the first), and every variant's figures."""
    variants = inputs["phema"].manifest()["outputs"]["variants"]
    if len(variants) == 1:
        return variants[0], []
    encode = inputs["encode"].manifest()["outputs"]
    scores = ctx.map(partial(score_variant, job, inputs["probe"], encode), variants, resources, desc="pairs: select")
    best = min(range(len(variants)), key=lambda i: scores[i]["fd_probe"])
    table = ", ".join(f"{s['sigma_rel']:g}: {s['fd_probe']:.4g}" for s in scores)
    ctx.log.info("pairs: teacher sigma_rel %g, the lowest validation fd_probe over %d images (%s)",
                 variants[best]["sigma_rel"], job.cfg.select_images, table)
    return variants[best], scores


def run(ctx: StageContext, cfg: PairsConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, spread=cfg.spread)
    ctx.executor.check(resources, "pairs")
    guide = store.normalize_url(cfg.guide) if cfg.guide else ""
    if guide:
        check_guide(guide, "pairs.guide")
    job = PairsJob(ctx.artifact, inputs["phema"], "", guide, cfg, "cuda" if cfg.num_gpus > 0 else "cpu")
    variant, scores = (select_teacher(ctx, job, inputs, resources) if cfg.select == "best"
                       else (_variant(inputs["phema"], cfg.sigma_rel), []))
    job = dataclasses.replace(job, weights=variant["file"])
    num_shards = math.ceil(cfg.num_pairs / cfg.pairs_per_shard)
    todo = [s for s in range(num_shards) if not ctx.artifact.piece_done(piece_name(s))]
    ctx.log.info("pairs: %d pairs, %d Heun steps, %d shards (%d to make)", cfg.num_pairs, cfg.num_steps,
                 num_shards, len(todo))
    made = sum(ctx.map(partial(make_shard, job), todo, resources, desc="pairs"))
    return {
        "num_pairs": cfg.num_pairs,
        "num_shards": num_shards,
        "shards": [shard_name(PREFIX, s) for s in range(num_shards)],
        "pairs_made_this_run": made,
        "teacher": {"sigma_rel": variant["sigma_rel"], "file": variant["file"],
                    "chosen_by": "the lowest validation fd_probe of the variants" if scores else "pairs.sigma_rel"},
        "selection": scores,  # select: best: every variant's validation figures
        "nfe_per_pair": 2 * cfg.num_steps - 1,
    }


def read_pairs(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(noise, target, labels, seeds) of one pairs shard, in order (for tests and inspection)."""
    samples = list(iterate_samples(url))
    noise = np.stack([load_npy(s["noise.npy"]) for s in samples])
    target = np.stack([load_npy(s["target.npy"]) for s in samples])
    labels = np.array([int(s["cls"]) for s in samples])
    seeds = np.array([int(s["seed"]) for s in samples])
    return noise, target, labels, seeds

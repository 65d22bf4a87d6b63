"""pairs: DMD's regression pairs (noise z, teacher output y) from the multi-step sampler.

    onestep run --config ci --until pairs --storage /tmp/onestep

Pair i uses seed `pairs.seed + i` for its noise and label, so the pairs are the same whatever
the number of tasks, workers or nodes. Each task makes one shard of `pairs_per_shard` pairs
(pipeline/pairs.py) and commits it alone (tar, then its marker): a rerun after a crash makes only the missing shards.

The teacher is one phema variant: `select: fixed` takes the one at `sigma_rel`; `select: best` samples
`select_images` validation seeds (pipeline/seeds.py, apart from evaluate's) with every variant, a
task each, scores them with the probe and takes the lowest fd_probe. The manifest records the
teacher and every variant's figures; distill (and DMD2, with no pairs) uses that teacher.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import torch

from pipeline import store
from pipeline.config import PairsConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import encoder_from_info
from pipeline.data.shards import shard_name
from pipeline.executor import Resources
from pipeline.metrics.probe import ProbeFeatures
from pipeline.metrics.validation import Validation
from pipeline.outputs import ChosenTeacher, EncodeOutputs, PairsOutputs, PhemaOutputs, Variant
from pipeline.models.edm2_import import check_guide
from pipeline.pairs import PREFIX, PairsJob, make_shard, piece_name, teacher_generator
from pipeline.seeds import counts_per_class, validation_seeds
from pipeline.store import Artifact
from pipeline.weights import load_probe, load_reference


def score_variant(job: PairsJob, probe: Artifact, encode: EncodeOutputs, variant: Variant) -> dict[str, Any]:
    """fd_probe and class accuracy of one variant's samples of the first `select_images` validation seeds,
    their classes in the data's proportions."""
    gen = teacher_generator(job, variant.file)
    validation = Validation(ProbeFeatures(load_probe(probe), job.device), load_reference(probe),
                            encoder_from_info(encode.encoder, job.device).decode,
                            validation_seeds(job.cfg.select_images),
                            counts_per_class(encode.class_counts, gen.net.num_classes), job.cfg.batch)
    return {"sigma_rel": variant.sigma_rel, **validation.score(gen, lambda t: t, torch.device(job.device))}


def _variant(phema: PhemaOutputs, sigma_rel: float) -> Variant:
    found = phema.variant(sigma_rel)
    if found is None:
        raise ValueError(f"pairs.sigma_rel = {sigma_rel} is not among the phema variants "
                         f"{[v.sigma_rel for v in phema.variants]}: add it to phema.sigma_rels or pick one of these")
    return found


def select_teacher(ctx: StageContext, job: PairsJob, inputs: dict[str, Artifact],
                   resources: Resources) -> tuple[Variant, list[dict[str, Any]]]:
    """The variant with the lowest validation fd_probe (ties: the first), and every variant's figures."""
    variants = PhemaOutputs.read(inputs["phema"]).variants
    if len(variants) == 1:
        return variants[0], []
    encode = EncodeOutputs.read(inputs["encode"])
    scores = ctx.map(partial(score_variant, job, inputs["probe"], encode), variants, resources, desc="pairs: select")
    best = min(range(len(variants)), key=lambda i: scores[i]["fd_probe"])
    table = ", ".join(f"{s['sigma_rel']:g}: {s['fd_probe']:.4g}" for s in scores)
    ctx.log.info("pairs: teacher sigma_rel %g, the lowest validation fd_probe over %d images (%s)",
                 variants[best].sigma_rel, job.cfg.select_images, table)
    return variants[best], scores


def run(ctx: StageContext, cfg: PairsConfig, inputs: dict[str, Artifact]) -> PairsOutputs:
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, spread=cfg.spread)
    ctx.executor.check(resources, "pairs")
    guide = store.normalize_url(cfg.guide) if cfg.guide else ""
    if guide:
        check_guide(guide, "pairs.guide")
    job = PairsJob(ctx.artifact, inputs["phema"], "", guide, cfg, "cuda" if cfg.num_gpus > 0 else "cpu")
    variant, scores = (select_teacher(ctx, job, inputs, resources) if cfg.select == "best"
                       else (_variant(PhemaOutputs.read(inputs["phema"]), cfg.sigma_rel), []))
    job = dataclasses.replace(job, weights=variant.file)
    num_shards = math.ceil(cfg.num_pairs / cfg.pairs_per_shard)
    todo = [s for s in range(num_shards) if not ctx.artifact.piece_done(piece_name(s))]
    ctx.log.info("pairs: %d pairs, %d Heun steps, %d shards (%d to make)", cfg.num_pairs, cfg.num_steps,
                 num_shards, len(todo))
    made = sum(ctx.map(partial(make_shard, job), todo, resources, desc="pairs"))
    chosen_by = "the lowest validation fd_probe of the variants" if scores else "pairs.sigma_rel"
    return PairsOutputs(num_pairs=cfg.num_pairs, num_shards=num_shards,
                        shards=[shard_name(PREFIX, s) for s in range(num_shards)], pairs_made_this_run=made,
                        teacher=ChosenTeacher(variant.sigma_rel, variant.file, chosen_by), selection=scores,
                        nfe_per_pair=2 * cfg.num_steps - 1)


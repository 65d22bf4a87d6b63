"""phema: post-hoc EMA variants of the teacher, one per target sigma_rel.

    onestep run --config ci --until phema --storage /tmp/onestep

Each variant is a weighted sum of the teacher's EMA snapshots taken at or before `phema.nimg`
(docs/algorithms.md, "Power-function EMA and post-hoc EMA"). A task streams the snapshots
once for a group of targets, so it holds about (targets + 1) models in memory; each variant
commits alone (file, then marker), so a rerun after a crash makes only the missing ones.
Load one with `weights.load_denoiser(artifact, "network", weights=variant["file"])`. The snapshots
may be EDM2's own (`teacher.source: edm2-snapshots`), streamed from where they are; a released
post-hoc reconstruction (`edm2-release`) is the one variant, of the EMA length in its name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import PhemaConfig
from pipeline.dag import StageContext
from pipeline.diffusion.phema import reconstruct, solve_coefficients
from pipeline.executor import Resources
from pipeline.outputs import PhemaOutputs, TeacherOutputs, Variant
from pipeline.store import Artifact
from pipeline.weights import read_weights, weights_bytes
from pipeline.models import edm2_import



def piece_name(sigma_rel: float) -> str:
    return f"variant-{sigma_rel:.4f}"


@dataclass(frozen=True)
class Target:
    """One variant to make: its EMA length and the weight of each snapshot used (a column of X)."""

    sigma_rel: float
    weights: tuple[float, ...]


@dataclass(frozen=True)
class PhemaJob:
    """What every task shares (picklable): where to write, which snapshots, at what time."""

    artifact: Artifact
    snapshot_urls: tuple[str, ...]  # in the order of the coefficients' rows
    nimg: int


def select_snapshots(snapshots: list[dict[str, Any]], nimg: int) -> tuple[int, list[dict[str, Any]]]:
    """(target time, the snapshots at or before it); a ValueError naming the fix otherwise."""
    times = sorted({s["nimg"] for s in snapshots})
    last = times[-1] if times else 0
    target = nimg or last
    if target > last:
        raise ValueError(f"phema.nimg = {nimg} is after the teacher's last snapshot ({last} images): "
                         f"set phema.nimg to one of {times}, or 0 for the last one")
    used = [s for s in snapshots if s["nimg"] <= target]
    if len(used) < 2:
        raise ValueError(f"phema needs at least two teacher snapshots at or before {target} images, found "
                         f"{len(used)} (snapshot times: {times}): raise phema.nimg, or train the teacher "
                         "longer / lower teacher.snapshot_nimg")
    if target not in times:
        raise ValueError(f"phema.nimg = {nimg} is not a snapshot time, so no snapshot covers the images "
                         f"after {max(s['nimg'] for s in used)}: set phema.nimg to one of {times}")
    return target, used


def coefficients(used: list[dict[str, Any]], nimg: int, sigma_rels: tuple[float, ...]) -> np.ndarray:
    """[n_used, n_targets] snapshot weights of each target profile at time nimg (EDM2, Algorithm 3: A X = B)."""
    names = [PhemaOutputs.variant_file(s) for s in sigma_rels]
    if len(set(names)) != len(names):
        raise ValueError(f"phema.sigma_rels {list(sigma_rels)} name the same file twice "
                         "(files keep 4 decimals): remove the duplicates")
    try:
        x = solve_coefficients([s["nimg"] for s in used], [s["sigma_rel"] for s in used],
                               [nimg] * len(sigma_rels), sigma_rels)
    except (ValueError, np.linalg.LinAlgError) as e:
        raise ValueError(f"phema: cannot solve the post-hoc EMA weights of sigma_rels {list(sigma_rels)} at "
                         f"{nimg} images from the teacher's snapshots: {e}") from e
    if not np.isfinite(x).all():
        raise ValueError(f"phema: the post-hoc EMA weights at {nimg} images are not finite (snapshots "
                         "that duplicate each other?): check the teacher's snapshots/index.json")
    return x


def _snapshot_stream(urls: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Each snapshot read only when reconstruct asks for the next one (an EDM2 .pkl or onestep's file)."""
    for url in urls:
        yield edm2_import.snapshot_state(url) if url.endswith(".pkl") else read_weights(url)


def _pending(artifact: Artifact, targets: list[Target]) -> list[Target]:
    return [t for t in targets if not artifact.piece_done(piece_name(t.sigma_rel))]


def make_variants(job: PhemaJob, targets: list[Target]) -> list[float]:
    """Reconstruct, write and commit each target not yet committed; returns the sigma_rels made."""
    todo = _pending(job.artifact, targets)
    if not todo:
        return []
    weights = np.array([t.weights for t in todo]).T  # [n_snapshots, n_todo]
    for target, state in zip(todo, reconstruct(_snapshot_stream(job.snapshot_urls), weights)):
        name = PhemaOutputs.variant_file(target.sigma_rel)
        with job.artifact.open(name, "wb") as f:
            f.write(weights_bytes(state))
        job.artifact.commit_piece(piece_name(target.sigma_rel), {"sigma_rel": target.sigma_rel, "file": name,
                                                                 "nimg": job.nimg}, files=[name])
    return [t.sigma_rel for t in todo]


def released_variant(artifact: Artifact, cfg: PhemaConfig, teacher: Artifact, release: dict[str, Any]) -> dict[str, Any]:
    """A released post-hoc reconstruction is one variant, of the EMA length in its name: it is copied."""
    sigma_rel = release["sigma_rel"]
    name = PhemaOutputs.variant_file(sigma_rel)
    if [PhemaOutputs.variant_file(s) for s in cfg.sigma_rels] != [name]:
        raise ValueError(f"teacher.release is a post-hoc reconstruction of sigma_rel {sigma_rel}, the one variant there "
                         f"is: set phema.sigma_rels=[{sigma_rel}] (and pairs.sigma_rel={sigma_rel}), or give "
                         "teacher.source=edm2-snapshots a folder of raw snapshots to reconstruct others")
    if not artifact.piece_done(piece_name(sigma_rel)):
        with teacher.open(TeacherOutputs.file("network")) as src, artifact.open(name, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        artifact.commit_piece(piece_name(sigma_rel), {"sigma_rel": sigma_rel, "file": name, "nimg": release["nimg"]},
                              files=[name])
    return {"variants": [Variant(**artifact.read_piece(piece_name(sigma_rel)))], "nimg": release["nimg"],
            "snapshots_used": []}


def run(ctx: StageContext, cfg: PhemaConfig, inputs: dict[str, Artifact]) -> PhemaOutputs:
    teacher = TeacherOutputs.read(inputs["teacher"])
    if teacher.source == "edm2-release":
        ctx.artifact.write_json(PhemaOutputs.file("config"), teacher.network)
        return PhemaOutputs(**released_variant(ctx.artifact, cfg, inputs["teacher"], teacher.release),
                            network=teacher.network, made_this_run=[])
    nimg, used = select_snapshots(teacher.snapshots, cfg.nimg)
    x = coefficients(used, nimg, cfg.sigma_rels)
    resources = Resources(num_cpus=cfg.num_cpus)
    ctx.executor.check(resources, "phema")
    targets = [Target(float(s), tuple(map(float, x[:, j]))) for j, s in enumerate(cfg.sigma_rels)]
    todo = _pending(ctx.artifact, targets)
    ctx.log.info("phema: %d variants at %d images from %d snapshots (%d to make)",
                 len(targets), nimg, len(used), len(todo))
    urls = tuple(s.get("url") or inputs["teacher"].path(s["file"]) for s in used)  # released snapshots: a URL
    job = PhemaJob(ctx.artifact, urls, nimg)
    groups = [todo[i:i + cfg.targets_per_task] for i in range(0, len(todo), cfg.targets_per_task)]
    made = ctx.map(partial(make_variants, job), groups, resources, desc="phema")
    ctx.artifact.write_json(PhemaOutputs.file("config"), teacher.network)
    return PhemaOutputs(variants=[Variant(**ctx.artifact.read_piece(piece_name(t.sigma_rel))) for t in targets],
                        nimg=nimg, network=teacher.network, snapshots_used=used,
                        made_this_run=[s for group in made for s in group])

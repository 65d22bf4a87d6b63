"""Evaluation: every model's images on the same seeds, embedded in feature networks, reduced to metrics.

A task (`evaluate_range`) takes one model's images [start, stop): sample i of every model uses seed i,
its class from `seeds.scored_labels`; the real row reads the probe's held-out images instead. It
returns a tally: the probe's features and hits, and float64 feature sums per pretrained network. The
driver adds up a model's tallies (`score`) into one row of the table: fd_probe, class_accuracy,
precision, recall, and fd_{network} against refstats' statistics (report.METRICS). Nothing here writes:
the evaluate stage and workflows/seedsets.py run the tasks and use the rows.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline import report
from pipeline.data.encoders import decode_images, encoder_from_info
from pipeline.data.shards import read_samples
from pipeline.data.split import read_split, stratified
from pipeline.diffusion.dmd import SIGMA_MAX
from pipeline.metrics.features import worker_feature_network
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.probe import ProbeFeatures
from pipeline.outputs import DistillOutputs, PhemaOutputs
from pipeline.sampling import Generator
from pipeline.seeds import evaluation_seeds, mix_seed, scored_labels
from pipeline.store import Artifact
from pipeline.weights import load_denoiser
from pipeline.weights import load_probe

Result = dict[str, Any]  # what a task returns: model, count, features, correct, labelled, stats, grid, real, seconds


@dataclass(frozen=True)
class Model:
    """One row of the table: a network to sample (weights in an artifact), or held-out real images."""

    name: str  # teacher | student | real
    artifact: Artifact | None
    weights: str  # file in the artifact
    sigma_rel: float | None
    num_steps: int  # Heun steps of a teacher; the student's steps (1, or DMD2's 2 or 4); 0 for real images
    sigmas: tuple[float, ...] = ()  # a multi-step student's noise levels

    @property
    def label(self) -> str:
        if self.name == "teacher":
            return f"teacher sigma_rel={self.sigma_rel:.3f}"
        if self.name == "student":
            return f"student ({self.num_steps} step{'s' if self.num_steps > 1 else ''})"
        return "real (held-out)"

    @property
    def nfe(self) -> int:
        return {"teacher": 2 * self.num_steps - 1, "student": self.num_steps, "real": 0}[self.name]

    @property
    def config_name(self) -> str:
        """The network's config file in the artifact: `student.json` or `network.json`."""
        return "student" if self.name == "student" else "network"

    def load(self, device: str = "cpu") -> torch.nn.Module:
        """The network of a teacher or student row, in eval mode on `device`."""
        return load_denoiser(self.artifact, self.config_name, self.weights).to(device)

    def generator(self, net: torch.nn.Module) -> Generator:
        """How this row samples `net`: the Heun sampler for a teacher, the student's own noise levels."""
        if self.name == "teacher":
            return Generator.teacher(net, self.num_steps)
        return Generator.student(net, self.sigmas or (SIGMA_MAX,))


def teacher_models(phema: Artifact, num_steps: int) -> list[Model]:
    """A row per phema variant, by sigma_rel, each sampled with `num_steps` Heun steps."""
    variants = PhemaOutputs.read(phema).variants
    return [Model("teacher", phema, v.file, v.sigma_rel, num_steps) for v in sorted(variants, key=lambda v: v.sigma_rel)]


def student_model(distill: Artifact) -> Model:
    """The distilled student: its step count and noise levels from the distill manifest."""
    student = DistillOutputs.read(distill).student
    return Model("student", distill, student.file, None, student.nfe, tuple(student.sigmas))


@dataclass(frozen=True)
class EvalJob:
    """What every task shares (picklable, small but for the held-out list)."""

    models: list[Model]
    encoder: dict[str, Any]
    networks: dict[str, str]  # pretrained feature network -> weights (from refstats)
    probe: Artifact | None
    heldout: dict[str, np.ndarray]  # the real row's samples, in order: shard, position, index, label
    shard_urls: list[str]
    grid_classes: list[int | None]  # one grid row each (None: an unconditional row)
    grid_columns: int
    batch: int
    seed: int
    device: str
    class_counts: list[int] = field(default_factory=list)  # the data's images per class: the samples' classes


def generate(model: Model, net: torch.nn.Module, seeds: list[int], encoder: Any, device: str,
             classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images [B, H, W, 3], labels [B] or None) of these seeds; `classes`, if given, replace the labels."""
    x, labels = model.generator(net)(seeds, classes, device)
    return encoder.decode(x), None if labels is None else labels.cpu().numpy()


def real_images(job: EvalJob, start: int, stop: int, encoder: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Held-out real images [start, stop) of the probe's split, shard by shard: (uint8 images, labels)."""
    rows = {k: v[start:stop] for k, v in job.heldout.items()}
    for shard in np.unique(rows["shard"]):
        wanted = set(rows["index"][rows["shard"] == shard].tolist())
        _, positions, stored, labels = read_samples(job.shard_urls[shard], wanted)
        seeds = [mix_seed(job.seed, int(shard), int(p)) for p in positions]  # as the probe decoded them
        for lo in range(0, len(stored), job.batch):
            images = decode_images(encoder, torch.from_numpy(stored[lo:lo + job.batch]).to(job.device),
                                   seeds[lo:lo + job.batch])
            yield images, labels[lo:lo + job.batch]


@lru_cache(maxsize=2)
def worker_probe(probe: Artifact, device: str) -> ProbeFeatures:
    """The trained probe, loaded once per process."""
    return ProbeFeatures(load_probe(probe), device)


class Tally:
    """What a task accumulates over its images: the probe's features and hits, and feature sums."""

    def __init__(self, job: EvalJob) -> None:
        self.probe = worker_probe(job.probe, job.device) if job.probe else None
        self.nets = {name: worker_feature_network(name, weights, job.device) for name, weights in job.networks.items()}
        self.stats = {name: FeatureStats(net.dim) for name, net in self.nets.items()}
        self.features: list[np.ndarray] = []
        self.count = self.correct = self.labelled = 0

    def add(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        self.count += len(images)
        if self.probe is not None:
            features, predicted = self.probe.embed(images)
            self.features.append(features.astype(np.float32))
            if labels is not None:
                self.correct += int((predicted == labels).sum())
                self.labelled += len(labels)
        for name, net in self.nets.items():
            self.stats[name].add(net.features(images))

    def result(self) -> Result:
        features = np.concatenate(self.features) if self.features else None
        return {"count": self.count, "features": features, "correct": self.correct, "labelled": self.labelled,
                "stats": {name: s.to_dict() for name, s in self.stats.items()}}


def _model_grid(job: EvalJob, model: Model, net: torch.nn.Module, encoder: Any) -> list[list[np.ndarray]]:
    """One row per grid class: seeds 0..columns-1 with the label set to that class (the same noise
    in every row), or for unconditional models, the next `columns` seeds."""
    rows = []
    for r, c in enumerate(job.grid_classes):
        first = 0 if c is not None else r * job.grid_columns
        seeds = list(range(first, first + job.grid_columns))
        images, _ = generate(model, net, seeds, encoder, job.device, None if c is None else [c] * len(seeds))
        rows.append(list(images))
    return rows


def _keep_grid_images(images: np.ndarray, labels: np.ndarray, job: EvalJob, found: dict[Any, list[np.ndarray]]) -> None:
    """Keep real images for the grids: up to `grid_columns` of each grid class (unconditional: any
    class, a whole grid's worth under the key None)."""
    conditional = job.grid_classes[0] is not None
    limit = job.grid_columns if conditional else job.grid_columns * len(job.grid_classes)
    for image, label in zip(images, labels):
        key = int(label) if conditional else None
        if key in job.grid_classes and len(found.setdefault(key, [])) < limit:
            found[key].append(image)


def evaluate_range(job: EvalJob, item: tuple[int, int, int]) -> Result:
    """One model's images [start, stop): the tally, its grid (first task of a generated model) or
    the real images of the grid classes among them, and the task's time."""
    index, start, stop = item
    model = job.models[index]
    begin = time.perf_counter()
    encoder = encoder_from_info(job.encoder, job.device)
    tally, grid, real = Tally(job), None, {}
    if model.name == "real":
        for images, labels in real_images(job, start, stop, encoder):
            tally.add(images, labels)
            _keep_grid_images(images, labels, job, real)
    else:
        net = model.load(job.device)
        for lo in range(start, stop, job.batch):
            seeds = evaluation_seeds(lo, min(lo + job.batch, stop))
            classes = scored_labels(seeds, job.class_counts) if job.class_counts else None
            tally.add(*generate(model, net, seeds, encoder, job.device, classes))
        grid = _model_grid(job, model, net, encoder) if start == 0 else None
    return {"model": index, **tally.result(), "grid": grid, "real": real, "seconds": time.perf_counter() - begin}


def grid_classes(num_classes: int, rows: int) -> list[int | None]:
    """Up to `rows` classes spread evenly over the dataset's (all None for an unconditional model)."""
    if num_classes == 0:
        return [None] * rows
    return sorted({int(round(c)) for c in np.linspace(0, num_classes - 1, min(rows, num_classes))})


def _real_rows(job: EvalJob, results: list[Result]) -> list[list[np.ndarray]]:
    """The real images beside every grid: per grid class in task order (unconditional: rows of any class)."""
    found: dict[Any, list[np.ndarray]] = {}
    for r in results:
        for key, images in r["real"].items():
            found.setdefault(key, []).extend(images)
    if job.grid_classes[0] is None:
        flat, cols = found.get(None, []), job.grid_columns
        return [flat[i:i + cols] for i in range(0, len(flat), cols)][:len(job.grid_classes)]
    return [found.get(c, [])[:job.grid_columns] for c in job.grid_classes]


def grid_pngs(job: EvalJob, results: list[Result]) -> list[bytes | None]:
    """Each model's grid as PNG bytes, real images beside its rows; the real row's own grid is None when
    no held-out image is of a grid class."""
    real = _real_rows(job, [r for r in results if job.models[r["model"]].name == "real"])
    pngs: list[bytes | None] = []
    for i, model in enumerate(job.models):
        if model.name == "real":
            pngs.append(report.class_grid_png(real) if any(real) else None)
            continue
        [grid] = [r["grid"] for r in results if r["model"] == i and r["grid"] is not None]
        pngs.append(report.class_grid_png(grid, real))
    return pngs


@dataclass(frozen=True)
class References:
    """What the driver compares each model with: the probe's training-set features and the refstats."""

    probe_mu: np.ndarray | None
    probe_sigma: np.ndarray | None
    probe_features: np.ndarray | None  # [n, D] precision/recall's real manifold
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # network -> (mu, sigma)


def _npz(artifact: Artifact, name: str) -> dict[str, np.ndarray]:
    return dict(np.load(io.BytesIO(artifact.read_bytes(name))))


def references(probe: Artifact | None, refstats: Artifact, networks: dict[str, Any]) -> References:
    """The probe's reference statistics (none without a probe) and those of each refstats network."""
    ref = _npz(probe, "reference.npz") if probe else {}
    stats = {}
    for name, info in networks.items():
        npz = _npz(refstats, info["file"])
        stats[name] = (npz["mu"], npz["sigma"])
    return References(ref.get("mu"), ref.get("sigma"), ref.get("features"), stats)


def _probe_metrics(results: list[Result], refs: References) -> dict[str, float | None]:
    features = np.concatenate([r["features"] for r in results]).astype(np.float64)
    stats = FeatureStats(features.shape[1])
    stats.add(features)
    labelled = sum(r["labelled"] for r in results)
    reference = refs.probe_features[:len(features)]
    precision, recall = precision_recall(reference, features[:len(reference)])
    return {"fd_probe": frechet_distance(stats.mean(), stats.cov(), refs.probe_mu, refs.probe_sigma),
            "class_accuracy": sum(r["correct"] for r in results) / labelled if labelled else None,
            "precision": precision, "recall": recall}


def score(model: Model, results: list[Result], refs: References) -> dict[str, Any]:
    """One model's row: every metric (None where it is not computed), count and task time."""
    row: dict[str, Any] = {"model": model.name, "label": model.label, "sigma_rel": model.sigma_rel,
                           "steps": model.num_steps, "nfe": model.nfe}
    row.update(dict.fromkeys(report.METRICS))
    if refs.probe_mu is not None:
        row.update(_probe_metrics(results, refs))
    for name, (mu, sigma) in refs.stats.items():
        stats = sum((FeatureStats.from_dict(r["stats"][name]) for r in results[1:]),
                    FeatureStats.from_dict(results[0]["stats"][name]))
        row[f"fd_{name}"] = frechet_distance(stats.mean(), stats.cov(), mu, sigma)
    row["count"] = sum(r["count"] for r in results)
    row["seconds"] = round(sum(r["seconds"] for r in results), 2)
    return row


def select_heldout(probe: Artifact, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded sample of `num_images` of the probe's held-out images, every class in proportion (a
    folder is encoded class by class: its first held-out images are a few classes), in index order."""
    split = read_split(probe)
    held = split.column("holdout").to_numpy(zero_copy_only=False)
    columns = {k: split.column(k).to_numpy()[held] for k in ("shard", "position", "index", "label")}
    chosen = stratified(columns["label"], num_images, seed)
    return {k: v[chosen] for k, v in columns.items()}

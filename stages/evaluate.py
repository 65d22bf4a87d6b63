"""evaluate: every model on the same seeds, fanned out as Ray tasks over (model, seed range), and a report.

    onestep run --config ci --until evaluate --storage /tmp/onestep

The models: every teacher variant made by phema (EDM Heun sampler, `eval.num_steps`), the one-step
student, and the probe's held-out real images as the ceiling row. Sample i of every model uses
seed i. Each task returns the probe's features and predictions of its images, and float64 feature
sums in each pretrained network that refstats has statistics for; the driver reduces them into one
table, `results.json` (pipeline/report.py: fd_probe, class_accuracy, precision, recall,
fd_inception, fd_dinov2), and writes the report: the table, the metrics against sigma_rel, the
training curves and a grid per model with one class per row, real images beside.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch

from pipeline import report, store
from pipeline.config import EvalConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import decode_images, encoder_from_info
from pipeline.data.shards import read_samples
from pipeline.data.split import read_split, stratified
from pipeline.diffusion.dmd import SIGMA_MAX, seeded_student_sample
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import Resources
from pipeline.metrics.features import load_network, worker_network
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.probe import ProbeFeatures
from pipeline.store import Artifact
from pipeline.seeds import counts_per_class, evaluation_seeds, mix_seed, scored_labels
from pipeline.weights import load_network as load_denoiser
from pipeline.weights import load_probe

VERSION = "4"  # 2: the probe's metrics, the real row, several feature networks, per-class grids; 3: a stratified real
# row; 4: the samples' classes in the data's proportions (seeds.scored_labels)
UPSTREAM = ("encode", "probe", "refstats", "teacher", "phema", "distill")


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
    """(uint8 images [B, H, W, 3], labels [B] or None) for these seeds: noise and label from each
    seed's generator; `classes`, if given, replaces the labels."""
    with torch.no_grad():
        if model.name == "teacher":
            noise, labels = seeded_noise(seeds, (net.img_channels, net.img_resolution, net.img_resolution),
                                         net.num_classes, device, classes)
            x = edm_sampler(net, noise, labels, num_steps=model.num_steps)
        else:  # the student: G(z) = D(sigmas[0] z, sigmas[0]), then its later steps if it has them
            x, labels = seeded_student_sample(net, list(model.sigmas) or [SIGMA_MAX], seeds, device, classes)
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
        self.nets = {name: worker_network(name, weights, job.device) for name, weights in job.networks.items()}
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

    def result(self) -> dict[str, Any]:
        features = np.concatenate(self.features) if self.features else None
        return {"count": self.count, "features": features, "correct": self.correct, "labelled": self.labelled,
                "stats": {name: s.to_dict() for name, s in self.stats.items()}}


def _model_grid(job: EvalJob, model: Model, net: torch.nn.Module, encoder: Any) -> list[list[np.ndarray]]:
    """One row per grid class: seeds 0..columns-1 with the label set to that class (the same noise
    in every row), or for unconditional models, the next `columns` seeds."""
    rows = []
    for r, c in enumerate(job.grid_classes):
        seeds = list(range(job.grid_columns)) if c is not None else list(range(r * job.grid_columns, (r + 1) * job.grid_columns))
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


def evaluate_range(job: EvalJob, item: tuple[int, int, int]) -> dict[str, Any]:
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
        net = load_denoiser(model.artifact, model.config_name, model.weights).to(job.device)
        for lo in range(start, stop, job.batch):
            seeds = evaluation_seeds(lo, min(lo + job.batch, stop))
            classes = scored_labels(seeds, job.class_counts) if job.class_counts else None
            tally.add(*generate(model, net, seeds, encoder, job.device, classes))
        grid = _model_grid(job, model, net, encoder) if start == 0 else None
    return {"model": index, **tally.result(), "grid": grid, "real": real, "seconds": time.perf_counter() - begin}


def teacher_models(phema: Artifact, num_steps: int) -> list[Model]:
    """A row per phema variant, by sigma_rel, each sampled with `num_steps` Heun steps."""
    variants = phema.manifest()["outputs"]["variants"]
    return [Model("teacher", phema, v["file"], v["sigma_rel"], num_steps)
            for v in sorted(variants, key=lambda v: v["sigma_rel"])]


def _items(counts: list[int], per_task: int) -> list[tuple[int, int, int]]:
    return [(m, lo, min(lo + per_task, n)) for m, n in enumerate(counts) for lo in range(0, n, per_task)]


def grid_classes(num_classes: int, rows: int) -> list[int | None]:
    """Up to `rows` classes spread evenly over the dataset's (all None for an unconditional model)."""
    if num_classes == 0:
        return [None] * rows
    return sorted({int(round(c)) for c in np.linspace(0, num_classes - 1, min(rows, num_classes))})


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


def _probe_metrics(results: list[dict[str, Any]], refs: References) -> dict[str, float | None]:
    features = np.concatenate([r["features"] for r in results]).astype(np.float64)
    stats = FeatureStats(features.shape[1])
    stats.add(features)
    labelled = sum(r["labelled"] for r in results)
    reference = refs.probe_features[:len(features)]
    precision, recall = precision_recall(reference, features[:len(reference)])
    return {"fd_probe": frechet_distance(stats.mean(), stats.cov(), refs.probe_mu, refs.probe_sigma),
            "class_accuracy": sum(r["correct"] for r in results) / labelled if labelled else None,
            "precision": precision, "recall": recall}


def score(model: Model, results: list[dict[str, Any]], refs: References) -> dict[str, Any]:
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


def _heldout(probe: Artifact, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded sample of `num_images` of the probe's held-out images, every class in proportion (a
    folder is encoded class by class: its first held-out images are a few classes), in index order."""
    split = read_split(probe)
    held = split.column("holdout").to_numpy(zero_copy_only=False)
    columns = {k: split.column(k).to_numpy()[held] for k in ("shard", "position", "index", "label")}
    chosen = stratified(columns["label"], num_images, seed)
    return {k: v[chosen] for k, v in columns.items()}


def _real_rows(job: EvalJob, results: list[dict[str, Any]]) -> list[list[np.ndarray]]:
    """The real images beside every grid: per grid class in task order (unconditional: rows of any class)."""
    found: dict[Any, list[np.ndarray]] = {}
    for r in results:
        for key, images in r["real"].items():
            found.setdefault(key, []).extend(images)
    if job.grid_classes[0] is None:
        flat, cols = found.get(None, []), job.grid_columns
        return [flat[i:i + cols] for i in range(0, len(flat), cols)][:len(job.grid_classes)]
    return [found.get(c, [])[:job.grid_columns] for c in job.grid_classes]


def _write_grids(artifact: Artifact, job: EvalJob, rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    real = _real_rows(job, [r for r in results if job.models[r["model"]].name == "real"])
    for i, (row, model) in enumerate(zip(rows, job.models)):
        row["grid"] = f"grids/{i:02d}-{model.name}.png"
        if model.name == "real":
            if not any(real):  # no held-out image of any grid class
                row["grid"] = None
                continue
            png = report.class_grid_png(real)
        else:
            [grid] = [r["grid"] for r in results if r["model"] == i and r["grid"] is not None]
            png = report.class_grid_png(grid, real)
        with artifact.open(row["grid"], "wb") as f:
            f.write(png)


def _summary(rows: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any], list[str]]:
    """(the best teacher row by `metric`, the report's summary sentences)."""
    title = report.METRICS[metric][0]
    best = min((r for r in rows if r["model"] == "teacher"), key=lambda r: r[metric])
    lines = [f"Best teacher EMA length by {title}: **sigma_rel = {best['sigma_rel']:.3f}** ({title} {best[metric]:.3f})."]
    for r in rows:
        if r["model"] == "student":
            lines.append(f"The {r['nfe']}-step student's {title} is **{r[metric] / best[metric]:.2f}x** the best teacher's "
                         f"({r['nfe']} vs {best['nfe']} network evaluations).")
        if r["model"] != "teacher" and r["class_accuracy"] is not None:
            lines.append(f"Class accuracy: {r['label']} {r['class_accuracy']:.1%}, best teacher "
                         f"{best['class_accuracy']:.1%}." if best["class_accuracy"] is not None else "")
    return best, [line for line in lines if line]


def _notes(cfg: EvalConfig, probe: dict[str, Any], refstats: dict[str, Any], real_count: int) -> list[str]:
    notes = [f"{cfg.num_images} generated images per model (seed i is image i of every model; its class is its place "
             "in a cycle of the classes in the data's proportions)."]
    if probe.get("enabled"):
        notes.append(f"Probe metrics: the features of a classifier trained on the dataset (held-out accuracy "
                     f"{probe['holdout_accuracy']:.1%}, chance {probe['chance_accuracy']:.1%}) against its "
                     f"{probe['train_images']} training images; the real row is {real_count} held-out images."
                     " Precision and recall: k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019).")
    for name, info in refstats["networks"].items():
        random = " The Inception network has fixed RANDOM weights: not FID, comparable only with itself." if info["random"] else ""
        notes.append(f"{info['metric_name']} against {info['count'] or 'published'} reference statistics ({info['source']}).{random}")
    notes += [f"{name}: not computed ({why})." for name, why in refstats["skipped"].items()]
    return notes


def student_note(distill: Artifact) -> str:
    """Which checkpoint the student is: its step, how it was chosen, and an early stop if there was one."""
    manifest = distill.manifest()
    student, validation = manifest["outputs"]["student"], manifest["outputs"].get("validation") or {}
    duration = manifest["config"]["duration_nimg"]
    how = {"best": f"the best of its {len(validation.get('curve', []))} validations by fd_probe on validation seeds, "
                   "not these", "last": "its last step"}[student.get("keep", "last")]
    stopped = f" The run stopped early: {validation['stopped']}." if validation.get("stopped") else ""
    teacher = manifest["outputs"]["teacher"]
    source = f" Its teacher is the phema variant sigma_rel {teacher['sigma_rel']:g}" + (
        f", chosen by {teacher['chosen_by']}." if "chosen_by" in teacher else ".")
    return (f"The student is distill's generator after {student.get('nimg', duration):,} of {duration:,} images "
            f"({how}).{stopped}{source}")


def _models(cfg: EvalConfig, inputs: dict[str, Artifact], real: bool) -> list[Model]:
    models = [*teacher_models(inputs["phema"], cfg.num_steps), student_model(inputs["distill"])]
    return models + ([Model("real", None, "", None, 0)] if real else [])


def student_model(distill: Artifact) -> Model:
    """The distilled student: its step count and noise levels from the distill manifest."""
    student = distill.manifest()["outputs"]["student"]
    return Model("student", distill, student["file"], None, student["nfe"], tuple(student.get("sigmas", ())))


def _metrics_rows(artifact: Artifact) -> list[dict[str, Any]]:
    """A training stage's metrics rows; none for a released teacher, which was not trained here."""
    if not artifact.exists("metrics.jsonl"):
        return []
    return [json.loads(line) for line in store.read_bytes(artifact.path("metrics.jsonl")).decode().splitlines()]


def run(ctx: StageContext, cfg: EvalConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ctx.executor.check(resources, "eval")
    refstats = inputs["refstats"].manifest()["outputs"]
    probe_out = inputs["probe"].manifest()["outputs"]
    probe = inputs["probe"] if probe_out["enabled"] else None
    if probe is None and not refstats["networks"]:
        raise ValueError("evaluate has no metric to compute: the probe is disabled (probe.enabled=false) and refstats "
                         f"has no feature network ({refstats['skipped']}): enable the probe, or set "
                         "refstats.inception_weights / refstats.dinov2_weights")
    networks = {name: info["weights"] for name, info in refstats["networks"].items()}
    for name, weights in networks.items():
        load_network(name, weights, "cpu")  # weights gone since refstats fail here, before sampling
    encode = inputs["encode"].manifest()["outputs"]
    heldout = _heldout(probe, cfg.num_images, ctx.seed) if probe else {}
    models = _models(cfg, inputs, real=probe is not None)
    job = EvalJob(models, encode["encoder"], networks, probe, heldout,
                  [inputs["encode"].path(name) for name in encode["shards"]],
                  grid_classes(encode["num_classes"], cfg.grid_rows), cfg.grid_columns, cfg.batch, ctx.seed,
                  "cuda" if cfg.num_gpus > 0 else "cpu", counts_per_class(encode, encode["num_classes"]))
    counts = [len(heldout["index"]) if m.name == "real" else cfg.num_images for m in models]
    items = _items(counts, cfg.images_per_task)
    ctx.log.info("evaluate: %d models x %d images in %d tasks", len(models), cfg.num_images, len(items))
    results = ctx.map(partial(evaluate_range, job), items, resources, desc="evaluate")
    refs = references(probe, inputs["refstats"], refstats["networks"])
    rows = [score(m, [r for r in results if r["model"] == i], refs) for i, m in enumerate(models)]
    _write_grids(ctx.artifact, job, rows, results)
    metric = "fd_inception" if "inception" in networks and not refstats["networks"]["inception"]["random"] else (
        "fd_probe" if probe else f"fd_{next(iter(networks))}")
    best, summary = _summary(rows, metric)
    notes = _notes(cfg, probe_out, refstats, counts[-1] if probe else 0) + [student_note(inputs["distill"])]
    files = report.render(rows, summary, notes, _metrics_rows(inputs["teacher"]), _metrics_rows(inputs["distill"]),
                          inputs["distill"].manifest()["outputs"].get("validation"))
    for name, data in files.items():
        with ctx.artifact.open(name, "wb") as f:
            f.write(data)
    ctx.artifact.write_json("results.json", rows)
    student = next(r for r in rows if r["model"] == "student")
    return {"metric": metric, "models": rows, "best_sigma_rel": best["sigma_rel"], "num_images": cfg.num_images,
            "student_over_best_teacher": round(student[metric] / best[metric], 4),
            "student_class_accuracy": student["class_accuracy"], "best_teacher_class_accuracy": best["class_accuracy"]}


def sample_model(cfg: Any, which: str, seeds: list[int], steps: int | None,
                 classes: list[int] | None) -> np.ndarray:
    """Images of `student` or `teacher[:SIGMA_REL]` from a run's artifacts (`onestep sample`)."""
    from pipeline import dag

    keys = dag.cache_keys(dag.graph(), cfg)
    st = store.Store(cfg.storage)
    kind, _, sigma = which.partition(":")
    if kind == "student":
        model = Model("student", st.artifact("distill", keys["distill"]), "student.safetensors", None, 1)
        if model.artifact.manifest() is not None:
            model = student_model(model.artifact)
    elif kind == "teacher":
        pairs = st.artifact("pairs", keys["pairs"]).manifest()
        sigma_rel = (float(sigma) if sigma else pairs["outputs"]["teacher"]["sigma_rel"] if pairs
                     else cfg.pairs.sigma_rel)
        model = Model("teacher", st.artifact("phema", keys["phema"]), f"phema-{sigma_rel:.4f}.safetensors",
                      sigma_rel, steps or cfg.eval.num_steps)
    else:
        raise ValueError(f"--model {which!r}: expected student or teacher[:SIGMA_REL]")
    stage = "distill" if kind == "student" else "phema"
    if model.artifact.manifest() is None:
        raise ValueError(f"no {stage} artifact for this config in {store.redact(cfg.storage)}: "
                         f"run `onestep run --until {stage}` with the same --config/--set first")
    if not model.artifact.exists(model.weights):
        raise ValueError(f"no teacher variant at sigma_rel {model.sigma_rel}: add it to phema.sigma_rels "
                         "and rerun phema, or pick one of its variants")
    net = load_denoiser(model.artifact, model.config_name, model.weights)
    encoder = encoder_from_info(st.artifact("encode", keys["encode"]).manifest()["outputs"]["encoder"])
    return generate(model, net, seeds, encoder, "cpu", classes)[0]

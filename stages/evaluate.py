"""evaluate: FID of every model, fanned out as Ray tasks over (model, seed range), and a report.

    onestep run --config ci --until evaluate --storage /tmp/onestep

Every teacher variant made by phema is sampled with the EDM Heun sampler (`eval.num_steps`).
Sample i of every model uses seed i, so the sample grids compare models on the same noise.
Each task returns float64 feature sums; the driver reduces them and computes the Fréchet
distance to the refstats statistics. With a random-weight Inception (demo/ci presets) the
number is reported as "FD (random-weight Inception)", never as FID.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import store
from pipeline.config import EvalConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import OneStepGenerator
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import Resources
from pipeline.metrics.fid import FeatureStats, frechet_distance, load_inception, worker_inception
from pipeline.store import Artifact
from pipeline.training import load_network

VERSION = "1"
UPSTREAM = ("encode", "refstats", "phema", "distill")


@dataclass(frozen=True)
class Model:
    """One model to evaluate: network weights in an artifact and how to sample from it."""

    name: str
    artifact: Artifact
    weights: str  # file in the artifact
    sigma_rel: float | None
    num_steps: int  # Heun steps; 0 = one-step generator

    @property
    def config_name(self) -> str:
        """The network's config file in the artifact: `student.json` or `network.json`."""
        return "student" if self.num_steps == 0 else "network"

    @property
    def nfe(self) -> int:
        return 2 * self.num_steps - 1 if self.num_steps else 1


@dataclass(frozen=True)
class EvalJob:
    """What every task shares (picklable, small)."""

    models: list[Model]
    encoder: dict[str, Any]
    inception_weights: str
    batch: int
    grid_images: int
    device: str


def generate(model: Model, net: torch.nn.Module, seeds: list[int], encoder: Any, device: str,
             classes: list[int] | None = None) -> np.ndarray:
    """uint8 images [B, H, W, 3] for these seeds (noise and label from each seed's generator;
    `classes`, if given, replaces the labels)."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise, labels = seeded_noise(seeds, shape, net.num_classes, device)
    if classes is not None and labels is not None:
        labels = torch.tensor(classes, device=device)
    with torch.no_grad():
        if model.num_steps:
            x = edm_sampler(net, noise, labels, num_steps=model.num_steps)
        else:  # the one-step student: G(z) = D(sigma_max z, sigma_max)
            x = OneStepGenerator(net)(noise, labels)
    return encoder.decode(x)


def evaluate_range(job: EvalJob, item: tuple[int, int, int]) -> dict[str, Any]:
    """Feature sums of one model over seeds [start, stop), and its grid images among them."""
    index, start, stop = item
    model = job.models[index]
    begin = time.perf_counter()
    net = load_network(model.artifact, model.config_name, model.weights).to(job.device)
    encoder = encoder_from_info(job.encoder, job.device)
    inception = worker_inception(job.inception_weights, job.device)
    stats, grid = FeatureStats(inception.dim), []
    for lo in range(start, stop, job.batch):
        seeds = list(range(lo, min(lo + job.batch, stop)))
        images = generate(model, net, seeds, encoder, job.device)
        stats.add(inception.features(images))
        grid += [img for seed, img in zip(seeds, images) if seed < job.grid_images]
    return {"model": index, "stats": stats.to_dict(), "grid": grid, "seconds": time.perf_counter() - begin}


def _teacher_models(phema: Artifact, num_steps: int) -> list[Model]:
    variants = phema.manifest()["outputs"]["variants"]
    return [Model(f"teacher sigma_rel={v['sigma_rel']:.3f}", phema, v["file"], v["sigma_rel"], num_steps)
            for v in sorted(variants, key=lambda v: v["sigma_rel"])]


def _items(num_models: int, cfg: EvalConfig) -> list[tuple[int, int, int]]:
    return [(m, lo, min(lo + cfg.images_per_task, cfg.num_images))
            for m in range(num_models) for lo in range(0, cfg.num_images, cfg.images_per_task)]


def grid_png(images: list[np.ndarray]) -> bytes:
    """A square-ish grid of equally sized uint8 images as PNG bytes."""
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    h, w, _ = images[0].shape
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def _plot(rows: list[dict[str, Any]], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = [r for r in rows if r["sigma_rel"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["sigma_rel"] for r in teacher], [r["fd"] for r in teacher], "o-", label="teacher (post-hoc EMA)")
    for r in rows:
        if r["sigma_rel"] is None:
            ax.axhline(r["fd"], color="tab:red", linestyle="--", label=r["name"])
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _sigma(row: dict[str, Any]) -> str:
    return "-" if row["sigma_rel"] is None else f"{row['sigma_rel']:.3f}"


def _report_md(rows: list[dict[str, Any]], metric: str, best: dict[str, Any], note: str) -> str:
    lines = ["# onestep evaluation\n", note, "",
             f"| model | sigma_rel | steps | NFE | {metric} | time (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {_sigma(r)} | {r['steps']} | {r['nfe']} | {r['fd']:.3f} | {r['seconds']:.1f} |"
              for r in rows]
    lines += ["", f"Best teacher EMA length: **sigma_rel = {best['sigma_rel']:.3f}** ({metric} {best['fd']:.3f})."]
    lines += [f"The one-step student's {metric} is **{r['fd'] / best['fd']:.2f}x** the best teacher's "
              f"({r['nfe']} vs {best['nfe']} network evaluations)." for r in rows if r["sigma_rel"] is None]
    lines += ["", f"![{metric} against sigma_rel](fd_vs_sigma_rel.png)", "",
              "## Samples (the same seeds for every model)", ""]
    lines += [f"### {r['name']}\n\n![{r['name']}]({r['grid']})\n" for r in rows]
    return "\n".join(lines)


def _report_html(rows: list[dict[str, Any]], metric: str, best: dict[str, Any], note: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in (
        r["name"], _sigma(r), r["steps"], r["nfe"], f"{r['fd']:.3f}", f"{r['seconds']:.1f}")) + "</tr>" for r in rows)
    head = "".join(f"<th>{h}</th>" for h in ("model", "sigma_rel", "steps", "NFE", metric, "time (s)"))
    grids = "".join(f"<figure><img src='{r['grid']}' width='256'><figcaption>{r['name']}</figcaption></figure>"
                    for r in rows)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>onestep evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .8em}"
            "figure{display:inline-block;margin:.5em}img{image-rendering:pixelated}</style></head><body>"
            f"<h1>onestep evaluation</h1><p>{note}</p><table><tr>{head}</tr>{body}</table>"
            f"<p>Best teacher EMA length: <b>sigma_rel = {best['sigma_rel']:.3f}</b> ({metric} {best['fd']:.3f}).</p>"
            f"<img src='fd_vs_sigma_rel.png'><h2>Samples (the same seeds for every model)</h2>{grids}</body></html>")


def run(ctx: StageContext, cfg: EvalConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    refstats = inputs["refstats"].manifest()["outputs"]
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ctx.executor.check(resources, "eval")
    inception = load_inception(refstats["inception_weights"], "cpu")  # fails here, before sampling
    metric = inception.metric_name
    with inputs["refstats"].open("stats.npz") as f:
        ref = np.load(io.BytesIO(f.read()))
        ref_mu, ref_sigma = ref["mu"], ref["sigma"]
    models = [*_teacher_models(inputs["phema"], cfg.num_steps),
              Model("student (1 step)", inputs["distill"], "student.safetensors", None, 0)]
    encoder = inputs["encode"].manifest()["outputs"]["encoder"]
    job = EvalJob(models, encoder, refstats["inception_weights"], cfg.batch, cfg.grid_images, device)
    items = _items(len(models), cfg)
    ctx.log.info("evaluate: %d models x %d images in %d tasks (%s)", len(models), cfg.num_images, len(items), metric)
    results = ctx.map(partial(evaluate_range, job), items, resources, desc="evaluate")
    rows = [_score(ctx.artifact, i, m, [r for r in results if r["model"] == i], ref_mu, ref_sigma)
            for i, m in enumerate(models)]
    best = min((r for r in rows if r["sigma_rel"] is not None), key=lambda r: r["fd"])
    reference = f"{refstats['count']} reference images" if refstats.get("count") else f"the statistics in {refstats['source']}"
    note = (f"{metric} of {cfg.num_images} generated images per model against {reference}."
            + (" The Inception network has fixed RANDOM weights (demo/ci preset): these numbers are not FID "
               "and are comparable only with each other." if inception.random else ""))
    if inception.random:
        ctx.log.warning("evaluate: random-weight Inception: reporting %s, not FID", metric)
    with ctx.artifact.open("fd_vs_sigma_rel.png", "wb") as f:
        f.write(_plot(rows, metric))
    ctx.artifact.write_json("results.json", rows)
    with ctx.artifact.open("report.md", "wb") as f:
        f.write(_report_md(rows, metric, best, note).encode())
    with ctx.artifact.open("report.html", "wb") as f:
        f.write(_report_html(rows, metric, best, note).encode())
    student = rows[-1]
    return {"metric": metric, "models": rows, "best_sigma_rel": best["sigma_rel"], "num_images": cfg.num_images,
            "student_fd_over_best_teacher": round(student["fd"] / best["fd"], 4)}


def _score(artifact: Artifact, index: int, model: Model, results: list[dict[str, Any]],
           ref_mu: np.ndarray, ref_sigma: np.ndarray) -> dict[str, Any]:
    """Reduce one model's task results: its FD, total task time, and its sample grid file."""
    stats = FeatureStats.from_dict(results[0]["stats"])
    for r in results[1:]:
        stats = stats.merge(FeatureStats.from_dict(r["stats"]))
    grid_file = f"grids/model-{index:02d}.png"
    with artifact.open(grid_file, "wb") as f:
        f.write(grid_png([img for r in results for img in r["grid"]]))
    fd = frechet_distance(stats.mean(), stats.cov(), ref_mu, ref_sigma)
    return {"name": model.name, "sigma_rel": model.sigma_rel, "steps": model.num_steps or 1, "nfe": model.nfe,
            "fd": float(fd), "seconds": round(sum(r["seconds"] for r in results), 2), "grid": grid_file,
            "count": int(stats.count)}


def sample_model(cfg: Any, which: str, seeds: list[int], steps: int | None,
                 classes: list[int] | None) -> np.ndarray:
    """Images of `student` or `teacher[:SIGMA_REL]` from a run's artifacts (`onestep sample`)."""
    from pipeline import dag

    keys = dag.cache_keys(dag.graph(), cfg)
    st = store.Store(cfg.storage)
    kind, _, sigma = which.partition(":")
    if kind == "student":
        model = Model("student", st.artifact("distill", keys["distill"]), "student.safetensors", None, 0)
    elif kind == "teacher":
        sigma_rel = float(sigma) if sigma else cfg.pairs.sigma_rel
        model = Model(which, st.artifact("phema", keys["phema"]), f"phema-{sigma_rel:.4f}.safetensors",
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
    net = load_network(model.artifact, model.config_name, model.weights)
    encoder = encoder_from_info(st.artifact("encode", keys["encode"]).manifest()["outputs"]["encoder"])
    return generate(model, net, seeds, encoder, "cpu", classes)


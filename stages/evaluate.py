"""evaluate: every model on the same seeds, fanned out as Ray tasks over (model, seed range), and a report.

    onestep run --config ci --until evaluate --storage /tmp/onestep

The models: every teacher variant made by phema (EDM Heun sampler, `eval.num_steps`), the one-step
student, and the probe's held-out real images as the ceiling row. Sample i of every model uses
seed i. Each task (pipeline/evaluation.py) returns the probe's features and predictions of its images,
and float64 feature sums in each pretrained network that refstats has statistics for; the driver reduces
them into one table, `results.json` (fd_probe, class_accuracy, precision, recall, fd_inception,
fd_dinov2), and writes the report (pipeline/report.py): the table, the metrics against sigma_rel, the
training curves and a grid per model with one class per row, real images beside.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from pipeline import report, store
from pipeline.config import DistillConfig, EvalConfig
from pipeline.dag import StageContext
from pipeline.evaluation import (EvalJob, Model, evaluate_range, grid_classes, grid_pngs, references, score,
                                 select_heldout, student_model, teacher_models)
from pipeline.executor import Resources
from pipeline.metrics.features import load_feature_network
from pipeline.outputs import (DistillOutputs, EncodeOutputs, EvalOutputs, ProbeOutputs, RefstatsOutputs,
                              TeacherOutputs, made_with)
from pipeline.seeds import counts_per_class
from pipeline.store import Artifact


def _items(counts: list[int], per_task: int) -> list[tuple[int, int, int]]:
    return [(m, lo, min(lo + per_task, n)) for m, n in enumerate(counts) for lo in range(0, n, per_task)]


def _models(cfg: EvalConfig, inputs: dict[str, Artifact], real: bool) -> list[Model]:
    models = [*teacher_models(inputs["phema"], cfg.num_steps), student_model(inputs["distill"])]
    return models + ([Model("real", None, "", None, 0)] if real else [])


def _metrics_rows(artifact: Artifact, name: str) -> list[dict[str, Any]]:
    """A training stage's metrics rows (its file `name`); none for a released teacher, which was not trained here."""
    if not artifact.exists(name):
        return []
    return [json.loads(line) for line in store.read_bytes(artifact.path(name)).decode().splitlines()]


def _feature_networks(refstats: RefstatsOutputs, probe: Artifact | None) -> dict[str, str]:
    """Each refstats network's weights, loaded once here so that weights gone since refstats fail before sampling."""
    if probe is None and not refstats.networks:
        raise ValueError("evaluate has no metric to compute: the probe is disabled (probe.enabled=false) and refstats "
                         f"has no feature network ({refstats.skipped}): enable the probe, or set "
                         "refstats.inception_weights / refstats.dinov2_weights")
    networks = {name: info["weights"] for name, info in refstats.networks.items()}
    for name, weights in networks.items():
        load_feature_network(name, weights, "cpu")
    return networks


def _headline_metric(refstats: RefstatsOutputs, probe: Artifact | None) -> str:
    """FID with real Inception weights, else fd_probe, else the first feature network's distance."""
    networks = refstats.networks
    if "inception" in networks and not networks["inception"]["random"]:
        return "fd_inception"
    return "fd_probe" if probe else f"fd_{next(iter(networks))}"


def _write_report(ctx: StageContext, job: EvalJob, rows: list[dict[str, Any]], results: list[dict[str, Any]],
                  summary: list[str], notes: list[str], inputs: dict[str, Artifact]) -> None:
    """The grids (their paths into the rows), the report and its plots, then results.json."""
    for i, (row, png) in enumerate(zip(rows, grid_pngs(job, results))):
        row["grid"] = None if png is None else f"grids/{i:02d}-{job.models[i].name}.png"
        if png is not None:
            with ctx.artifact.open(row["grid"], "wb") as f:
                f.write(png)
    files = report.render(rows, summary, notes, _metrics_rows(inputs["teacher"], TeacherOutputs.file("metrics")),
                          _metrics_rows(inputs["distill"], DistillOutputs.file("metrics")),
                          DistillOutputs.read(inputs["distill"]).validation)
    for name, data in files.items():
        with ctx.artifact.open(name, "wb") as f:
            f.write(data)
    ctx.artifact.write_json(EvalOutputs.file("results"), rows)


def run(ctx: StageContext, cfg: EvalConfig, inputs: dict[str, Artifact]) -> EvalOutputs:
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ctx.executor.check(resources, "eval")
    refstats = RefstatsOutputs.read(inputs["refstats"])
    probe_out = ProbeOutputs.read(inputs["probe"])
    probe = inputs["probe"] if probe_out.enabled else None
    networks = _feature_networks(refstats, probe)
    encode = EncodeOutputs.read(inputs["encode"])
    heldout = select_heldout(probe, cfg.num_images, ctx.seed) if probe else {}
    models = _models(cfg, inputs, real=probe is not None)
    job = EvalJob(models, encode.encoder, networks, probe, heldout, encode.shard_urls(inputs["encode"]),
                  grid_classes(encode.num_classes, cfg.grid_rows), cfg.grid_columns, cfg.batch, ctx.seed,
                  "cuda" if cfg.num_gpus > 0 else "cpu", counts_per_class(encode.class_counts, encode.num_classes))
    counts = [len(heldout["index"]) if m.name == "real" else cfg.num_images for m in models]
    items = _items(counts, cfg.images_per_task)
    ctx.log.info("evaluate: %d models x %d images in %d tasks", len(models), cfg.num_images, len(items))
    results = ctx.map(partial(evaluate_range, job), items, resources, desc="evaluate")
    refs = references(probe, inputs["refstats"], refstats.networks)
    rows = [score(m, [r for r in results if r["model"] == i], refs) for i, m in enumerate(models)]
    metric = _headline_metric(refstats, probe)
    best, summary = report.summarize(rows, metric)
    notes = report.measurement_notes(cfg.num_images, probe_out, refstats, counts[-1] if probe else 0)
    duration = made_with(inputs["distill"], DistillConfig).duration_nimg
    notes.append(report.student_note(DistillOutputs.read(inputs["distill"]), duration))
    _write_report(ctx, job, rows, results, summary, notes, inputs)
    student = next(r for r in rows if r["model"] == "student")
    return EvalOutputs(metric=metric, models=rows, best_sigma_rel=best["sigma_rel"], num_images=cfg.num_images,
                       student_over_best_teacher=round(student[metric] / best[metric], 4),
                       student_class_accuracy=student["class_accuracy"],
                       best_teacher_class_accuracy=best["class_accuracy"])

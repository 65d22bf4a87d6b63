"""distill: a one-step (or few-step) generator from the phema teacher, by a distillation method.

    onestep run --config ci --until distill --storage /tmp/onestep

`distill.method` picks the method (pipeline/distill/: `dmd`, Distribution Matching Distillation with
LPIPS regression onto the pairs; `dmd2`, with a GAN head trained on real images instead). G starts as
the teacher variant that made the pairs; the library's loop (pipeline/trainer.py) trains it in chunks
between checkpoints, resumable, under the divergence guard, as it trains the teacher.

Validation (pipeline/metrics/validation.py) watches the student: at the start, every `val_every_nimg`
images and at the end, `val_images` samples from fixed validation seeds are scored with the probe
(fd_probe, class accuracy) into the metrics rows. `keep: best` commits the student of the best
validation (`validation.json` and the manifest say which); with it, fd_probe above `early_stop_ratio`
x its best for `early_stop_patience` validations in a row is a collapse: the run stops there and keeps
the best. `keep: last` commits the last step's student and never stops early. With `ema_sigma_rel` > 0
the student is a power-function EMA of G's weights: validation scores it and distill commits it.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import DistillConfig
from pipeline.dag import StageContext
from pipeline.diffusion.dmd import student_sigmas
from pipeline.distill.method import DistillArgs, method_class
from pipeline.distill.student import train_worker
from pipeline.distill.validation import report_validation
from pipeline.executor import DDPJob
from pipeline.seeds import counts_per_class
from pipeline.store import Artifact
from pipeline.trainer import VALIDATION_FILE
from pipeline.training import check_diverged, gather_metrics

VERSION = "6"  # 2: a seeded random LPIPS backbone; 3: the fake score learns from the DM batch of G; 4: dmd2; 5: validation;
# 6: validation's samples in the data's class proportions (seeds.scored_labels)
UPSTREAM = ("encode", "probe", "teacher", "phema", "pairs")
TEACHER_LOSS = ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")  # the fake score learns with these


def run(ctx: StageContext, cfg: DistillConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    pairs = inputs["pairs"].manifest()
    teacher_cfg = inputs["teacher"].manifest()["config"]
    if cfg.guidance != 1.0 and not pairs["config"]["guide"]:
        raise ValueError(f"distill.guidance = {cfg.guidance} needs a guiding network: set pairs.guide "
                         "(the real score and the pairs use the same guided teacher)")
    encode = inputs["encode"].manifest()["outputs"]
    args = DistillArgs(cfg, {k: teacher_cfg[k] for k in TEACHER_LOSS}, inputs["phema"],
                       pairs["outputs"]["teacher"]["file"], pairs["config"]["guide"],
                       [inputs["pairs"].path(s) for s in pairs["outputs"]["shards"]],
                       [inputs["encode"].path(s) for s in encode["shards"]], encode["encoder"],
                       inputs["probe"] if cfg.val_every_nimg else None, ctx.artifact, ctx.seed,
                       ctx.tracking, counts_per_class(encode, encode["num_classes"]))
    method_class(cfg.method).check(args)
    job = DDPJob("distill", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_worker, args, job)
    rows = gather_metrics(ctx.artifact)
    check_diverged(metrics, "distill")
    validation = report_validation(ctx.log, ctx.artifact.read_json(VALIDATION_FILE), cfg, pairs)
    kept = validation["kept"] or {}
    return {
        "student": {"file": "student.safetensors", "config": "student.json", "nfe": cfg.student_steps,
                    "sigmas": student_sigmas(cfg.student_steps, cfg.sigma_init),
                    "nimg": kept.get("nimg", rows[-1]["nimg"] if rows else cfg.duration_nimg), "keep": cfg.keep},
        "teacher": pairs["outputs"]["teacher"],
        "validation": validation,
        "metrics": rows[-1] if rows else {},
        "train_wall_time_s": round(time.perf_counter() - start, 1),
    }

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

from pipeline.config import DistillConfig, PairsConfig, TeacherConfig
from pipeline.dag import StageContext
from pipeline.diffusion.dmd import student_sigmas
from pipeline.distill.method import DistillArgs, method_class
from pipeline.distill.student import train_worker
from pipeline.distill.validation import report_validation
from pipeline.executor import DDPJob
from pipeline.outputs import DistillOutputs, EncodeOutputs, PairsOutputs, Student, made_with
from pipeline.seeds import counts_per_class
from pipeline.store import Artifact
from pipeline.trainer import VALIDATION_FILE
from pipeline.training import check_diverged, gather_metrics

TEACHER_LOSS = ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")  # the fake score learns with these


def run(ctx: StageContext, cfg: DistillConfig, inputs: dict[str, Artifact]) -> DistillOutputs:
    pairs, pairs_cfg = PairsOutputs.read(inputs["pairs"]), made_with(inputs["pairs"], PairsConfig)
    teacher_cfg = made_with(inputs["teacher"], TeacherConfig)
    if cfg.guidance != 1.0 and not pairs_cfg.guide:
        raise ValueError(f"distill.guidance = {cfg.guidance} needs a guiding network: set pairs.guide "
                         "(the real score and the pairs use the same guided teacher)")
    encode = EncodeOutputs.read(inputs["encode"])
    args = DistillArgs(cfg, {k: getattr(teacher_cfg, k) for k in TEACHER_LOSS}, inputs["phema"], pairs.teacher.file,
                       pairs_cfg.guide, pairs.shard_urls(inputs["pairs"]), encode.shard_urls(inputs["encode"]),
                       encode.encoder, inputs["probe"] if cfg.val_every_nimg else None, ctx.artifact, ctx.seed,
                       ctx.tracking, counts_per_class(encode.class_counts, encode.num_classes))
    method_class(cfg.method).check(args)
    job = DDPJob("distill", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_worker, args, job)
    rows = gather_metrics(ctx.artifact)
    check_diverged(metrics, "distill")
    validation = report_validation(ctx.log, ctx.artifact.read_json(VALIDATION_FILE), cfg, pairs, pairs_cfg.num_steps)
    kept = validation["kept"] or {}
    student = Student(DistillOutputs.file("weights"), DistillOutputs.file("config"), cfg.student_steps,
                      student_sigmas(cfg.student_steps, cfg.sigma_init),
                      kept.get("nimg", rows[-1]["nimg"] if rows else cfg.duration_nimg), cfg.keep)
    return DistillOutputs(student=student, teacher=pairs.teacher, validation=validation,
                          metrics=rows[-1] if rows else {}, train_wall_time_s=round(time.perf_counter() - start, 1))

"""What distill's driver makes of its validations (the workers' `validation.json`, pipeline/trainer.py):
the student kept set beside its teacher on the same seeds, and the log lines a user should read.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import DistillConfig
from pipeline.outputs import PairsOutputs

HELD_CLASSES = 0.8  # a student whose validation class accuracy is under this x its teacher's has lost classes


def against_teacher(kept: dict[str, Any] | None, pairs: PairsOutputs, num_steps: int) -> dict[str, Any] | None:
    """The kept student's validation figures beside its teacher's (`num_steps` Heun steps) on the same seeds:
    pairs' choice of variant (`select: best`) scored every variant on the first validation seeds. None when it
    did not, or scored another number of them (a Fréchet distance's bias moves with the count)."""
    teacher = next((s for s in pairs.selection if s["sigma_rel"] == pairs.teacher.sigma_rel), None)
    if not kept or teacher is None or teacher["count"] != kept["count"]:
        return None
    student_acc, teacher_acc = kept.get("class_accuracy"), teacher.get("class_accuracy")
    held = None if student_acc is None or not teacher_acc else student_acc / teacher_acc
    return {"teacher": {**teacher, "num_steps": num_steps},
            "fd_probe_ratio": kept["fd_probe"] / teacher["fd_probe"], "class_accuracy_ratio": held}


def report_validation(log: logging.Logger, validation: dict[str, Any], cfg: DistillConfig, pairs: PairsOutputs,
                      num_steps: int) -> dict[str, Any]:
    """The manifest's `validation` (validation.json, the seeds' count and spacing, the student against its
    teacher), and log lines on the student kept, on an early stop, on a student kept from before any step,
    and on a student that lost its classes (class accuracy under HELD_CLASSES x its teacher's)."""
    kept, stopped = validation["kept"], validation["stopped"]
    if stopped:
        log.warning("distill: stopped early: %s; the student kept is the one of %d images", stopped, kept["nimg"])
    if kept:
        accuracy = "" if kept.get("class_accuracy") is None else f", class accuracy {kept['class_accuracy']:.1%}"
        log.info("distill: the student is the one of %d images (keep: %s): validation fd_probe %.4g%s over %d "
                 "images", kept["nimg"], cfg.keep, kept["fd_probe"], accuracy, kept["count"])
    if kept and kept["nimg"] == 0 and len(validation["curve"]) > 1:
        log.warning("distill: every validation after the start was worse than the first, so the student kept is "
                    "G before any step: the teacher's own one-step output, not a distilled student. Try a lower "
                    "distill.lr and distill.fake_lr (now %g, %g), or distill.keep=last to commit the last step's",
                    cfg.lr, cfg.fake_lr)
    versus = against_teacher(kept, pairs, num_steps)
    if versus:
        _report_teacher(log, kept, versus)
    return {**validation, "images": cfg.val_images if cfg.val_every_nimg else 0, "every_nimg": cfg.val_every_nimg,
            "against_teacher": versus}


def _report_teacher(log: logging.Logger, kept: dict[str, Any], versus: dict[str, Any]) -> None:
    teacher = versus["teacher"]
    accuracy = "" if teacher.get("class_accuracy") is None else f", class accuracy {teacher['class_accuracy']:.1%}"
    log.info("distill: its teacher (sigma_rel %g, %d Heun steps) on the same seeds: fd_probe %.4g%s; the "
             "student's fd_probe is %.2fx", teacher["sigma_rel"], teacher["num_steps"], teacher["fd_probe"],
             accuracy, versus["fd_probe_ratio"])
    if versus["class_accuracy_ratio"] is not None and versus["class_accuracy_ratio"] < HELD_CLASSES:
        log.warning("distill: the student has lost its classes: class accuracy %.1f%% on validation against "
                    "its teacher's %.1f%% on the same seeds. Try a lower distill.lr, or compare settings "
                    "with `onestep sweep` (docs/stages.md)", 100 * kept["class_accuracy"],
                    100 * teacher["class_accuracy"])

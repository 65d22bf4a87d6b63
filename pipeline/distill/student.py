"""What the training loop (pipeline/trainer.py) trains in the distill stage: a method and the student it makes.

    train_worker(session, DistillArgs(...))   # on every DDP worker, from the stage's ctx.ddp

The method (distill.method, pipeline/distill/) makes each iteration; around it, G's learning rate
warms up over `lr_rampup_nimg`, and the student is G's denoiser or, with `ema_sigma_rel` > 0, a
power-function EMA of its weights (docs/algorithms.md, "Power-function EMA and post-hoc EMA"):
validation scores the student, keep-best chooses among its validations, and it is what distill
commits as `student.safetensors`, sampled as `pipeline.sampling.Generator.student(net, sigmas)`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipeline.config import DistillConfig
from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import student_sigmas
from pipeline.diffusion.phema import PowerFunctionEMA
from pipeline.distill.method import DistillArgs, method_class
from pipeline.executor import TrainSession
from pipeline.metrics.probe import ProbeFeatures
from pipeline.metrics.validation import Decode, Validation
from pipeline.models.edm2 import Denoiser
from pipeline.sampling import Generator
from pipeline.seeds import validation_seeds
from pipeline.trainer import Loop, Step, train
from pipeline.weights import load_probe, load_reference, save_network


def generator_lr(cfg: DistillConfig, nimg: int) -> float:
    """G's learning rate for the step after `nimg` images: a linear warm-up over `lr_rampup_nimg`, so that the
    fake score, which starts as the teacher, can follow G's first moves."""
    return cfg.lr * min((nimg + cfg.batch) / cfg.lr_rampup_nimg, 1.0) if cfg.lr_rampup_nimg else cfg.lr


class Distillation:
    """The loop's trainee: the method on this worker, G's learning rate, and the student (G or its EMA)."""

    def __init__(self, session: TrainSession, args: DistillArgs) -> None:
        self.session, self.args, self.cfg = session, args, args.cfg
        self.encoder = encoder_from_info(args.encoder, str(session.device))
        self.method = method_class(self.cfg.method).build(args, session, self.encoder)
        denoiser = self.method.nets.generator.denoiser
        self.ema = PowerFunctionEMA(denoiser, [self.cfg.ema_sigma_rel]) if self.cfg.ema_sigma_rel else None

    def state(self) -> dict[str, Any]:
        return {**self.method.state(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load(self, state: dict[str, Any]) -> None:
        self.method.load(state)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def begin_chunk(self, seed: int, steps: int) -> None:
        self.method.begin_chunk(seed, steps)

    def step(self, nimg: int) -> Step:
        lr = generator_lr(self.cfg, nimg)
        for group in self.method.nets.opt_g.param_groups:
            group["lr"] = lr
        return {**self.method.step(), "lr": lr}

    def after_step(self, nimg: int) -> None:
        if self.ema is not None:
            self.ema.update(self.method.nets.generator.denoiser, nimg, self.cfg.batch)

    def guard_losses(self, step: Step) -> dict[str, float]:
        first = self.reduce([step], 0, 0.0)
        return {"loss_g": first["loss_g"], "loss_fake": first["loss_fake"]}

    def reduce(self, steps: list[Step], nimg: int, img_per_s: float) -> dict[str, Any]:
        """Means over the steps since the last row and over the workers (nonfinite_steps: their count)."""
        keys, world = sorted(steps[0]), self.session.world_size
        sums = torch.tensor([sum(s[k] for s in steps) for k in keys], dtype=torch.float64, device=self.session.device)
        totals = self.session.all_reduce(sums).tolist()
        means = {k: v / ((1 if k == "nonfinite_steps" else len(steps)) * world) for k, v in zip(keys, totals)}
        return {"nimg": nimg, **means, "img_per_s": img_per_s}

    def student(self) -> Denoiser:
        """What validation scores and distill commits: G's denoiser, or a copy holding its EMA's weights."""
        net = self.method.nets.generator.denoiser
        if self.ema is None:
            return net
        ema_net = copy.deepcopy(net)
        ema_net.load_state_dict(self.ema.ema_state(self.ema.sigma_rels[0]), strict=False)  # its float state
        return ema_net

    def generator(self) -> Generator:
        return Generator.student(self.student(), student_sigmas(self.cfg.student_steps, self.cfg.sigma_init))

    def save(self, weights: dict[str, torch.Tensor] | None) -> None:
        save_network(self.args.artifact, "student", self.student(), weights)


def load_validation(args: DistillArgs, session: TrainSession, decode: Decode) -> Validation | None:
    """This worker's validation: the probe and its reference statistics, its share of the seeds."""
    if args.probe is None:
        return None
    seeds = validation_seeds(args.cfg.val_images)[session.rank::session.world_size]
    return Validation(ProbeFeatures(load_probe(args.probe), str(session.device)), load_reference(args.probe), decode,
                      seeds, args.class_counts, args.cfg.val_batch)


def train_worker(session: TrainSession, args: DistillArgs) -> None:
    """Runs on every DDP worker: the loop over the distillation, from its last checkpoint to duration_nimg."""
    cfg = args.cfg
    loop = Loop("distill", args.artifact, args.seed, cfg.batch, cfg.duration_nimg, cfg.checkpoint_nimg, cfg.log_nimg,
                cfg.divergence_ratio, cfg.divergence_patience,
                f"Lower distill.lr and distill.fake_lr (now {cfg.lr:g}, {cfg.fake_lr:g}).", args.tracking, cfg.keep,
                cfg.val_every_nimg, cfg.early_stop_ratio, cfg.early_stop_patience)
    distillation = Distillation(session, args)
    train(session, distillation, loop, load_validation(args, session, distillation.encoder.decode))

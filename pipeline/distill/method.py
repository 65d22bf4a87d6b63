"""The interface of a distillation method, and what every method shares: its networks and their optimisers.

A method (DMD, DMD2, ...) owns its networks (the generator G, the fake score, the real score, a guide,
a GAN head), their optimisers and its per-step losses; the training loop (pipeline/trainer.py, through
pipeline/distill/student.py) owns everything else. A new method is a module of this package with a
subclass of `Method`, named in METHODS (pipeline/distill/__init__.py): it implements `begin_chunk`
(its data streams) and `step` (one iteration), and may add to the fake score (`fake_score`), to the
driver's checks (`check`) and to the checkpoint (`state`, `load`).

Every method here starts G and the fake score from the teacher variant the pairs stage chose: G(z) =
D_G(s z, s) at s = `sigma_init` (docs/algorithms.md, "One-step generator"), the fake score a trainable
copy of the frozen real score (docs/algorithms.md, "Fake score").
"""

from __future__ import annotations

import copy
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import DistillConfig
from pipeline.data.encoders import Encoder
from pipeline.diffusion.dmd import OneStepGenerator, student_sigmas
from pipeline.diffusion.loss import sample_sigma
from pipeline.distill import METHODS
from pipeline.executor import TrainSession
from pipeline.models.edm2 import Denoiser
from pipeline.models.edm2_import import load_guide
from pipeline.store import Artifact
from pipeline.tracking import StageRun
from pipeline.training import mixed_precision, zero_nonfinite_grads_
from pipeline.weights import load_denoiser

Labels = torch.Tensor | None  # [B] class indices, None for an unconditional teacher


@dataclass(frozen=True)
class DistillArgs:
    """Everything a training worker needs (picklable)."""

    cfg: DistillConfig
    teacher_loss: dict[str, Any]  # the teacher's P_mean, P_std, weighting, min_snr_gamma, use_uncertainty
    phema: Artifact
    weights: str  # the teacher variant's file in the phema artifact
    guide: str  # URL of the guiding network, folder or EDM2 .pkl ("" = none)
    pair_urls: list[str]  # dmd: the regression pairs
    real_urls: list[str]  # dmd2: the encode shards, real images for the GAN head
    encoder: dict[str, Any]
    probe: Artifact | None  # validation's probe (None: no validation)
    artifact: Artifact
    seed: int
    tracking: StageRun | None = None  # the stage's tracker runs, for rank 0's MetricsLog
    class_counts: list[int] = field(default_factory=list)  # the data's images per class: validation's classes


@dataclass
class Nets:
    """A method's networks and optimisers."""

    generator: OneStepGenerator
    fake: nn.Module  # the fake score (DMD2: with its discriminator head, pipeline/diffusion/gan.py)
    real: Denoiser  # the teacher, frozen
    guide: Denoiser | None  # guides the real score (distill.guidance)
    opt_g: torch.optim.Optimizer
    opt_f: torch.optim.Optimizer


def adamw(params: Any, lr: float, cfg: DistillConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, 0.999), weight_decay=cfg.weight_decay)


class Method(ABC):
    """One distillation method on one worker: `step` makes one iteration on this worker's share of the batch."""

    def __init__(self, args: DistillArgs, nets: Nets, session: TrainSession, encoder: Encoder | None = None) -> None:
        self.args, self.cfg, self.nets, self.session, self.encoder = args, args.cfg, nets, session, encoder
        self.device, self.batch = session.device, args.cfg.batch // session.world_size
        self.gen_model, self.fake_model = session.wrap(nets.generator), session.wrap(nets.fake)  # DDP where distributed

    @classmethod
    def check(cls, args: DistillArgs) -> None:
        """In the driver, before the workers start: what would fail on every worker fails once, here."""

    @classmethod
    def build(cls, args: DistillArgs, session: TrainSession, encoder: Encoder) -> Method:
        """The method on a training worker: the networks on its device, wrapped for DDP."""
        return cls(args, cls.build_nets(args, session.device), session, encoder)

    @classmethod
    def build_nets(cls, args: DistillArgs, device: torch.device) -> Nets:
        """The frozen teacher, G and the fake score copied from it, the guide, and AdamW for G and the fake score."""
        cfg = args.cfg
        real = load_denoiser(args.phema, "network", args.weights).to(device)
        generator = OneStepGenerator.from_teacher(real, cfg.sigma_init).to(device).train()
        generator.net.u_linear.requires_grad_(False)  # G never uses the uncertainty branch
        fake = cls.fake_score(copy.deepcopy(real).requires_grad_(True).train(), args, device)
        guide = load_guide(args.guide).to(device) if args.guide else None
        g_params = [p for p in generator.parameters() if p.requires_grad]
        opt_g, opt_f = adamw(g_params, cfg.lr, cfg), adamw(fake.parameters(), cfg.fake_lr, cfg)
        return Nets(generator, fake, real, guide, opt_g, opt_f)

    @classmethod
    def fake_score(cls, fake: Denoiser, args: DistillArgs, device: torch.device) -> nn.Module:
        """The fake score the method trains, made from a trainable copy of the teacher."""
        return fake

    @abstractmethod
    def begin_chunk(self, seed: int, steps: int) -> None:
        """Open this chunk's data streams, seeded with `seed`, long enough for `steps` iterations."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """One iteration: its numbers for the metrics row, among them `loss_g` and `loss_fake` (the
        divergence guard holds the run to their first values) and `nonfinite_steps` (1.0 when a
        gradient was not finite)."""

    def state(self) -> dict[str, Any]:
        """The method's part of a checkpoint."""
        return {"generator": self.nets.generator.state_dict(), "fake": self.nets.fake.state_dict(),
                "opt_g": self.nets.opt_g.state_dict(), "opt_f": self.nets.opt_f.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.nets.generator.load_state_dict(state["generator"])
        self.nets.fake.load_state_dict(state["fake"])
        self.nets.opt_g.load_state_dict(state["opt_g"])
        self.nets.opt_f.load_state_dict(state["opt_f"])

    def latents(self, batch: int) -> tuple[torch.Tensor, Labels]:
        """G's inputs: unit Gaussian z [batch, C, H, W] and random labels."""
        net = self.nets.real
        z = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=self.device)
        labels = torch.randint(net.num_classes, (batch,), device=self.device) if net.num_classes else None
        return z, labels

    def student_batch(self, model: nn.Module, batch: int, grad: bool) -> tuple[torch.Tensor, Labels]:
        """A batch of the student's outputs and its labels. A multi-step student's step is drawn at random
        and its input made by backward simulation: the student's own earlier steps (no gradient), each
        output re-noised to the next level; then that step's output (with gradient, if `grad`)."""
        z, labels = self.latents(batch)
        sigmas = student_sigmas(self.cfg.student_steps, self.cfg.sigma_init)
        k = int(torch.randint(len(sigmas), ())) if len(sigmas) > 1 else 0
        x = z
        with torch.no_grad(), mixed_precision(self.device):
            for j in range(k):  # a training-mode forward renormalises G's weights in place: these come first
                x = self.nets.generator(x, labels, sigma=sigmas[j] if j else None).float()
                x = x + sigmas[j + 1] * torch.randn_like(x)
        with torch.set_grad_enabled(grad), mixed_precision(self.device):
            return model(x, labels, sigma=sigmas[k] if k else None).float(), labels

    def fake_batch(self, x: torch.Tensor | None, labels: Labels) -> tuple[torch.Tensor, Labels, torch.Tensor]:
        """What a fake-score update learns from: G's outputs `x` (labels), or without x a fresh batch of G
        (DMD2's extra fake-score updates), detached; and noise levels from the teacher's training
        distribution."""
        if x is None:
            x, labels = self.student_batch(self.nets.generator, self.batch, grad=False)
        loss = self.args.teacher_loss
        return x.detach().float(), labels, sample_sigma(self.batch, loss["P_mean"], loss["P_std"], None, self.device)

    def edm2_kwargs(self) -> dict[str, Any]:
        """The teacher's own loss settings, for the fake score's denoising loss."""
        return {k: self.args.teacher_loss[k] for k in ("weighting", "min_snr_gamma", "use_uncertainty")}

    def optimizer_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor,
                       params: list[torch.nn.Parameter]) -> tuple[float, bool]:
        """Backward, non-finite gradients zeroed (as the teacher's), clipping, step: (gradient norm, finite)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finite = zero_nonfinite_grads_(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()
        return float(norm), finite

    def generator_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        params = [p for p in self.nets.generator.parameters() if p.requires_grad]
        return self.optimizer_step(self.nets.opt_g, loss, params)

    def fake_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        return self.optimizer_step(self.nets.opt_f, loss, list(self.nets.fake.parameters()))


def method_class(name: str) -> type[Method]:
    """The class of the method `distill.method` names (METHODS)."""
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)

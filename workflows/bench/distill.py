"""One distill (DMD) step against the sum of its passes, each timed alone; `--method dmd2`: dmd2.py.

    python workflows/bench.py distill
    python workflows/bench.py distill --iters 1   # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial

import torch

from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import distribution_matching_loss, fake_score_loss, lpips_regression_loss, sample_dm_sigma
from pipeline.diffusion.loss import sample_sigma
from pipeline.distill.dmd import DMD
from pipeline.executor import DDPJob, InlineSession
from pipeline.training import CPU_BF16

from . import dmd2
from .common import Pass, backward, distill_args, pair_batches, step_rows, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="ci", choices=("ci", "demo"))
    p.add_argument("--iters", type=int, default=5, help="timed repeats of the step and of each pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="dmd", choices=("dmd", "dmd2"))


def _distill_passes(method: DMD) -> list[Pass]:
    """Each forward/backward a distill step does, to be timed alone: (what, times per step, call)."""
    nets, lpips, cfg, loss = method.nets, method.lpips, method.cfg, method.args.teacher_loss
    g = nets.generator
    b, r, size = cfg.batch, cfg.reg_batch, cfg.lpips_size
    z = torch.randn(b + r, g.denoiser.img_channels, g.denoiser.img_resolution, g.denoiser.img_resolution)
    labels = torch.randint(g.denoiser.num_classes, (b + r,))
    with torch.no_grad():
        x = g(z, labels)
    sigma, noise = sample_sigma(b, loss["P_mean"], loss["P_std"], None, "cpu"), torch.randn_like(x[:b])
    dm_sigma = sample_dm_sigma(b, None, "cpu")
    pixels = x[b:].clamp(-1, 1)
    k = cfg.fake_updates_per_gen  # fake updates per step; all but the last make a fresh batch of G
    per_step = f" (x{k} per step)" if k > 1 else ""

    def fake_loss() -> torch.Tensor:
        return fake_score_loss(nets.fake, x[:b], labels[:b], sigma, noise, weighting=loss["weighting"],
                               min_snr_gamma=loss["min_snr_gamma"], use_uncertainty=loss["use_uncertainty"]).loss

    def no_grad_g() -> None:
        with torch.no_grad():
            g(z[:b], labels[:b])

    passes = [(f"fake score forward+backward (EDM2 loss), {b} images{per_step}", k,
               partial(backward, fake_loss, nets.fake)),
              (f"G forward+backward, {b}+{r} images", 1, partial(backward, lambda: g(z, labels).square().mean(), g)),
              (f"real + fake score forwards (DM gradient), {b} images", 1,
               lambda: distribution_matching_loss(x[:b], labels[:b], nets.real, nets.fake, dm_sigma, noise)),
              (f"LPIPS {cfg.lpips_net} forward+backward, {r} images at {size}px", 1, lambda: lpips_regression_loss(
                  lpips, pixels.clone().requires_grad_(), pixels.flip(0), size).backward())]
    if k > 1:
        passes.insert(0, (f"G forward, no grad, {b} images (x{k - 1} per step)", k - 1, no_grad_g))
    return passes


def run(a: argparse.Namespace) -> None:
    os.environ[CPU_BF16] = "0"  # the step and its passes alone all in fp32, on any CPU
    if a.method == "dmd2":
        dmd2.run(a)
        return
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        args = distill_args(a.preset, tmp)
        method = DMD.build(args, InlineSession(DDPJob("distill", f"{tmp}/checkpoints")), encoder_from_info(args.encoder))
    cfg = args.cfg
    method.pairs = pair_batches(method.nets.real, cfg.reg_batch)  # in place of the pairs' shards
    pretrained = "pretrained" if cfg.lpips_pretrained else "random"
    title = f"distill step ms, {a.preset} preset (LPIPS {cfg.lpips_net} {pretrained}; CPU, {a.threads} thr)"
    table(step_rows(title, method.step, _distill_passes(method), a.iters, "~1 (rest: optimiser, clipping)"))

"""A DMD2 step (GAN head, 5 fake-side updates with real images, no regression) against the sum of its
passes, and its peak memory against a DMD step's.

    python workflows/bench.py distill --method dmd2
    python workflows/bench.py distill --method dmd2 --iters 1   # quick
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import distribution_matching_loss, sample_dm_sigma
from pipeline.diffusion.loss import sample_sigma
from pipeline.distill.dmd import DMD
from pipeline.distill.dmd2 import DMD2
from pipeline.executor import DDPJob, InlineSession

from .common import Pass, backward, distill_args, pair_batches, reset_peak_rss, rss_bytes, step_rows, table


def _dmd2_passes(method: DMD2) -> list[Pass]:
    """Each forward/backward a DMD2 step does, to be timed alone: (what, times per step, call)."""
    nets, cfg, loss = method.nets, method.cfg, method.args.teacher_loss
    g = nets.generator
    b, k = cfg.batch, cfg.fake_updates_per_gen
    z = torch.randn(b, g.denoiser.img_channels, g.denoiser.img_resolution, g.denoiser.img_resolution)
    labels = torch.randint(g.denoiser.num_classes, (b,))
    with torch.no_grad():
        x = g(z, labels)
    sigma, real = sample_sigma(2 * b, loss["P_mean"], loss["P_std"], None, "cpu"), 0.5 * torch.randn_like(x)
    both, labels2 = torch.cat([x, real]), torch.cat([labels, labels])

    def fake_side() -> torch.Tensor:
        denoised, u, logits = nets.fake(both, sigma, labels2, return_u=True, return_logits=True)
        return denoised.square().mean() + u.mean() + logits.mean()

    def g_gan() -> None:  # through the frozen fake score and head to the images
        frozen = [p.requires_grad_(False) for p in nets.fake.parameters()]
        xg = x.clone().requires_grad_()
        nets.fake(xg, sigma[:b], labels, return_logits=True)[1].mean().backward()
        for p in frozen:
            p.requires_grad_(True)

    def no_grad_g() -> None:
        with torch.no_grad():
            g(z, labels)

    return [(f"fake score + head forward+backward, {b} generated + {b} real images (x{k} per step)", k,
             partial(backward, fake_side, nets.fake)),
            (f"G forward, no grad, {b} images (x{k - 1} per step)", k - 1, no_grad_g),
            (f"G forward+backward, {b} images", 1, partial(backward, lambda: g(z, labels).square().mean(), g)),
            (f"real + fake score forwards (DM gradient), {b} images", 1,
             lambda: distribution_matching_loss(x, labels, nets.real, nets.fake, sample_dm_sigma(b, None, "cpu"),
                                                torch.randn_like(x))),
            (f"fake score + head forward+backward to the images (G's GAN term), {b} images", 1, g_gan)]


def _peak_step_bytes(step: Callable[[], Any]) -> int:
    """The rise of this process's peak RSS over one call (after a warm-up call)."""
    step()
    base = reset_peak_rss()
    step()
    return rss_bytes("VmHWM") - base


def run(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        args, dmd_args = distill_args(a.preset, tmp, "dmd2"), distill_args(a.preset, tmp)
        session, encoder = InlineSession(DDPJob("distill", f"{tmp}/checkpoints")), encoder_from_info(args.encoder)
        method, dmd = DMD2.build(args, session, encoder), DMD.build(dmd_args, session, encoder)
    cfg, real = args.cfg, method.nets.real
    shape = (cfg.batch, real.img_channels, real.img_resolution, real.img_resolution)
    # in place of the encode shards and the pairs' shards
    method.reals = itertools.repeat((0.5 * torch.randn(shape), torch.randint(real.num_classes, (cfg.batch,))))
    dmd.pairs = pair_batches(dmd.nets.real, dmd_args.cfg.reg_batch)
    title = f"DMD2 step ms, {a.preset} preset ({cfg.fake_updates_per_gen} fake-side updates; CPU, {a.threads} thr)"
    rows = step_rows(title, method.step, _dmd2_passes(method), a.iters, "<= 1.1")
    dmd2_peak, dmd_peak = _peak_step_bytes(method.step), _peak_step_bytes(dmd.step)
    table([*rows,
           ("peak memory rise of a DMD2 step, MB", f"{dmd2_peak / 2**20:.0f}", ""),
           ("peak memory rise of a DMD step (LPIPS regression), MB", f"{dmd_peak / 2**20:.0f}", "")])

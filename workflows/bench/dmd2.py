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

from pipeline.data.encoders import encoder_from_info, lpips_decoder
from pipeline.diffusion.dmd import distribution_matching_loss, load_lpips
from pipeline.diffusion.loss import sample_sigma
from stages import distill as D

from .common import Pass, backward, distill_args, pair_batches, reset_peak_rss, rss_bytes, step_rows, table


def _dmd2_passes(nets: D.Nets, args: D.DistillArgs) -> list[Pass]:
    """Each forward/backward a DMD2 step does, to be timed alone: (what, times per step, call)."""
    cfg, loss, g = args.cfg, args.teacher_loss, nets.generator
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
             lambda: distribution_matching_loss(x, labels, nets.real, nets.fake, D.sample_dm_sigma(b, None, "cpu"),
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
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args, dmd_args = distill_args(a.preset, tmp, "dmd2"), distill_args(a.preset, tmp)
        nets, dmd_nets = D.build_nets(args, cpu), D.build_nets(dmd_args, cpu)
    cfg, encoder = args.cfg, encoder_from_info(args.encoder)
    shape = (cfg.batch, nets.real.img_channels, nets.real.img_resolution, nets.real.img_resolution)
    reals = itertools.repeat((0.5 * torch.randn(shape), torch.randint(nets.real.num_classes, (cfg.batch,))))

    def step() -> None:
        D.train_step_dmd2(nets, nets.generator, nets.fake, reals, encoder, args, cfg.batch, cpu)

    lpips = load_lpips(dmd_args.cfg.lpips_net, dmd_args.cfg.lpips_pretrained, dmd_args.cfg.lpips_weights)
    to_pixels = lpips_decoder(encoder, dmd_args.cfg.lpips_decoder)
    pairs = pair_batches(dmd_nets.real, dmd_args.cfg.reg_batch)

    def dmd_step() -> None:
        D.train_step(dmd_nets, dmd_nets.generator, dmd_nets.fake, pairs, to_pixels, lpips, dmd_args, cfg.batch, cpu)

    title = f"DMD2 step ms, {a.preset} preset ({cfg.fake_updates_per_gen} fake-side updates; CPU, {a.threads} thr)"
    rows = step_rows(title, step, _dmd2_passes(nets, args), a.iters, "<= 1.1")
    dmd2_peak, dmd_peak = _peak_step_bytes(step), _peak_step_bytes(dmd_step)
    table([*rows,
           ("peak memory rise of a DMD2 step, MB", f"{dmd2_peak / 2**20:.0f}", ""),
           ("peak memory rise of a DMD step (LPIPS regression), MB", f"{dmd_peak / 2**20:.0f}", "")])

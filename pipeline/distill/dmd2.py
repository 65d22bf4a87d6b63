"""DMD2: distribution matching with a GAN term instead of the regression, and no pairs.

A discriminator head reads the fake score's encoder features (pipeline/diffusion/gan.py; `gan_head:
bottleneck` is DMD2's, `encoder` every level's) and learns with the fake score, from one forward over
real images (the encode shards) and G's, noised at the same sigma; G adds `gan_g_weight` x its
non-saturating GAN loss, or with `gan_balance` the weight that sets the two gradients' ratio at G's
output (docs/algorithms.md, "DMD2: two time-scale update and GAN"). `fake_updates_per_gen` fake-side
updates come before each step of G; `student_steps` 2 or 4 trains a multi-step student by backward
simulation (`Method.student_batch`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from pipeline.data.shards import reader
from pipeline.diffusion.gan import (DiscriminatorHead, ScoreWithHead, balanced_gan_weight, discriminator_loss,
                                    generator_loss, head_channels)
from pipeline.diffusion.loss import edm2_error, sample_sigma
from pipeline.distill.dmd import dm_loss, fake_means, step_row
from pipeline.distill.method import DistillArgs, Labels, Method
from pipeline.models.edm2 import Denoiser
from pipeline.training import mixed_precision

Batch = tuple[torch.Tensor, Labels]  # images in model space [B, C, H, W] and their labels


class DMD2(Method):
    """DMD2 with the real images of the encode shards for its GAN head."""

    reals: Iterator[tuple[torch.Tensor, torch.Tensor]]  # this chunk's real images (stored) and labels

    @classmethod
    def fake_score(cls, fake: Denoiser, args: DistillArgs, device: torch.device) -> nn.Module:
        torch.manual_seed(args.seed)  # the head's initial weights
        return ScoreWithHead(fake, DiscriminatorHead(head_channels(fake, args.cfg.gan_head))).to(device).train()

    def begin_chunk(self, seed: int, steps: int) -> None:
        rank, world = self.session.rank, self.session.world_size
        batches = steps * self.cfg.fake_updates_per_gen  # one per fake-side update
        self.reals = iter(reader(self.args.real_urls, self.batch, rank=rank, world_size=world, seed=seed,
                                 shuffle_buffer=1000, resampled=True, num_batches=batches))

    def real_batch(self) -> Batch:
        stored, labels = next(self.reals)
        x = self.encoder.to_model(stored.to(self.device)).float()
        return x, labels.to(self.device) if self.nets.real.num_classes else None

    def fake_update(self, real: Batch, x: torch.Tensor | None = None, labels: Labels = None) -> dict[str, float]:
        """One fake-score and head step: the fake score's denoising loss on G's outputs `x` (labels) or a
        fresh batch of G, detached, plus gan_d_weight x the head's loss, from one forward of the fake score
        over G's images and the `real` ones, noised at the same sigma."""
        batch = self.batch
        with mixed_precision(self.device):
            x, labels, sigma = self.fake_batch(x, labels)
            x_real, real_labels = real
            s = sigma.reshape(-1, 1, 1, 1)
            noised = torch.cat([x + s * torch.randn_like(x), x_real + s * torch.randn_like(x_real)])
            both = None if labels is None else torch.cat([labels, real_labels])
            denoised, u, logits = self.fake_model(noised, torch.cat([sigma, sigma]), both, return_u=True,
                                                  return_logits=True)
            loss = edm2_error(denoised[:batch], u[:batch], x, sigma, **self.edm2_kwargs()).loss
            loss_d = discriminator_loss(logits[batch:], logits[:batch])
            info = {"loss_d": loss_d.item(), "d_acc_real": (logits[batch:] > 0).float().mean().item(),
                    "d_acc_fake": (logits[:batch] < 0).float().mean().item()}
            loss = loss + self.cfg.gan_d_weight * loss_d
        _, finite = self.fake_step(loss)
        return {"loss_fake": loss.item(), "finite": float(finite), **info}

    def generator_update(self, x: torch.Tensor, labels: Labels, fake: dict[str, float]) -> dict[str, float]:
        """G's step on its batch x = G(z): L_DM + w x softplus(-D(x noised)), D the head on the fake
        score's features at a sigma from the teacher's training distribution; w is gan_g_weight, or with
        gan_balance the weight that gives the GAN term's gradient at x that multiple of L_DM's norm there.
        Both gradients are taken at x (the fake score and head get none) and G backpropagates their sum."""
        cfg, loss_cfg = self.cfg, self.args.teacher_loss
        with mixed_precision(self.device):
            loss_dm, info = dm_loss(self, x, labels)
            sigma = sample_sigma(self.batch, loss_cfg["P_mean"], loss_cfg["P_std"], None, self.device)
            _, logits = self.nets.fake(x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x), sigma, labels,
                                       return_logits=True)
            loss_gan = generator_loss(logits)
        grad_dm, = torch.autograd.grad(loss_dm, x, retain_graph=True)
        grad_gan, = torch.autograd.grad(loss_gan, x)  # stops at x: G's graph stays for the backward below
        weight = balanced_gan_weight(grad_dm, grad_gan, cfg.gan_balance) if cfg.gan_balance else cfg.gan_g_weight
        surrogate = (x * (grad_dm + weight * grad_gan)).sum()  # its gradient at x is that of L_DM + w L_GAN
        norm, finite = self.generator_step(surrogate)
        ratio = float(weight * grad_gan.norm() / grad_dm.norm().clamp_min(1e-30))
        terms = {"loss_dm": loss_dm, "loss_gan_g": loss_gan}
        row = step_row(terms, loss_dm + weight * loss_gan, info, norm, finite, fake)
        return {**row, "gan_weight": float(weight), "gan_grad_ratio": ratio}

    def step(self) -> dict[str, float]:
        """One DMD2 iteration: fake_updates_per_gen fake-score + head updates (each with a batch of real
        images; the last on the batch G then steps on), then G's step (`generator_update`)."""
        fakes = [self.fake_update(self.real_batch()) for _ in range(self.cfg.fake_updates_per_gen - 1)]
        x, labels = self.student_batch(self.gen_model, self.batch, grad=True)
        fakes.append(self.fake_update(self.real_batch(), x, labels))
        return self.generator_update(x, labels, fake_means(fakes))

"""DMD: Distribution Matching Distillation with LPIPS regression onto the teacher's pairs.

Each iteration the fake score learns, with the teacher's own denoising loss, from G's outputs
(docs/algorithms.md, "Fake score"); G steps on the distribution-matching loss (docs/algorithms.md,
"Distribution matching loss") of a fresh batch plus `lambda_reg` x LPIPS between G(pair noise) and
the pair's target (docs/algorithms.md, "LPIPS regression"). `fake_updates_per_gen` > 1 adds DMD2's
two time-scale rule (docs/algorithms.md, "DMD2: two time-scale update and GAN"). `dm_loss`,
`fake_means` and `step_row` serve DMD2 too (pipeline/distill/dmd2.py).
"""

from __future__ import annotations

from typing import Iterator

import torch

from pipeline.data.encoders import Encoder, encoder_from_info, lpips_decoder
from pipeline.data.shards import reader
from pipeline.diffusion.dmd import (distribution_matching_loss, fake_score_loss, load_lpips, lpips_regression_loss,
                                    sample_dm_sigma)
from pipeline.distill.method import DistillArgs, Labels, Method, Nets
from pipeline.executor import TrainSession
from pipeline.training import mixed_precision


def dm_loss(method: Method, x: torch.Tensor, labels: Labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distribution-matching loss of G's outputs x, at noise levels of DMD's schedule; the real score
    guided as distill.guidance says."""
    sigma = sample_dm_sigma(method.batch, None, method.device)
    nets = method.nets
    return distribution_matching_loss(x, labels, nets.real, nets.fake, sigma, torch.randn_like(x),
                                      guidance=method.cfg.guidance, guide=nets.guide)


def fake_means(updates: list[dict[str, float]]) -> dict[str, float]:
    """The means of the fake-side updates' numbers; `finite` becomes whether all were."""
    means = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0] if k != "finite"}
    return {**means, "finite": float(all(u["finite"] for u in updates))}


def step_row(terms: dict[str, torch.Tensor], loss: torch.Tensor, info: dict[str, torch.Tensor], norm: float,
             finite: bool, fake: dict[str, float]) -> dict[str, float]:
    """An iteration's numbers: G's loss terms and total, its gradient norm, the DM gradient's normaliser,
    the fake side's means, and whether any gradient was not finite."""
    return {**{k: v.item() for k, v in terms.items()}, "loss_g": loss.item(), "grad_norm": norm,
            "dm_normalizer": float(info["normalizer"].mean()), **{k: v for k, v in fake.items() if k != "finite"},
            "nonfinite_steps": float(not (finite and fake["finite"]))}


class DMD(Method):
    """DMD with its regression pairs (the pairs stage's shards)."""

    pairs: Iterator[tuple[torch.Tensor, ...]]  # this chunk's pairs: noise, target, labels

    def __init__(self, args: DistillArgs, nets: Nets, session: TrainSession, encoder: Encoder | None = None) -> None:
        super().__init__(args, nets, session, encoder)
        assert encoder is not None, "DMD's regression compares decoded images"
        cfg = args.cfg
        self.to_pixels = lpips_decoder(encoder, cfg.lpips_decoder, str(self.device))
        self.lpips = load_lpips(cfg.lpips_net, cfg.lpips_pretrained, cfg.lpips_weights).to(self.device)

    @classmethod
    def check(cls, args: DistillArgs) -> None:
        cfg = args.cfg
        load_lpips(cfg.lpips_net, cfg.lpips_pretrained, cfg.lpips_weights)  # a backbone that cannot be had fails here
        lpips_decoder(encoder_from_info(args.encoder), cfg.lpips_decoder)  # and so does a decoder

    def begin_chunk(self, seed: int, steps: int) -> None:
        rank, world = self.session.rank, self.session.world_size
        self.pairs = iter(reader(self.args.pair_urls, self.cfg.reg_batch // world, rank=rank, world_size=world,
                                 seed=seed, shuffle_buffer=1000, resampled=True, num_batches=steps,
                                 fields=("noise.npy", "target.npy")))

    def fake_update(self, x: torch.Tensor | None = None, labels: Labels = None) -> dict[str, float]:
        """One fake-score step with the teacher's denoising loss on G's outputs `x` (labels), detached;
        without x, on a fresh batch of G (DMD2's extra fake-score updates)."""
        with mixed_precision(self.device):
            x, labels, sigma = self.fake_batch(x, labels)
            loss = fake_score_loss(self.fake_model, x, labels, sigma, torch.randn_like(x), **self.edm2_kwargs()).loss
        _, finite = self.fake_step(loss)
        return {"loss_fake": loss.item(), "finite": float(finite)}

    def step(self) -> dict[str, float]:
        """One DMD iteration. DMD2's two time-scale rule first makes fake_updates_per_gen - 1 fake-score updates
        on fresh batches of G. Then G makes the DM batch (fresh z) and the pair batch in one forward; the
        fake score learns from that DM batch, detached; G steps on L_DM, with the updated fake score, plus
        lambda_reg LPIPS(G(pair noise), pair target). (G's no-grad forwards come first: a training-mode
        forward renormalises its weights in place, which would break the graph of the one with grad.)

        DMD's algorithm updates the fake score after G's step; this order gives G a fake score that has
        seen its batch (docs/results.md compares the two). The price: the fake score's training graph and
        G's coexist, so peak memory is about one fake-score step higher."""
        cfg, batch = self.cfg, self.batch
        fakes = [self.fake_update() for _ in range(cfg.fake_updates_per_gen - 1)]
        z, labels = self.latents(batch)
        pz, py, plabels = (t.to(self.device) for t in next(self.pairs))
        plabels = plabels if self.nets.real.num_classes else None
        all_labels = None if labels is None else torch.cat([labels, plabels])
        with mixed_precision(self.device):
            x_all = self.gen_model(torch.cat([z, pz.float()]), all_labels).float()  # one DDP forward for both losses
        x, x_pairs = x_all[:batch], x_all[batch:]
        fakes.append(self.fake_update(x, labels))
        with mixed_precision(self.device):
            loss_dm, info = dm_loss(self, x, labels)
            loss_reg = lpips_regression_loss(self.lpips, self.to_pixels(x_pairs), self.to_pixels(py.float()),
                                             cfg.lpips_size)
        loss = loss_dm + cfg.lambda_reg * loss_reg
        norm, finite = self.generator_step(loss)
        return step_row({"loss_dm": loss_dm, "loss_reg": loss_reg}, loss, info, norm, finite, fake_means(fakes))

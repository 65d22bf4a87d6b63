"""DMD2's GAN term: a discriminator head on the fake score's encoder features (docs/algorithms.md, "DMD2:
two time-scale update and GAN").

The head reads the fake score's UNet bottleneck (the encoder's output at its lowest resolution; DMD2's
head) or every encoder output (`distill.gan_head: encoder`) for images noised at a sigma, and gives one
logit per image: real (encode shards) or generated. Losses are the non-saturating ones: the head (with
the fake score, on the fake-score side) minimises softplus(-D(real)) + softplus(D(fake)); G minimises
softplus(-D(G(z))).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminatorHead(nn.Module):
    """The fake score's encoder features -> one logit per image [B]. One branch per feature map it reads
    (two convolutions, a mean over space), their outputs concatenated, a linear layer. Built with the
    channels of the last len(channels) encoder outputs it reads: [the bottleneck's] is DMD2's head; every
    level's is a multi-level head, as ADD's and LADD's discriminators read several layers of their feature
    network: the bottleneck, at the lowest resolution, carries little of an image's fine detail."""

    def __init__(self, channels: Sequence[int], hidden: int = 0) -> None:
        super().__init__()
        self.branches = nn.ModuleList(self._branch(c, hidden or c) for c in channels)
        self.out = nn.Linear(sum(hidden or c for c in channels), 1)

    @staticmethod
    def _branch(channels: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(min(32, hidden // 4) or 1, hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        read = features[len(features) - len(self.branches):]
        pooled = [branch(f.float()).mean(dim=(2, 3)) for branch, f in zip(self.branches, read)]
        return self.out(torch.cat(pooled, dim=1)).flatten()


class ScoreWithHead(nn.Module):
    """The fake score and its discriminator head as one module: called as the fake score (x0, and u
    with return_u), or with return_logits also the head's logits, from the same forward (so that
    one DDP wrapper sees both in one pass)."""

    def __init__(self, score: nn.Module, head: DiscriminatorHead) -> None:
        super().__init__()
        self.score, self.head = score, head

    @property
    def sigma_data(self) -> float:
        return self.score.sigma_data

    def u(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.score.u(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                return_u: bool = False, return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.score(x, sigma, labels, return_u=return_u, return_features=return_logits)
        if not return_logits:
            return out
        *score_out, features = out
        return (*score_out, self.head(features))


def head_channels(score: nn.Module, read: str) -> list[int]:
    """Channels of the encoder outputs a head reads from a Denoiser: `bottleneck` (its UNet encoder's
    last) or `encoder` (every one, input resolution first)."""
    channels = [m.out_channels for m in score.unet.enc.values()]
    return channels[-1:] if read == "bottleneck" else channels


def balanced_gan_weight(grad_dm: torch.Tensor, grad_gan: torch.Tensor, ratio: float) -> torch.Tensor:
    """G's GAN weight w at which w x the GAN loss's gradient at G's output has `ratio` x the norm of the
    DM loss's gradient there (DMD2's authors set the two norms equal, then searched around it). The DM
    loss's gradient scales with 1 / (pixels per image) and the GAN loss's does not, so a fixed weight
    tuned at one resolution is another balance at the next; a ratio carries over. Detached: a constant
    of the step."""
    return ratio * grad_dm.detach().norm() / grad_gan.detach().norm().clamp_min(1e-30)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator: softplus(-D(real)) + softplus(D(fake)), means."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator: softplus(-D(G(z))), mean."""
    return F.softplus(-logits_fake.float()).mean()

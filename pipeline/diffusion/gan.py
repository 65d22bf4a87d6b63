"""DMD2's GAN term: a discriminator head on the fake score's bottleneck features (papers.md, DMD2).

The head reads the fake score's UNet bottleneck (the encoder's output at its lowest resolution) for
images noised at a sigma, and gives one logit per image: real (encode shards) or generated. Losses
are the non-saturating ones: the head (with the fake score, on the fake-score side) minimises
softplus(-D(real)) + softplus(D(fake)); G minimises softplus(-D(G(z))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminatorHead(nn.Module):
    """Bottleneck features [B, C, h, w] -> one logit per image [B]: two convolutions, a mean over
    space, a linear layer."""

    def __init__(self, channels: int, hidden: int = 0) -> None:
        super().__init__()
        hidden = hidden or channels
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(min(32, hidden // 4) or 1, hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(features.float()).mean(dim=(2, 3))).flatten()


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


def bottleneck_channels(score: nn.Module) -> int:
    """Channels of a Denoiser's bottleneck features: its UNet encoder's last block's outputs."""
    return list(score.unet.enc.values())[-1].out_channels


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

"""The probe: a small convolutional classifier trained on the dataset itself.

Pretrained feature networks (Inception for FID, DINOv2) cannot be had offline or for data unlike
ImageNet; the probe always can. Its penultimate features give the offline metrics (Fréchet
distance, precision/recall) and its predictions the class accuracy of conditional samples.
Pure math, no I/O: the probe stage trains it, evaluate loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def holdout_mask(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool [N]: whether each dataset index is held out; keyed to the index, not to the order."""
    if len(indices) == 0:
        return np.zeros(0, bool)
    draws = np.random.default_rng([seed, 0x9B0BE]).random(int(indices.max()) + 1)
    return draws[indices] < fraction


def to_input(images: np.ndarray, resolution: int, device: torch.device | str) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, r, r] in [-1, 1] (antialiased resize when r != H)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ProbeNet(nn.Module):
    """Two 3x3 conv blocks per level (average pooling between levels), global average pooling,
    a `feature_dim` ReLU embedding (the penultimate features) and a linear classifier."""

    def __init__(self, num_classes: int, resolution: int, channels: tuple[int, ...] = (32, 64, 128),
                 feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"num_classes": int(num_classes), "resolution": int(resolution),
                       "channels": [int(c) for c in channels], "feature_dim": int(feature_dim)}
        self.resolution, self.num_classes = resolution, num_classes
        layers: list[nn.Module] = []
        c_in = 3
        for level, c in enumerate(channels):
            layers += ([nn.AvgPool2d(2)] if level else []) + _conv_block(c_in, c) + _conv_block(c, c)
            c_in = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, r, r] in [-1, 1] -> (features [B, feature_dim], logits [B, num_classes])."""
        features = F.relu(self.embed(self.body(x).mean(dim=(2, 3))))
        return features, self.head(features)


@dataclass(frozen=True)
class ProbeTraining:
    """How the probe is trained: AdamW with cosine decay, random flips and translations."""

    epochs: int = 20
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations by up to 1/8 of the size (edge pixels repeated):
    label-preserving for natural images and for the synthetic shapes."""
    b, _, h, w = x.shape
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    s = max(h // 8, 1)
    dy, dx = (torch.randint(0, 2 * s + 1, (2, b), generator=gen).to(x.device))
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def train_probe(net: ProbeNet, x: torch.Tensor, labels: torch.Tensor, how: ProbeTraining, seed: int) -> list[float]:
    """Train `net` in place on x [N, 3, r, r], labels [N]; returns the mean loss of each epoch.
    Batches and flips come from `seed`; the last partial batch of an epoch is dropped."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(len(x) // how.batch, 1)
    total = how.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=how.lr, weight_decay=how.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    net.train()
    losses = []
    for _ in range(how.epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * how.batch:(step + 1) * how.batch]
            _, logits = net(_augment(x[idx], gen))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item()
        losses.append(epoch_loss / steps_per_epoch)
    net.eval()
    return losses


@torch.no_grad()
def embed(net: ProbeNet, x: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, D], predicted class int64 [N]) of x [N, 3, r, r], in eval mode."""
    feats, preds = [], []
    for lo in range(0, len(x), batch):
        f, logits = net(x[lo:lo + batch])
        feats.append(f.double().cpu().numpy())
        preds.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds)


class ProbeFeatures:
    """The trained probe as evaluate uses it: uint8 images -> penultimate features and predictions."""

    name = "probe"

    def __init__(self, net: ProbeNet, device: str) -> None:
        self.net = net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self.device = device
        self.dim = net.config["feature_dim"]

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] -> (features float64 [B, D], predicted class [B])."""
        return embed(self.net, to_input(images, self.net.resolution, self.device))

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.embed(images)[0]

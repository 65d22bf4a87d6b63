"""One sampling interface: a `Generator` turns seeds and classes into samples, whatever network is behind it.

    gen = Generator.teacher(net, num_steps=32)              # EDM's Heun sampler, 2N - 1 evaluations
    gen = Generator.teacher(net, 32, guidance=1.4, guide=g)  # with autoguidance / CFG-style guidance
    gen = Generator.student(net, sigmas=[80.0])              # the one-step student (or k levels: k steps)
    x, labels = gen(seeds, classes)                          # model space [B, C, H, W], labels [B] or None

Every draw of a sample (its noise, its label, a multi-step student's re-noising) comes from its own
seed's generator (`seeded_draws`), so a sample is the same in any batch, on any worker. `classes`, if
given, replace the labels drawn from the seeds. Evaluate, pairs, distill's validation, the teacher's
choice, `onestep sample` and the benchmarks all sample through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.diffusion.dmd import OneStepGenerator, student_sample
from pipeline.diffusion.sampler import edm_sampler, seeded_draws

Labels = Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Samples:
    """What a generator made of a batch of seeds: the first noise draw [B, C, H, W] (DMD's pairs keep it),
    the samples in model space [B, C, H, W], and the labels [B] (None for an unconditional network)."""

    noise: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor | None


@dataclass(frozen=True)
class Generator:
    """A network and the rule that turns `draws` unit Gaussian tensors per seed (and labels) into samples."""

    net: nn.Module  # a denoiser D(x, sigma, labels) -> x0 with img_channels, img_resolution, num_classes
    draws: int  # unit Gaussian tensors per seed: 1 for the Heun sampler, a k-step student's k
    rule: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (draws [k, B, ...], labels) -> x
    nfe: int  # network evaluations per sample

    @classmethod
    def teacher(cls, net: nn.Module, num_steps: int, guidance: float = 1.0, guide: nn.Module | None = None) -> Generator:
        """EDM's deterministic Heun sampler from sigma_max = 80 (docs/algorithms.md, "Heun sampler")."""
        def rule(draws: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return edm_sampler(net, draws[0], labels, num_steps=num_steps, guidance=guidance, guide=guide)

        return cls(net, 1, rule, 2 * num_steps - 1)

    @classmethod
    def student(cls, net: nn.Module, sigmas: Sequence[float]) -> Generator:
        """G(z) = D(sigmas[0] z, sigmas[0]); a k-step student re-noises its output to each later level and
        applies G again (docs/algorithms.md, "One-step generator")."""
        sigmas = [float(s) for s in sigmas]
        generator = OneStepGenerator(net, sigmas[0])

        def rule(draws: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return student_sample(generator, draws[0], labels, sigmas, list(draws[1:]))

        return cls(net, len(sigmas), rule, len(sigmas))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.net.img_channels, self.net.img_resolution, self.net.img_resolution

    def sample(self, seeds: Sequence[int], classes: Labels = None, device: torch.device | str = "cpu") -> Samples:
        """The samples of these seeds, without gradients."""
        draws, labels = seeded_draws(seeds, self.shape, self.net.num_classes, self.draws, device, classes)
        with torch.no_grad():
            return Samples(draws[0], self.rule(draws, labels), labels)

    def __call__(self, seeds: Sequence[int], classes: Labels = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(samples in model space [B, C, H, W], labels [B] or None) of these seeds."""
        out = self.sample(seeds, classes, device)
        return out.x, out.labels

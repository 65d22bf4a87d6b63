"""pipeline/sampling.py: a Generator is the composition it replaced (each seed's draws, then the Heun sampler or
the student's steps), bit for bit, and a seed's sample is the same in any batch."""

import pytest
import torch
from torch import nn

from pipeline.diffusion.dmd import OneStepGenerator, student_sample, student_sigmas
from pipeline.diffusion.sampler import edm_sampler, seeded_draws, seeded_noise
from pipeline.models.edm2 import build_denoiser
from pipeline.sampling import Generator

SEEDS = [3, 14, 15, 92, 65, 35, 89]


def _net(num_classes: int, seed: int = 0) -> nn.Module:
    """A ci network with its weights moved off their initial values, so that its output depends on x and labels."""
    torch.manual_seed(seed)
    net = build_denoiser("ci", 16, 3, num_classes).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


class ClassGaussian(nn.Module):
    """The exact denoiser of per-element N(0.1 label, 0.5^2) data: every output element depends on its own sample
    only, through element-wise operations, so a batch of any size gives every sample the same bits."""

    img_channels, img_resolution, num_classes = 3, 4, 10

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        mu = 0.1 * labels.to(x.dtype).reshape(-1, 1, 1, 1)
        sig2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return (0.25 * x + sig2 * mu) / (0.25 + sig2)


@pytest.mark.parametrize("num_classes, classes", [(10, None), (10, [4, 0, 9, 4, 1, 2, 2]), (0, None)])
def test_the_teacher_generator_is_seeded_noise_then_the_heun_sampler(num_classes, classes):
    net, guide = _net(num_classes), _net(num_classes, seed=1)
    noise, labels = seeded_noise(SEEDS, (3, 16, 16), num_classes, "cpu", classes)
    out = Generator.teacher(net, 3).sample(SEEDS, classes)
    assert torch.equal(out.noise, noise) and torch.equal(out.x, edm_sampler(net, noise, labels, num_steps=3))
    assert (out.labels is None) == (labels is None) and (labels is None or torch.equal(out.labels, labels))
    guided = Generator.teacher(net, 3, guidance=1.5, guide=guide)(SEEDS, classes)[0]
    assert torch.equal(guided, edm_sampler(net, noise, labels, num_steps=3, guidance=1.5, guide=guide))
    assert not torch.equal(guided, out.x)
    assert Generator.teacher(net, 3).nfe == 5


@pytest.mark.parametrize("sigmas", [[80.0], [2.5], student_sigmas(2), student_sigmas(4)])
def test_the_student_generator_is_seeded_draws_then_the_students_steps(sigmas):
    net = _net(10)
    classes = [1, 2, 3, 4, 5, 6, 7]
    draws, labels = seeded_draws(SEEDS, (3, 16, 16), 10, len(sigmas), "cpu", classes)
    with torch.no_grad():
        expected = student_sample(OneStepGenerator(net, sigmas[0]), draws[0], labels, sigmas, list(draws[1:]))
    gen = Generator.student(net, sigmas)
    out = gen.sample(SEEDS, classes)
    assert torch.equal(out.x, expected) and torch.equal(out.noise, draws[0]) and torch.equal(out.labels, labels)
    assert gen.nfe == len(sigmas) and not out.x.requires_grad


@pytest.mark.parametrize("gen", [Generator.teacher(ClassGaussian(), 6),
                                 Generator.student(ClassGaussian(), student_sigmas(4))], ids=["teacher", "student"])
def test_a_seeds_sample_is_the_same_in_any_batch(gen):
    x, labels = gen(SEEDS)
    for split in ([[s] for s in SEEDS], [SEEDS[:2], SEEDS[2:3], SEEDS[3:]]):
        parts = [gen(part) for part in split]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    shuffled = [SEEDS[i] for i in (6, 0, 5, 1, 4, 2, 3)]
    assert torch.equal(gen(shuffled)[0], x[[6, 0, 5, 1, 4, 2, 3]])
    assert len(set(labels.tolist())) > 1 and not torch.equal(x[0], x[1])

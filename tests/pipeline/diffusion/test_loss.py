"""EDM2 loss and Min-SNR-gamma weighting against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from pipeline.diffusion.loss import edm2_loss, edm_lambda, min_snr_weight, sample_sigma
from pipeline.models.edm2 import build_denoiser


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeNet(nn.Module):
    """Returns a fixed x0 and a fixed per-sample u; records what it was called with."""

    def __init__(self, x0: torch.Tensor, u: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.u_value = x0, nn.Parameter(u.clone())

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, return_u: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.seen = (x, sigma, labels)
        return (self.x0, self.u_value) if return_u else self.x0


def test_sample_sigma_is_log_normal_and_seeded() -> None:
    sigma = sample_sigma(50_000, -0.8, 1.6, torch.Generator().manual_seed(1), "cpu")
    again = sample_sigma(50_000, -0.8, 1.6, torch.Generator().manual_seed(1), "cpu")
    assert sigma.shape == (50_000,) and torch.equal(sigma, again)
    assert sigma.log().mean().item() == pytest.approx(-0.8, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.6, abs=0.03)


def test_edm_lambda_known_values() -> None:
    # (sigma^2 + 0.25) / (0.5 sigma)^2
    expected = torch.tensor([8.0, 5.0, 104.0])
    torch.testing.assert_close(edm_lambda(torch.tensor([0.5, 1.0, 0.1]), 0.5), expected)


def test_min_snr_weight_known_values() -> None:
    sigma = torch.tensor([0.1, 0.2, 1.0, 4.0])
    # min(1/sigma^2, 5) / lambda: min(100,5)/104, min(25,5)/29, min(1,5)/5, min(1/16,5)/(16.25/4)
    expected = torch.tensor([5 / 104, 5 / 29, 1 / 5, (1 / 16) / (16.25 / 4)])
    torch.testing.assert_close(min_snr_weight(sigma, 5.0, 0.5), expected)


def test_edm2_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    y, noise, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, u, labels = torch.tensor([0.2, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([1, 0])
    net = FakeNet(x0, u)
    out = edm2_loss(net, y, labels, sigma, noise)
    lam = [(0.04 + 0.25) / 0.01, (4.0 + 0.25) / 1.0]
    sq = (x0 - y) ** 2
    per_b = [(lam[b] * math.exp(-u[b].item()) * sq[b] + u[b].item()).sum() for b in range(2)]
    torch.testing.assert_close(out.loss, (per_b[0] + per_b[1]) / 2)
    expected_per_sample = torch.stack([lam[b] * sq[b].mean() for b in range(2)])
    torch.testing.assert_close(out.per_sample, expected_per_sample)
    torch.testing.assert_close(net.seen[0], y + sigma[:, None, None, None] * noise)
    assert net.seen[1] is sigma and net.seen[2] is labels
    assert out.loss.requires_grad and not out.per_sample.requires_grad


def test_min_snr_without_uncertainty_weights_by_clamped_snr() -> None:
    torch.manual_seed(0)
    y, noise, x0 = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0])
    net = FakeNet(x0, torch.full([4], 7.0))  # u = 7 must be ignored
    out = edm2_loss(net, y, None, sigma, noise, weighting="min_snr", use_uncertainty=False)
    weight = torch.tensor([5.0, 5.0, 1.0, 1 / 9]).reshape(-1, 1, 1, 1)  # min(1/sigma^2, 5)
    torch.testing.assert_close(out.loss, (weight * (x0 - y) ** 2).sum() / 4)
    torch.testing.assert_close(out.per_sample, (weight * (x0 - y) ** 2).mean(dim=(1, 2, 3)))


def test_unknown_weighting_is_an_error() -> None:
    net, y = FakeNet(torch.zeros(1, 1, 2, 2), torch.zeros(1)), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="edm2.*min_snr"):
        edm2_loss(net, y, None, torch.ones(1), torch.zeros_like(y), weighting="snr")


def test_weighted_loss_is_one_at_init_for_data_with_sigma_data_std() -> None:
    # D = c_skip (y + n) at init: E[lambda (D - y)^2] = lambda c_out^2 = 1 if std(y) = sigma_data
    torch.manual_seed(0)
    net = build_denoiser("ci", 16, 3, 0, channels=8)
    y, noise = 0.5 * torch.randn(32, 3, 16, 16), torch.randn(32, 3, 16, 16)
    out = edm2_loss(net, y, None, sample_sigma(32, -0.8, 1.6, None, "cpu"), noise)
    assert out.per_sample.mean().item() == pytest.approx(1.0, abs=0.05)


def stripes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes on 16x16: horizontal (0) or vertical (1) sinusoids of random phase, std 0.5."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    grid = torch.arange(16.0) * (2 * math.pi / 8)
    rows = torch.sin(grid[None, :, None] + phase).expand(n, 16, 16)
    cols = torch.sin(grid[None, None, :] + phase).expand(n, 16, 16)
    images = torch.where(labels[:, None, None] == 0, rows, cols) * (0.5 * math.sqrt(2))
    return images[:, None], labels


@pytest.mark.slow
def test_adam_on_tiny_unet_reduces_loss() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = build_denoiser("ci", 16, 1, 2, channels=8)
    y_eval, labels_eval = stripes(64, gen)
    sigma_eval = sample_sigma(64, -0.8, 1.6, gen, "cpu")
    noise_eval = torch.randn(y_eval.shape, generator=gen)

    def eval_error() -> float:
        with torch.no_grad():
            out = edm2_loss(
                net.eval(), y_eval, labels_eval, sigma_eval, noise_eval, use_uncertainty=False
            )
        return out.per_sample.mean().item()

    before = eval_error()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    net.train()
    for _ in range(200):
        y, labels = stripes(8, gen)
        sigma, noise = sample_sigma(8, -0.8, 1.6, gen, "cpu"), torch.randn(y.shape, generator=gen)
        out = edm2_loss(net, y, labels, sigma, noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert before == pytest.approx(1.0, abs=0.1)
    assert eval_error() < 0.6 * before

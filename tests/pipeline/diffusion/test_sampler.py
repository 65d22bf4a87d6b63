"""EDM Heun sampler on Gaussian data with the exact denoiser (docs/algorithms.md, "Heun sampler")."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.diffusion.sampler import edm_sampler, seeded_draws, seeded_noise, time_steps

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


Problem = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mu [6], s [6], noise [4, 6]


def gaussian_denoiser(mu: torch.Tensor, s: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Exact D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2) for data ~ N(mu, s^2) per element."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        sig2 = sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    return denoise


def ode_solution(x_start: torch.Tensor, mu: torch.Tensor, s: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact solution of dx/dsigma = (x - D)/sigma from x_T at sigma_max.

    x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)
    """
    return mu + (x_start - mu) * torch.sqrt((s**2 + sigma**2) / (s**2 + SIGMA_MAX**2))


@pytest.fixture
def problem() -> Problem:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(6, dtype=torch.float64, generator=gen)
    s = torch.rand(6, dtype=torch.float64, generator=gen) + 0.2
    noise = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    return mu, s, noise


def test_time_steps_schedule() -> None:
    t = time_steps(32)
    assert t.dtype == torch.float64 and t.shape == (33,)
    assert t[0].item() == pytest.approx(SIGMA_MAX) and t[31].item() == pytest.approx(SIGMA_MIN)
    assert t[32].item() == 0.0 and bool((t[:-1] > t[1:]).all())
    i = 10  # docs/algorithms.md, "Heun sampler": t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    expected = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(expected, rel=1e-12)


def test_heun_converges_at_second_order(problem: Problem) -> None:
    mu, s, noise = problem
    denoise = gaussian_denoiser(mu, s)
    # the last step (sigma_min -> 0) returns x0 = D(x, sigma_min): apply it to the exact ODE state
    x_min = ode_solution(noise * SIGMA_MAX, mu, s, SIGMA_MIN)
    reference = denoise(x_min, torch.full((4,), SIGMA_MIN, dtype=torch.float64), None)
    steps = (32, 64, 128)
    errors = [(edm_sampler(denoise, noise, num_steps=n) - reference).abs().max().item() for n in steps]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.5 < r < 4.8 for r in ratios), f"errors {errors}, ratios {ratios}"  # measured 4.27, 4.13
    exact_at_zero = ode_solution(noise * SIGMA_MAX, mu, s, 0.0)
    assert (edm_sampler(denoise, noise, num_steps=128) - exact_at_zero).abs().max().item() < 2e-3


def test_network_evaluations_and_dtype(problem: Problem) -> None:
    mu, s, noise = problem
    calls: list[torch.dtype] = []
    inner = gaussian_denoiser(mu.float(), s.float())

    def counting(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.dtype)
        return inner(x, sigma, labels)

    out = edm_sampler(counting, noise.float(), num_steps=7)
    assert len(calls) == 2 * 7 - 1 and set(calls) == {torch.float32} and out.dtype == torch.float32


def test_guidance(problem: Problem) -> None:
    mu, s, noise = problem
    main, guide = gaussian_denoiser(mu, s), gaussian_denoiser(0.5 * mu, 1.5 * s)
    plain = edm_sampler(main, noise, num_steps=16)
    same_guide = edm_sampler(main, noise, num_steps=16, guidance=3.0, guide=main)
    torch.testing.assert_close(same_guide, plain, rtol=0, atol=1e-12)

    def manual(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        g = guide(x, sigma, labels)
        return g + 2.0 * (main(x, sigma, labels) - g)  # docs/algorithms.md, "Guidance"

    guided = edm_sampler(main, noise, num_steps=16, guidance=2.0, guide=guide)
    torch.testing.assert_close(guided, edm_sampler(manual, noise, num_steps=16), rtol=0, atol=1e-10)
    assert (guided - plain).abs().max().item() > 0.1
    with pytest.raises(ValueError, match="guide"):
        edm_sampler(main, noise, guidance=2.0)


def test_seeded_noise_does_not_depend_on_batch() -> None:
    seeds = [3, 14, 15, 92, 65, 35, 89]
    noise, labels = seeded_noise(seeds, (2, 4, 4), num_classes=10, device="cpu")
    assert noise.shape == (7, 2, 4, 4) and labels.shape == (7,) and labels.dtype == torch.int64
    for i, seed in enumerate(seeds):
        one_noise, one_label = seeded_noise([seed], (2, 4, 4), num_classes=10, device="cpu")
        assert torch.equal(one_noise[0], noise[i]) and torch.equal(one_label[0], labels[i])
    order = np.random.default_rng(0).permutation(7)
    perm_noise, perm_labels = seeded_noise([seeds[i] for i in order], (2, 4, 4), 10, "cpu")
    assert torch.equal(perm_noise, noise[order]) and torch.equal(perm_labels, labels[order])
    assert not torch.equal(noise[0], noise[1]) and len(set(labels.tolist())) > 1
    unconditional, none = seeded_noise(seeds, (2, 4, 4), num_classes=0, device="cpu")
    assert none is None and torch.equal(unconditional, noise)


def test_seeded_draws_start_with_seeded_noise_and_draw_new_noise_after_the_label() -> None:
    seeds = [3, 14, 15]
    draws, labels = seeded_draws(seeds, (2, 4, 4), 10, 3, "cpu")
    noise, same_labels = seeded_noise(seeds, (2, 4, 4), 10, "cpu")
    assert draws.shape == (3, 3, 2, 4, 4) and torch.equal(draws[0], noise) and torch.equal(labels, same_labels)
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    one, _ = seeded_draws([14], (2, 4, 4), 10, 3, "cpu")
    assert torch.equal(one[:, 0], draws[:, 1])  # per seed, whatever the batch


def test_sampler_per_sample_result_does_not_depend_on_batch() -> None:
    seeds = [0, 1, 2, 3, 4, 5, 6]
    s = torch.full((3, 4, 4), 0.5)

    def class_denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        mu = 0.1 * labels.to(x.dtype).reshape(-1, 1, 1, 1)  # per-sample mean from the label
        sig2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    noise, labels = seeded_noise(seeds, (3, 4, 4), num_classes=10, device="cpu")
    batch = edm_sampler(class_denoiser, noise, labels, num_steps=8)
    for i, seed in enumerate(seeds):
        one_noise, one_label = seeded_noise([seed], (3, 4, 4), num_classes=10, device="cpu")
        single = edm_sampler(class_denoiser, one_noise, one_label, num_steps=8)
        torch.testing.assert_close(single[0], batch[i], rtol=1e-6, atol=1e-6)

"""EDM deterministic Heun sampler and per-sample seeded noise (docs/algorithms.md, "Heun sampler").

A denoiser is any callable `denoise(x, sigma, labels) -> x0` with x [B, ...], sigma a [B]
tensor of x's dtype, and labels [B] class indices or None.
"""

from collections.abc import Callable, Sequence

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def time_steps(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Noise levels t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0; float64 [N+1]."""
    if num_steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need num_steps >= 1 and 0 < sigma_min < sigma_max, got {num_steps}, {sigma_min}, {sigma_max}"
        )
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho  # docs/algorithms.md, "Heun sampler": t_i
    return torch.cat([t, t.new_zeros(1)])


def guided(denoise: DenoiseFn, guide: DenoiseFn | None, guidance: float, dtype: torch.dtype) -> DenoiseFn:
    """float64 denoiser D = g + w (D_main - g) (docs/algorithms.md, "Guidance"); the networks see `dtype`."""
    if guidance != 1 and guide is None:
        raise ValueError(f"guidance={guidance} needs a guide network; pass guide= or use guidance=1")

    def d(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x_in, sigma_in = x.to(dtype), sigma.to(dtype).expand(x.shape[0])
        x0 = denoise(x_in, sigma_in, labels).to(torch.float64)
        if guidance == 1:
            return x0
        g = guide(x_in, sigma_in, labels).to(torch.float64)
        return g + guidance * (x0 - g)

    return d


@torch.no_grad()
def edm_sampler(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    guide: DenoiseFn | None = None,
) -> torch.Tensor:
    """Deterministic 2nd-order Heun from x = noise * sigma_max to sigma = 0; 2N-1 evaluations."""
    d = guided(denoise, guide, guidance, noise.dtype)
    t = time_steps(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    if x.ndim == 4:  # images: NHWC convolutions are faster on CPUs (docs/results.md), with the same results
        x = x.contiguous(memory_format=torch.channels_last)
    for t_cur, t_next in zip(t[:-1], t[1:]):
        slope = (x - d(x, t_cur, labels)) / t_cur  # docs/algorithms.md, "Heun sampler"
        x_next = x + (t_next - t_cur) * slope
        if t_next > 0:  # Heun correction, skipped on the last step to sigma = 0
            slope_next = (x_next - d(x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_cur) * (slope + slope_next) / 2
        x = x_next
    return x.to(noise.dtype).contiguous()


SEED_LIMIT = 1 << 32  # torch's CPU generator (mt19937) keeps only a seed's low 32 bits


def seeded_draws(
    seeds: Sequence[int], shape: tuple[int, ...], num_classes: int, draws: int, device: torch.device | str,
    classes: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`draws` unit Gaussian tensors per seed, [draws, B, *shape], and labels [B] (None if num_classes == 0),
    all from one generator per seed: the first noise, then the label, then the later draws (a multi-step
    student's re-noising). `classes`, if given, replace the labels drawn (they are drawn all the same, so
    the later draws do not move). Seeds must be in [0, 2^32): torch would fold larger ones onto smaller ones."""
    if len(seeds) == 0:
        raise ValueError("seeded noise needs at least one seed")
    if not all(0 <= int(s) < SEED_LIMIT for s in seeds):
        raise ValueError(f"seeds must be in [0, 2^32): torch's generator keeps only the low 32 bits, so "
                         f"{next(int(s) for s in seeds if not 0 <= int(s) < SEED_LIMIT)} would repeat a smaller seed's noise")
    noise, labels = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))  # CPU generator: same draws on any device
        first = torch.randn(shape, generator=gen)
        if num_classes > 0:
            labels.append(torch.randint(num_classes, (), generator=gen))
        noise.append(torch.stack([first, *(torch.randn(shape, generator=gen) for _ in range(draws - 1))]))
    batch_labels = None if not labels else torch.stack(labels) if classes is None else torch.as_tensor(classes)
    return torch.stack(noise, dim=1).to(device), None if batch_labels is None else batch_labels.to(device)


def seeded_noise(
    seeds: Sequence[int], shape: tuple[int, ...], num_classes: int, device: torch.device | str,
    classes: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise [B, *shape] and labels [B] (None if num_classes == 0; `classes` if given), one generator per seed."""
    draws, labels = seeded_draws(seeds, shape, num_classes, 1, device, classes)
    return draws[0], labels

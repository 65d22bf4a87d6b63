"""EDM2 denoising loss with learned uncertainty, and the optional Min-SNR-gamma weighting.

docs/algorithms.md, "EDM2 loss and learned uncertainty" and "Min-SNR-gamma weighting". `net` is any denoiser with
`net(x, sigma, labels) -> x0`, `net.u(sigma) -> [B]` and a `sigma_data` attribute.
"""

from typing import NamedTuple

import torch
from torch import nn

WEIGHTINGS = ("edm2", "min_snr")


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to backward: sum over elements / batch size
    per_sample: torch.Tensor  # [B] detached mean weighted squared error, without the u term


def sample_sigma(
    batch: int,
    P_mean: float,
    P_std: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Log-normal noise levels: ln(sigma) ~ N(P_mean, P_std^2), shape [batch]."""
    z = torch.randn(batch, generator=generator, device=device)
    return (z * P_std + P_mean).exp()


def edm_lambda(sigma: torch.Tensor | float, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    sigma = torch.as_tensor(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def min_snr_weight(sigma: torch.Tensor | float, gamma: float, sigma_data: float) -> torch.Tensor:
    """w(sigma) = min(1/sigma^2, gamma) / lambda(sigma): turns EDM's loss into Min-SNR-gamma.

    Convention: SNR = 1/sigma^2, so lambda(sigma) * w(sigma) = min(SNR, gamma) is Min-SNR's
    x0-prediction weight. With sigma_data = 0.5 the alternative SNR' = sigma_data^2/sigma^2
    would move the clamp point (from sigma = gamma^-1/2 to sigma = sigma_data gamma^-1/2).
    """
    sigma = torch.as_tensor(sigma)
    return (1 / sigma**2).clamp(max=gamma) / edm_lambda(sigma, sigma_data)


def edm2_loss(
    net: nn.Module,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    weighting: str = "edm2",
    min_snr_gamma: float = 5.0,
    use_uncertainty: bool = True,
    sigma_data: float = 0.5,
) -> LossOutput:
    """EDM2 loss: per element (lambda / exp(u)) (D(y + sigma eps, sigma) - y)^2 + u.

    y, noise (unit-variance eps): [B, C, H, W]; sigma: [B]. With weighting="min_snr" lambda is
    multiplied by `min_snr_weight`; use_uncertainty=False sets u = 0. `net` may be wrapped
    (DDP, torch.compile): it is only called, as net(x, sigma, labels, return_u=True).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    denoised, u = net(y + sigma.reshape(-1, 1, 1, 1) * noise, sigma, labels, return_u=True)
    return edm2_error(denoised, u, y, sigma, weighting, min_snr_gamma, use_uncertainty, sigma_data)


def edm2_error(denoised: torch.Tensor, u: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, weighting: str = "edm2",
               min_snr_gamma: float = 5.0, use_uncertainty: bool = True, sigma_data: float = 0.5) -> LossOutput:
    """`edm2_loss` from the network's outputs: denoised D(y + sigma eps) [B, C, H, W] and u [B]."""
    s = sigma.reshape(-1, 1, 1, 1)
    weight = edm_lambda(s, sigma_data)
    if weighting == "min_snr":
        weight = weight * min_snr_weight(s, min_snr_gamma, sigma_data)
    err = weight * (denoised.float() - y) ** 2  # [B, C, H, W]
    u = u.float().reshape(-1, 1, 1, 1) if use_uncertainty else torch.zeros_like(s)
    loss = (err / u.exp() + u).sum() / y.shape[0]
    return LossOutput(loss=loss, per_sample=err.detach().mean(dim=(1, 2, 3)))

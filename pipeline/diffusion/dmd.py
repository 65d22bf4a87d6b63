"""Distribution Matching Distillation: one-step generator, DM gradient, fake-score and LPIPS losses.

docs/algorithms.md, "One-step generator", "Distribution matching loss", "Fake score" and "LPIPS
regression". Score networks are denoisers `D(x, sigma, labels) -> x0`
(pipeline.diffusion.sampler's interface); the real score is the frozen teacher, the fake score a
trainable copy of it fitted to the generator's outputs with the teacher's own loss.
"""

import copy
import warnings
from typing import Any

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from pipeline import store
from pipeline.diffusion.loss import LossOutput, edm2_loss
from pipeline.diffusion.sampler import DenoiseFn, guided, time_steps

SIGMA_MAX = 80.0  # DMD: G(z) = D(sigma_max z, sigma_max) for an EDM teacher
DM_EPS = 1e-8  # guards the per-sample normaliser of the DM gradient
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class OneStepGenerator(nn.Module):
    """G(z, labels) = D_G(sigma_max z, sigma_max, labels) (docs/algorithms.md, "One-step generator"; DMD's
    sigma_max is 80, the teacher's; a lower one, as SiD's 2.5, starts G where the teacher's output
    still depends on z).

    `net` is a Denoiser, possibly wrapped by DDP; it is only called, so the wrapper sees every
    use. state_dict keys are the Denoiser's under the prefix "net." (plus "module." under DDP).
    """

    def __init__(self, net: nn.Module, sigma_max: float = SIGMA_MAX) -> None:
        super().__init__()
        self.net, self.sigma_max = net, sigma_max

    @classmethod
    def from_teacher(cls, teacher: nn.Module, sigma_max: float = SIGMA_MAX) -> "OneStepGenerator":
        """A generator initialised with a trainable copy of the teacher's weights."""
        return cls(copy.deepcopy(teacher).requires_grad_(True), sigma_max)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, sigma: float | None = None) -> torch.Tensor:
        """z [B, C, H, W] unit Gaussian noise, labels [B] class indices or None -> x [B, C, H, W]. With
        `sigma`, a later step of a multi-step student: z is then that step's input, noised to sigma."""
        if sigma is None:
            return self.net(self.sigma_max * z, z.new_full((z.shape[0],), self.sigma_max), labels)
        return self.net(z, z.new_full((z.shape[0],), sigma), labels)

    @property
    def denoiser(self) -> nn.Module:
        """The inner Denoiser, unwrapped from DDP, to export in the teacher's format."""
        if isinstance(self.net, (DistributedDataParallel, DataParallel)):
            return self.net.module
        return self.net


def student_sigmas(steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = 0.002, rho: float = 7.0) -> list[float]:
    """A `steps`-step student's fixed noise levels (DMD2's multi-step generator): the first `steps` of a
    Karras schedule of steps + 1 levels from sigma_max to sigma_min; [80] for one step, [80, 2.52] for
    two, [80, 17.5, 2.52, 0.17] for four."""
    levels = [float(s) for s in time_steps(steps + 1, sigma_min, sigma_max, rho)[:steps]]
    return [float(sigma_max), *levels[1:]]  # exactly sigma_max first: (s^(1/rho))^rho is off by rounding


def student_sample(generator: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: list[float],
                   renoise: list[torch.Tensor]) -> torch.Tensor:
    """A multi-step student's samples: x = G(noise) at sigmas[0]; then for each later level, G of x
    re-noised to it with `renoise[k - 1]` (unit Gaussian, like noise)."""
    x = generator(noise, labels)
    for sigma, n in zip(sigmas[1:], renoise):
        x = generator(x + sigma * n, labels, sigma=sigma)
    return x


def karras_sigmas(
    num_levels: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """The Karras rho-schedule table in ASCENDING order: [0] = sigma_min, [-1] = sigma_max; float64."""
    return time_steps(num_levels, sigma_min, sigma_max, rho)[:-1].flip(0)


def sample_dm_sigma(
    batch: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    min_index: int = 20,
    max_index: int = 980,
) -> torch.Tensor:
    """sigma [batch] float32 = karras_sigmas()[i], i uniform in [min_index, max_index] (DMD)."""
    table = karras_sigmas()
    if not 0 <= min_index <= max_index < len(table):
        raise ValueError(f"need 0 <= min_index <= max_index < {len(table)}, got {min_index}, {max_index}")
    i = torch.randint(min_index, max_index + 1, (batch,), generator=generator, device=device)
    return table.to(device=device, dtype=torch.float32)[i]


@torch.no_grad()
def _dm_gradient(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    real_score: DenoiseFn,
    fake_score: DenoiseFn,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    guide: DenoiseFn | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B, C, H, W] = (mu_fake - mu_real) / mean_{C,H,W}|x - mu_real| and that normaliser [B]."""
    x = x.detach().float()
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise  # [B, C, H, W]
    x_t = x_t.contiguous(memory_format=torch.channels_last)  # NHWC convolutions: faster on CPUs, same values
    mu_real = guided(real_score, guide, guidance, x_t.dtype)(x_t, sigma, labels).float()
    mu_fake = fake_score(x_t, sigma, labels).float()  # the fake score is never guided
    normalizer = (x - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=DM_EPS)
    return (mu_fake - mu_real) / normalizer, normalizer.flatten()


def distribution_matching_loss(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    real_score: DenoiseFn,
    fake_score: DenoiseFn,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    guidance: float = 1.0,
    guide: DenoiseFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD loss 0.5 * mse(x, stopgrad(x - grad)) for x = G(z) [B, C, H, W] (docs/algorithms.md, "Distribution matching loss").

    sigma [B], noise [B, C, H, W] unit Gaussian. The real score is guided as g + w (real - g)
    when guidance != 1. mse takes the mean over all B*C*H*W elements, so d loss / d x =
    grad / x.numel(). info: per-sample normaliser [B] and grad norm [B], detached.
    """
    grad, normalizer = _dm_gradient(x, labels, real_score, fake_score, sigma, noise, guidance, guide)
    loss = 0.5 * F.mse_loss(x.float(), x.detach().float() - grad)
    return loss, {"normalizer": normalizer, "grad_norm": grad.flatten(1).norm(dim=1)}


def fake_score_loss(
    fake_score: nn.Module,
    x_fake_detached: torch.Tensor,
    labels: torch.Tensor | None,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    **edm2_kwargs: Any,
) -> LossOutput:
    """The teacher's EDM2 loss (edm2_loss, same kwargs) on G's outputs, detached from G (DMD)."""
    return edm2_loss(fake_score, x_fake_detached.detach(), labels, sigma, noise, **edm2_kwargs)


def lpips_regression_loss(
    lpips_model: nn.Module, generated: torch.Tensor, target: torch.Tensor, size: int = 224
) -> torch.Tensor:
    """Mean LPIPS(G(z), y) (DMD regression loss), both bilinearly resized to size x size.

    generated, target: [B, 3, H, W] images in [-1, 1] (latent models: decode first).
    """
    def resize(img: torch.Tensor) -> torch.Tensor:
        return F.interpolate(img.float(), size=(size, size), mode="bilinear", align_corners=False)

    return lpips_model(resize(generated), resize(target)).mean()


LPIPS_RANDOM_SEED = 0  # for pretrained_backbone=False


def load_lpips(net: str = "vgg", pretrained_backbone: bool = True, weights: str = "") -> nn.Module:
    """Frozen LPIPS v0.1 in eval mode; its linear heads ship with the lpips package.

    The ImageNet backbone comes from torchvision's hub cache (downloaded on first use), or from
    `weights`: a local path or fsspec URL of torchvision's file for that backbone (offline
    clusters). pretrained_backbone=False builds a random backbone and downloads nothing (tests).
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {list(LPIPS_BACKBONES)}")
    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    try:
        # A random backbone is seeded: the same network in every worker, run and resume.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips passes `pretrained=`
            torch.manual_seed(LPIPS_RANDOM_SEED)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone or bool(weights),
                                verbose=False)
    except (OSError, RuntimeError) as err:
        raise ValueError(
            f"could not load the ImageNet weights of LPIPS's {net!r} backbone ({err}). Offline: fetch "
            f"{url} elsewhere and set distill.lpips_weights to its path or URL, or copy it to "
            f"{torch.hub.get_dir()}/checkpoints/ (the torch hub cache; TORCH_HOME moves it)"
        ) from err
    if weights:
        _load_backbone(model.net, weights, net, url)
    return model.eval().requires_grad_(False)


def _load_backbone(backbone: nn.Module, weights: str, net: str, url: str) -> None:
    """torchvision's `features.{i}.*` tensors into LPIPS's slices, which keep torchvision's indices
    as their module names ("slice2.3.weight" is "features.3.weight")."""
    try:
        path = store.local_file(weights, "lpips")
    except OSError as err:  # no such file or object, no credentials, an unknown protocol
        raise ValueError(f"cannot read distill.lpips_weights = {store.redact(weights)!r} "
                         f"({type(err).__name__}: {err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict({k: state[f"features.{k.split('.', 1)[1]}"] for k in backbone.state_dict()})
    except Exception as err:  # not a state dict, another network's tensors
        raise ValueError(
            f"distill.lpips_weights = {store.redact(weights)!r} is not torchvision's {net} ImageNet file "
            f"({type(err).__name__}: {err}): it should be a path or URL of {url.rsplit('/', 1)[1]} from {url}"
        ) from err

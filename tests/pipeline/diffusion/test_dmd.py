"""DMD math against closed forms: Gaussian scores, the Karras table, LPIPS offline (docs/algorithms.md, "Distribution matching loss")."""

import copy
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import lpips
import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.diffusion.dmd import (
    OneStepGenerator,
    distribution_matching_loss,
    fake_score_loss,
    karras_sigmas,
    load_lpips,
    lpips_regression_loss,
    sample_dm_sigma,
)
from pipeline.diffusion.loss import edm2_loss
from pipeline.diffusion.sampler import DenoiseFn as Score
from pipeline.models.edm2 import Denoiser, build_denoiser


def karras(i: int, n: int = 1000) -> float:
    """Level i of the ascending rho = 7 table over [0.002, 80], by hand."""
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    return (lo + i / (n - 1) * (hi - lo)) ** 7


class GaussianScore(nn.Module):
    """Exact denoiser of data ~ N(mu, s^2) per channel: D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).

    mu is a parameter so a test can check that no gradient reaches a score network.
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor | float) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu.reshape(1, -1, 1, 1).clone())
        self.s2 = torch.as_tensor(s).reshape(1, -1, 1, 1) ** 2

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        sig2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return (self.s2 * x + sig2 * self.mu) / (self.s2 + sig2)


def tiny_denoiser(num_classes: int = 4) -> Denoiser:
    """A ci-preset EDM2 denoiser with its zero-initialised gains set to 1 (a non-trivial F)."""
    torch.manual_seed(0)
    net = build_denoiser("ci", 8, 3, num_classes, channels=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, so DDP can wrap a CPU module."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# --- the one-step generator ---


def test_generator_starts_as_teacher_at_sigma_max_and_trains() -> None:
    teacher = tiny_denoiser().requires_grad_(False)
    gen = OneStepGenerator.from_teacher(teacher)
    z, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    x = gen(z, labels)
    expected = teacher(80 * z, torch.full((2,), 80.0), labels)
    assert gen.sigma_max == 80.0 and torch.allclose(x, expected, atol=1e-6)
    assert x.abs().mean() > 0.1  # F is not the zero function: the check above means something
    assert not torch.allclose(x, teacher(z, torch.full((2,), 80.0), labels), atol=1e-3)
    x.square().mean().backward()
    assert gen.denoiser.unet.out_gain.grad.abs() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(gen.state_dict()) == {f"net.{k}" for k in teacher.state_dict()}
    fresh = build_denoiser("ci", 8, 3, 4, channels=16)
    fresh.load_state_dict(gen.denoiser.state_dict())
    assert torch.allclose(fresh.eval()(80 * z, 80.0, labels), x, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Grad strides do not match")  # 1x1 conv weights: harmless
def test_generator_calls_a_ddp_wrapped_denoiser(process_group: None) -> None:
    inner = tiny_denoiser().train()
    # the generator never uses the uncertainty branch: DDP must be told, or that branch frozen
    gen = OneStepGenerator(DistributedDataParallel(inner, find_unused_parameters=True))
    for _ in range(2):  # a second step fails if DDP's reduction did not finish
        gen(torch.randn(2, 3, 8, 8), torch.tensor([0, 2])).square().mean().backward()
    assert gen.denoiser is inner and inner.unet.out_gain.grad.abs() > 0


# --- noise levels ---


def test_karras_table_and_dm_sigma_range() -> None:
    table = karras_sigmas()
    assert table.dtype == torch.float64 and table.shape == (1000,)
    assert bool((table[1:] > table[:-1]).all())  # ascending
    assert table[0].item() == pytest.approx(0.002) and table[-1].item() == pytest.approx(80.0)
    assert table[20].item() == pytest.approx(karras(20), rel=1e-12)
    assert table[980].item() == pytest.approx(karras(980), rel=1e-12)
    assert karras(20) == pytest.approx(0.0032316, rel=1e-4) and karras(980) == pytest.approx(72.0539, rel=1e-5)
    sigma = sample_dm_sigma(20_000, torch.Generator().manual_seed(0), "cpu")
    assert sigma.shape == (20_000,) and sigma.dtype == torch.float32
    assert bool(torch.isin(sigma, table.float()).all())
    assert sigma.min().item() == pytest.approx(karras(20))  # both ends are drawn
    assert sigma.max().item() == pytest.approx(karras(980))
    with pytest.raises(ValueError, match="max_index"):
        sample_dm_sigma(4, None, "cpu", min_index=10, max_index=1000)


# --- the distribution-matching gradient on Gaussians ---


def test_dm_gradient_points_from_fake_to_real_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    mu_r, mu_f, s = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([-1.0, 1.0, 2.0, 2.5]), 0.7
    real, fake = GaussianScore(mu_r, s), GaussianScore(mu_f, s)
    x = (mu_f.reshape(1, -1, 1, 1) + s * torch.randn(64, 4, 3, 3, generator=gen)).requires_grad_(True)
    sigma = sample_dm_sigma(64, gen, "cpu")
    noise = torch.randn(x.shape, generator=gen)
    loss, info = distribution_matching_loss(x, None, real, fake, sigma, noise)
    loss.backward()
    direction = (mu_f - mu_r).sign().reshape(1, -1, 1, 1).expand_as(x)
    assert torch.equal(x.grad.sign(), direction)  # descent moves every x toward mu_r
    assert real.mu.grad is None and fake.mu.grad is None  # scores ran without grad
    with torch.no_grad():  # docs/algorithms.md, "Distribution matching loss": mean_{C,H,W}|x - mu_real(x_t)|, at x, not at x_t
        normalizer = (x - real(x + sigma.reshape(-1, 1, 1, 1) * noise, sigma, None)).abs().mean((1, 2, 3))
    assert torch.allclose(info["normalizer"], normalizer, rtol=1e-5)


def test_dm_gradient_exact_value_and_normaliser() -> None:
    # noise = 0: x_t = x, x - D_r(x) = sigma^2 (x - mu_r) / (s^2 + sigma^2) and
    # D_f(x) - D_r(x) = sigma^2 (mu_f - mu_r) / (s^2 + sigma^2), so
    # grad = (mu_f - mu_r) / mean|x - mu_r| per sample, whatever sigma is.
    mu_r, mu_f, s = torch.tensor([0.0, 1.0]), torch.tensor([0.5, -1.0]), 0.5
    offset = torch.tensor([[0.2, -0.6], [1.0, 3.0]]).reshape(2, 2, 1, 1).expand(2, 2, 2, 2)
    x = (mu_r.reshape(1, 2, 1, 1) + offset).clone().requires_grad_(True)
    sigma = torch.tensor([0.3, 5.0])
    loss, info = distribution_matching_loss(
        x, None, GaussianScore(mu_r, s), GaussianScore(mu_f, s), sigma, torch.zeros_like(x)
    )
    loss.backward()
    mean_abs = torch.tensor([0.4, 2.0])  # mean|x - mu_r| per sample
    grad = (mu_f - mu_r).reshape(1, 2, 1, 1) / mean_abs.reshape(2, 1, 1, 1)
    assert torch.allclose(x.grad, grad.expand_as(x) / x.numel(), rtol=1e-5)  # mean reduction
    assert loss.item() == pytest.approx(0.5 * grad.expand_as(x).square().mean().item(), rel=1e-5)
    shrink = sigma**2 / (s**2 + sigma**2)
    assert torch.allclose(info["normalizer"], shrink * mean_abs, rtol=1e-5)
    assert torch.allclose(info["grad_norm"], grad.expand_as(x).flatten(1).norm(dim=1), rtol=1e-5)


class AffineGenerator(nn.Module):
    """G(z) = a z + b per channel: its outputs are exactly N(b, a^2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.a.reshape(1, -1, 1, 1) * z + self.b.reshape(1, -1, 1, 1)


def test_dm_moves_a_one_step_generator_to_the_real_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    mu_r, s_r = torch.tensor([2.0, -1.5, 1.0]), torch.tensor([0.5, 1.5, 1.0])
    real, g = GaussianScore(mu_r, s_r), AffineGenerator(3)
    opt = torch.optim.Adam(g.parameters(), lr=0.02)
    start = (g.b - mu_r).norm().item()
    for _ in range(200):
        fake = GaussianScore(g.b.detach(), g.a.detach())  # the exact score of G's current outputs
        z = torch.randn(128, 3, 2, 2, generator=gen)
        sigma, noise = sample_dm_sigma(128, gen, "cpu"), torch.randn(128, 3, 2, 2, generator=gen)
        loss, _ = distribution_matching_loss(g(z), None, real, fake, sigma, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (g.b - mu_r).norm().item() < start / 50  # measured: 2.7 -> 5e-4
    assert torch.allclose(g.a.abs(), s_r, atol=0.02)  # the spread matches too


# --- guidance ---


def test_guidance_applies_to_the_real_score_only() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=gen)
    sigma, noise = sample_dm_sigma(4, gen, "cpu"), torch.randn(4, 2, 3, 3, generator=gen)
    real = GaussianScore(torch.tensor([1.0, -1.0]), 0.5)
    guide = GaussianScore(torch.tensor([0.0, 0.5]), 0.8)
    fake = GaussianScore(torch.tensor([-0.5, 0.0]), 1.2)

    def dm_grad(real_score: Score, **guiding: object) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        loss, info = distribution_matching_loss(xg, None, real_score, fake, sigma, noise, **guiding)
        loss.backward()
        return xg.grad, info["normalizer"]

    plain = dm_grad(real)
    assert all(torch.equal(a, b) for a, b in zip(dm_grad(real, guidance=1.0, guide=guide), plain))

    def manual(x_t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return guide(x_t, s, labels) + 2.0 * (real(x_t, s, labels) - guide(x_t, s, labels))

    guided, expected = dm_grad(real, guidance=2.0, guide=guide), dm_grad(manual)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(guided, expected))
    assert not torch.allclose(guided[0], plain[0])
    with pytest.raises(ValueError, match="guide"):
        dm_grad(real, guidance=2.0)


# --- fake score loss ---


def test_fake_score_loss_is_edm2_loss_on_detached_outputs() -> None:
    gen = OneStepGenerator.from_teacher(tiny_denoiser())
    fake = tiny_denoiser().train()
    labels = torch.tensor([0, 1, 2, 3])
    x = gen(torch.randn(4, 3, 8, 8), labels)  # still attached to G's graph
    sigma, noise = torch.tensor([0.1, 0.5, 2.0, 20.0]), torch.randn(4, 3, 8, 8)
    kwargs = dict(weighting="min_snr", min_snr_gamma=5.0)
    out = fake_score_loss(fake, x, labels, sigma, noise, **kwargs)
    ref = edm2_loss(copy.deepcopy(fake), x.detach(), labels, sigma, noise, **kwargs)
    assert torch.allclose(out.loss, ref.loss) and torch.allclose(out.per_sample, ref.per_sample)
    out.loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert fake.unet.out_gain.grad.abs() > 0 and fake.u_linear.weight.grad.abs().sum() > 0


# --- LPIPS regression loss ---


class ShapeSpy(nn.Module):
    """Records the input shapes, then calls the real LPIPS."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.shapes += [a.shape, b.shape]
        return self.inner(a, b)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_offline_frozen_with_packaged_heads(net: str) -> None:
    model = load_lpips(net, pretrained_backbone=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    heads = torch.load(Path(lpips.__file__).parent / f"weights/v0.1/{net}.pth", map_location="cpu")
    assert torch.equal(model.lin0.model[1].weight, heads["lin0.model.1.weight"])
    spy = ShapeSpy(model)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert lpips_regression_loss(spy, x, x).item() == 0.0
    assert spy.shapes == [(1, 3, 224, 224)] * 2


def test_a_random_lpips_backbone_is_the_same_whatever_the_rng_state() -> None:
    torch.manual_seed(1)
    a = load_lpips("alex", pretrained_backbone=False).state_dict()
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = load_lpips("alex", pretrained_backbone=False).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lpips_loss_is_positive_and_differentiable() -> None:
    model = load_lpips("alex", pretrained_backbone=False)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    generated = (target + 0.3 * torch.randn(2, 3, 16, 16, generator=gen)).requires_grad_(True)
    loss = lpips_regression_loss(model, generated, target)
    loss.backward()
    assert loss.item() > 0 and generated.grad.abs().sum() > 0 and torch.isfinite(generated.grad).all()


def test_lpips_download_failure_says_how_to_work_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    with pytest.raises(ValueError, match=r"alexnet-owt-.*TORCH_HOME"):
        load_lpips("alex")
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        load_lpips("resnet")


@pytest.mark.slow  # a full-size AlexNet saved and read twice
def test_lpips_backbone_from_a_weights_file_or_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(3)
    alexnet = torchvision.models.alexnet()  # random: the file layout of torchvision's ImageNet download
    torch.save(alexnet.state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    random_backbone = load_lpips("alex", pretrained_backbone=False).net
    for weights in (str(tmp_path / "alexnet-owt-7be5be79.pth"), f"file://{tmp_path}/alexnet-owt-7be5be79.pth"):
        model = load_lpips("alex", weights=weights)
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
        expected = [m for m in alexnet.features if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == len(expected) == 5
        assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(convs, expected))
        assert not torch.equal(model.net.slice1[0].weight, random_backbone.slice1[0].weight)
        assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"lpips_weights = .*vgg16.*not torchvision's alex.*alexnet-owt"):
        torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg16.pth")
        load_lpips("alex", weights=str(tmp_path / "vgg16.pth"))
    with pytest.raises(ValueError, match=r"lpips_weights = .*missing.pth"):
        load_lpips("alex", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"cannot read distill.lpips_weights = 'memory://nowhere/alexnet.pth'"):
        load_lpips("alex", weights="memory://nowhere/alexnet.pth")

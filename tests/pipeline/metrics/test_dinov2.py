"""The FD_DINOv2 feature network (EDM2) on a seeded random-weight ViT-L/14: file layouts, the
official position-embedding resampling and EDM2's preprocessing, against independent computations.

ViT-L runs at ~1-4 s per image on 2 CPU cores: the random files are saved once per module, and each
test feeds the network as few images as it can.
"""

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from pipeline.metrics import dinov2

pytestmark = pytest.mark.slow  # a full-size ViT-L/14 on the CPU: seconds per image

OFFICIAL_GRID = 37  # 518 / 14: the grid both weight files store


def random_vit(img_size: int, seed: int) -> torch.nn.Module:
    """timm's ViT-L/14 DINOv2 with seeded random weights, scaled so every block moves the CLS token
    (timm's own init takes ~9 s on 2 cores, and its 1e-5 layer scale leaves the CLS token
    nearly independent of the image)."""
    with torch.device("meta"):
        model = timm.create_model(dinov2.TIMM_MODEL, pretrained=False, img_size=img_size, num_classes=0)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.normal_(0, 0.5)
            elif p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)  # unit-variance outputs
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def edm2_preprocess(x: np.ndarray) -> torch.Tensor:
    """EDM2's steps through torchvision: bicubic antialiased resize to 224, [0, 1], ImageNet mean/std."""
    t = torch.tensor(x).permute(0, 3, 1, 2).float()
    t = TF.resize(t, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(t / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random ViT-L/14 at 518x518 (37x37 position grid) in timm's and the official layout."""
    folder = tmp_path_factory.mktemp("dinov2")
    state = random_vit(518, seed=0).state_dict()
    assert state["pos_embed"].shape == (1, 1 + OFFICIAL_GRID**2, 1024)
    save_file(state, str(folder / "model.safetensors"))
    official = {**state, "mask_token": torch.randn(1, 1024)}  # keys as timm's, plus the iBOT mask token
    torch.save(official, folder / "dinov2_vitl14_pretrain.pth")
    return {"timm": folder / "model.safetensors", "official": folder / "dinov2_vitl14_pretrain.pth"}


@pytest.fixture(scope="module")
def loaded(files: dict[str, Path]) -> dinov2.Dinov2Features:
    return dinov2.load_dinov2(str(files["timm"]))


@pytest.fixture(scope="module")
def small_images() -> np.ndarray:
    return images(2, 16, seed=0)


@pytest.fixture(scope="module")
def small_features(loaded: dinov2.Dinov2Features, small_images: np.ndarray) -> np.ndarray:
    return loaded.features(small_images)


@pytest.mark.slow
def test_official_and_timm_files_by_path_and_url_are_the_same_network(
    files: dict[str, Path], loaded: dinov2.Dinov2Features, small_images: np.ndarray,
    small_features: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    official = dinov2.load_dinov2(str(files["official"]))
    np.testing.assert_array_equal(official.features(small_images), small_features)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = files["official"].as_uri()
    assert url.startswith("file:///")
    assert same_parameters(dinov2.load_dinov2(url).model, official.model)  # same weights: same features
    assert len(list((tmp_path / "xdg" / "onestep" / "dinov2").glob("*/dinov2_vitl14_pretrain.pth"))) == 1


def torch_bicubic_matrix(size_out: int, size_in: int, scale: float) -> np.ndarray:
    """[out, in] weights of PyTorch's bicubic for a given scale_factor: source coordinate
    (i + 0.5) / scale - 0.5, Keys' cubic with A = -0.75, taps clamped at the edges."""
    def keys(t: float, a: float = -0.75) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    w = np.zeros((size_out, size_in))
    for i in range(size_out):
        src = (i + 0.5) / scale - 0.5
        for k in range(math.floor(src) - 1, math.floor(src) + 3):
            w[i, min(max(k, 0), size_in - 1)] += keys(src - k)
    return w


def test_position_embedding_is_the_official_run_time_resampling(
    files: dict[str, Path], loaded: dinov2.Dinov2Features,
) -> None:
    stored = load_file(str(files["timm"]))["pos_embed"].double().numpy()  # [1, 1 + 37*37, 1024]
    w = torch_bicubic_matrix(16, OFFICIAL_GRID, (16 + 0.1) / OFFICIAL_GRID)  # DINOv2's 0.1 offset
    grid = stored[0, 1:].reshape(OFFICIAL_GRID, OFFICIAL_GRID, 1024)
    expected = np.einsum("ia,abc,jb->ijc", w, grid, w).reshape(256, 1024)
    actual = loaded.model.pos_embed.detach().double().numpy()
    assert actual.shape == (1, 257, 1024)
    np.testing.assert_array_equal(actual[0, 0], stored[0, 0])  # the class token's embedding as is
    np.testing.assert_allclose(actual[0, 1:], expected, rtol=1e-5, atol=1e-5)
    plain = torch_bicubic_matrix(16, OFFICIAL_GRID, 16 / OFFICIAL_GRID)  # a resize without the offset
    assert np.abs(np.einsum("ia,abc,jb->ijc", plain, grid, plain).reshape(256, 1024) - expected).max() > 1e-2


def test_a_16x16_grid_loads_without_resampling(loaded: dinov2.Dinov2Features, tmp_path: Path) -> None:
    save_file(loaded.model.state_dict(), str(tmp_path / "model.safetensors"))  # timm's ViT-L/14 built at 224
    assert same_parameters(dinov2.load_dinov2(str(tmp_path / "model.safetensors")).model, loaded.model)
    pos_embed = loaded.model.pos_embed.detach()
    assert dinov2.resample_pos_embed(pos_embed, 16) is pos_embed


def test_features_are_edm2_preprocessing_then_the_network(
    loaded: dinov2.Dinov2Features, small_images: np.ndarray, small_features: np.ndarray,
) -> None:
    large_images = images(2, 256, seed=1)  # downsampled: the antialiasing matters
    features = np.concatenate([small_features, loaded.features(large_images)])
    assert features.shape == (4, 1024) and features.dtype == np.float64 and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).mean() > 0.1  # the image matters (features ~N(0, 1))
    assert loaded.dim == dinov2.DINOV2_DIM == 1024 and loaded.name == "dinov2"
    with torch.no_grad():
        x = torch.cat([edm2_preprocess(small_images), edm2_preprocess(large_images)])
        expected = loaded.model(x).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_unloadable_weights_fail_fast_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    torch.save({"pos_embed": torch.zeros(1, 1 + OFFICIAL_GRID**2, 768)}, tmp_path / "vit_b.pth")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1, whatever the environment
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cases = {  # weights -> (as the message names it: user:password redacted, reason)
        str(tmp_path / "missing.pth"): (str(tmp_path / "missing.pth"), "no file"),
        str(tmp_path / "garbage.pth"): (str(tmp_path / "garbage.pth"), "cannot read"),
        str(tmp_path / "list.pth"): (str(tmp_path / "list.pth"), "is not a state dict"),
        str(tmp_path / "linear.pth"): (str(tmp_path / "linear.pth"), "has no pos_embed"),
        str(tmp_path / "vit_b.pth"): (str(tmp_path / "vit_b.pth"), "not DINOv2 ViT-L/14.*Missing.*size mismatch"),
        "memory://user:secret@nowhere/model.safetensors": ("memory://nowhere/model.safetensors", "cannot copy"),
        "hub": ("hub", "cannot download.*OfflineModeIsEnabled"),
    }
    fix = (r"download model.safetensors of the Hugging Face model timm/vit_large_patch14_dinov2.lvd142m .*"
           r"dinov2_vitl14_pretrain.pth.*copy it where every worker can read it.*set refstats.dinov2_weights=")
    for weights, (shown, reason) in cases.items():
        start = time.monotonic()
        match = f"(?s)refstats.dinov2_weights='{re.escape(shown)}': [^:]*{reason}.*{fix}"
        with pytest.raises(ValueError, match=match) as info:
            dinov2.load_dinov2(weights)
        assert time.monotonic() - start < 5, (weights, info.value)


def test_hub_weights_come_from_the_hf_cache_through_the_same_loader(
    files: dict[str, Path], loaded: dinov2.Dinov2Features, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    commit = "0" * 40
    repo = tmp_path / "hf" / "models--timm--vit_large_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").symlink_to(files["timm"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert same_parameters(dinov2.load_dinov2("hub").model, loaded.model)

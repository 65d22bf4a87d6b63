"""RGB and VAE encoders: exact pixel round trip, the SD latent normalisation, offline loading."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.data.encoders import RgbEncoder, VaeEncoder, lpips_decoder, make_encoder
from helpers import save_tiny_decoder, save_tiny_vae

# docs/algorithms.md, "Latent encoding": SD VAE latent statistics; scale = 0.5/raw_std, bias = -raw_mean*scale.
RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15])
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def _images(batch: int = 2, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def test_rgb_round_trip_is_exact() -> None:
    images = (np.arange(4 * 8 * 8 * 3) % 256).astype(np.uint8).reshape(4, 8, 8, 3)  # every value
    enc = RgbEncoder()
    stored = enc.encode(images)
    assert stored.dtype == np.float16 and stored.shape == (4, 3, 8, 8)
    assert stored.min() == -1 and stored.max() == 1
    x = enc.to_model(torch.from_numpy(stored))
    assert x.dtype == torch.float32
    assert np.array_equal(enc.decode(x), images)


def test_vae_to_model_samples_then_normalises() -> None:
    enc = VaeEncoder("never-loaded")  # to_model needs no network
    mean = torch.tensor(RAW_MEAN, dtype=torch.float32)[None, :, None, None].expand(1, 4, 64, 64)
    std = torch.tensor(RAW_STD, dtype=torch.float32)[None, :, None, None].expand(1, 4, 64, 64)
    stored = torch.cat([mean, std], dim=1)
    x = enc.to_model(stored, torch.Generator().manual_seed(5))
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    # z ~ N(raw_mean, raw_std^2) -> (z - raw_mean) * 0.5/raw_std = 0.5 * noise
    torch.testing.assert_close(x, 0.5 * noise, rtol=1e-5, atol=1e-5)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.03
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.full((4,), 0.5), rtol=0.05, atol=0)
    deterministic = torch.cat([mean + std, torch.zeros_like(std)], dim=1)  # std 0: no noise
    torch.testing.assert_close(enc.to_model(deterministic), torch.full((1, 4, 64, 64), 0.5))
    assert not torch.equal(x, enc.to_model(stored, torch.Generator().manual_seed(6)))


def test_vae_encode_decode_with_tiny_model(tiny_vae: str) -> None:
    from diffusers import AutoencoderKL

    enc = VaeEncoder(tiny_vae)
    assert len(pickle.dumps(enc)) < 10_000  # nothing loaded yet
    images = _images()
    stored = enc.encode(images)
    assert enc.downsample == 2 and stored.dtype == np.float16 and stored.shape == (2, 8, 8, 8)
    assert (stored[:, 4:] > 0).all() and stored[:, :4].std() > 0
    reference = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():  # the VAE sees pixels in [0, 1]
        posterior = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        np.testing.assert_allclose(stored[:, :4], posterior.latent_dist.mean.numpy(),
                                   atol=2e-3, rtol=2e-3)
        x = enc.to_model(torch.from_numpy(stored), torch.Generator().manual_seed(0))
        scale = torch.tensor(0.5 / RAW_STD, dtype=torch.float32)[:, None, None]
        z = x / scale + torch.tensor(RAW_MEAN, dtype=torch.float32)[:, None, None]
        expected = (reference.decode(z).sample.clamp(0, 1) * 255).round().to(torch.uint8)
    decoded = enc.decode(x)
    assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected.permute(0, 2, 3, 1).numpy()).max() <= 1
    assert len(pickle.dumps(enc)) < 10_000  # pickling drops the loaded model


def test_vae_from_fsspec_url(tiny_vae: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for path in Path(tiny_vae).iterdir():
        store.write_bytes(f"memory://encoders-test/tiny/{path.name}", path.read_bytes())
    enc = make_encoder("vae", vae="memory://encoders-test/tiny")
    local = VaeEncoder(tiny_vae)
    assert np.array_equal(enc.encode(_images()), local.encode(_images()))
    assert list((tmp_path / "cache").rglob("config.json"))
    info = json.loads(json.dumps(enc.info()))
    assert info["vae"] == "memory://encoders-test/tiny" and info["downsample"] == 2
    np.testing.assert_allclose(info["scale"], 0.5 / RAW_STD, rtol=1e-6)
    np.testing.assert_allclose(info["bias"], -RAW_MEAN * 0.5 / RAW_STD, rtol=1e-6)


def test_unloadable_vae_fails_fast_and_clearly(tmp_path: Path) -> None:
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: otherwise the hub retries ~23 s
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"no-such-org/no-such-vae.*save_pretrained.*encode\.vae="):
        VaeEncoder("no-such-org/no-such-vae").encode(_images())
    with pytest.raises(ValueError, match="no folder .*missing-vae"):
        _ = VaeEncoder(str(tmp_path / "missing-vae")).downsample
    assert time.monotonic() - start < 10


def test_make_encoder() -> None:
    rgb = make_encoder("rgb")
    assert isinstance(rgb, RgbEncoder) and rgb.info()["stored_channels"] == 3
    vae = make_encoder("vae", vae="/models/vae", device="cpu")
    assert isinstance(vae, VaeEncoder) and (vae.stored_channels, vae.model_channels) == (8, 4)
    with pytest.raises(ValueError, match="unknown encoder 'bogus'"):
        make_encoder("bogus")


def test_the_lighter_lpips_decoder_takes_sd_scaled_latents_and_is_differentiable(tiny_vae: str,
                                                                                 tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    decoder = save_tiny_decoder(tmp_path / "taesd")
    enc = VaeEncoder(tiny_vae)
    x = (0.5 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    pixels = lpips_decoder(enc, decoder)(x)
    scale = torch.tensor(0.5 / RAW_STD, dtype=torch.float32)[:, None, None]
    z = x.detach() / scale + torch.tensor(RAW_MEAN, dtype=torch.float32)[:, None, None]  # the VAE's raw latents
    with torch.no_grad():  # SD's scaled latents z * 0.18215, over the decoder's own scaling_factor (0.5),
        # decode to what the VAE gives: [0, 1] here, as EDM2 feeds the VAE
        expected = AutoencoderTiny.from_pretrained(decoder).decode(z * 0.18215 / 0.5).sample * 2 - 1
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels.detach(), expected)
    pixels.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert lpips_decoder(enc, "") == enc.to_pixels  # by default the VAE's own decoder


def test_the_lpips_decoder_needs_a_latent_model_and_a_loadable_folder(tiny_vae: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lpips_decoder = .* is for latent models .* 'rgb'"):
        lpips_decoder(RgbEncoder(), str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot load the LPIPS decoder .*--set distill.lpips_decoder=/path/to/taesd"):
        lpips_decoder(VaeEncoder(tiny_vae), str(tmp_path / "missing"))

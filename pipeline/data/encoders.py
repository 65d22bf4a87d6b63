"""Encoders between uint8 images and what is stored and trained on (docs/algorithms.md, "Latent encoding").

Stored: float16 [B, stored_channels, H/d, W/d] in the shards. Model space: float32
[B, model_channels, h, w], what the diffusion model sees. Pixels: `x/127.5 - 1`.
VAE latents: the SD VAE's posterior mean and std are stored; a fresh sample is drawn and
normalised to zero mean and std 0.5 each time a sample is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import store

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
TINY_DECODER = "madebyollin/taesd"  # TAESD: a tiny decoder of the same latent space
# Latent statistics of the SD VAE on ImageNet (EDM2): z*scale + bias has zero mean, std 0.5.
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)


class Encoder(Protocol):
    name: str
    stored_channels: int
    model_channels: int
    downsample: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...  # uint8 [B,H,W,3] -> float16 stored

    def to_model(self, stored: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> np.ndarray: ...  # model space -> uint8 [B,H,W,3]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor: ...  # model space -> [-1, 1], differentiable

    def info(self) -> dict[str, Any]: ...


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Values in [0, 255] (before truncation), [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    return pixels.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class RgbEncoder:
    """Pixels in [-1, 1]: `x/127.5 - 1`; decode `x*127.5 + 128` truncated (round trip exact)."""

    name = "rgb"
    stored_channels = 3
    model_channels = 3
    downsample = 1

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
        return x.astype(np.float16)

    def to_model(self, stored: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return stored.float()

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return _to_uint8(x.float() * 127.5 + 128)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1], differentiable (for LPIPS)."""
        return x.float()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "stored_channels": self.stored_channels,
                "model_channels": self.model_channels, "downsample": self.downsample}


def _local_folder(spec: str) -> str:
    """A hub id or local folder as is; an fsspec URL copied once into the local cache."""
    if spec.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise FileNotFoundError(f"no folder {spec}")
    if "://" not in spec:
        return os.path.expanduser(spec)
    return store.cached_copy(spec, "vae")


def _load_pretrained(loader: Callable[[str], Any], spec: str, what: str, cls: str, hub_id: str, field: str) -> Any:
    """`loader(local path or hub id)`, with a clear error when the weights cannot be had."""
    try:
        return loader(_local_folder(spec))
    except Exception as e:  # hub, network, missing files, bad config: all are user-fixable
        name = hub_id.rsplit("/", 1)[1]
        raise ValueError(
            f"cannot load {what} {store.redact(spec)!r} ({type(e).__name__}: {e}). Without internet: on a "
            f"machine with it run `{cls}.from_pretrained({hub_id!r}).save_pretrained('/path/to/{name}')`, "
            f"copy the folder, and pass --set {field}=/path/to/{name} (a local folder or fsspec URL)."
        ) from e


class VaeEncoder:
    """SD VAE (diffusers AutoencoderKL) fed pixels in [0, 1]; stores posterior mean and std.

    The model loads on first use, and pickling drops it, so the object ships small to Ray tasks.
    """

    name = "vae"
    model_channels = 4
    stored_channels = 2 * model_channels

    def __init__(self, vae: str = DEFAULT_VAE, device: str = "cpu") -> None:
        self.vae, self.device = vae, device
        self.scale = 0.5 / torch.tensor(RAW_STD)
        self.bias = -torch.tensor(RAW_MEAN) * self.scale
        self._config: dict[str, Any] | None = None
        self._model: torch.nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def _load(self, loader: Callable[[str], Any]) -> Any:
        return _load_pretrained(loader, self.vae, "the VAE", "AutoencoderKL", DEFAULT_VAE, "encode.vae")

    def config(self) -> dict[str, Any]:
        if self._config is None:
            from diffusers import AutoencoderKL

            config = dict(self._load(AutoencoderKL.load_config))
            if config.get("latent_channels") != self.model_channels:
                raise ValueError(f"VAE {self.vae!r} has {config.get('latent_channels')} latent "
                                 "channels; the SD latent normalisation needs 4 (an SD-style VAE)")
            self._config = config
        return self._config

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config()["block_out_channels"]) - 1)

    def model(self) -> torch.nn.Module:
        if self._model is None:
            from diffusers import AutoencoderKL

            self.config()
            vae = self._load(AutoencoderKL.from_pretrained)
            self._model = vae.to(self.device).eval().requires_grad_(False)
        return self._model

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, bias as [4, 1, 1] on `device`."""
        return self.scale.to(device)[:, None, None], self.bias.to(device)[:, None, None]

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255  # [0, 1]
        posterior = self.model().encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).half().cpu().numpy()

    def to_model(self, stored: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std*randn (generator on stored's device), then z*scale + bias."""
        mean, std = stored.float().chunk(2, dim=1)
        z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        scale, bias = self._affine(z.device)
        return z * scale + bias

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] through the VAE decoder, differentiable (for LPIPS)."""
        scale, bias = self._affine(x.device)
        z = ((x.float() - bias) / scale).to(self.device)
        return self.model().decode(z).sample * 2 - 1

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        pixels = ((self.to_pixels(x) + 1) / 2).clamp(0, 1)
        return _to_uint8(pixels * 255 + 0.5)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "stored_channels": self.stored_channels,
                "model_channels": self.model_channels, "downsample": self.downsample,
                "vae": store.redact(self.vae), "raw_mean": list(RAW_MEAN), "raw_std": list(RAW_STD),
                "scale": self.scale.tolist(), "bias": self.bias.tolist()}


class TinyDecoder:
    """A lighter decoder of the SD latent space (diffusers AutoencoderTiny, e.g. TAESD
    "madebyollin/taesd"), for distill's LPIPS on latent models: model space -> [-1, 1], differentiable."""

    def __init__(self, spec: str, vae: VaeEncoder, device: str = "cpu") -> None:
        from diffusers import AutoencoderTiny

        self.vae, self.device = vae, device
        model = _load_pretrained(AutoencoderTiny.from_pretrained, spec, "the LPIPS decoder", "AutoencoderTiny",
                                 TINY_DECODER, "distill.lpips_decoder")
        if model.config.latent_channels != vae.model_channels:
            raise ValueError(f"distill.lpips_decoder {store.redact(spec)!r} has {model.config.latent_channels} "
                             f"latent channels; the SD VAE's latents have {vae.model_channels}")
        self.model = model.to(device).eval().requires_grad_(False)
        # TAESD decodes SD's scaled latents z * scaling_factor (of the SD VAE), over its own scaling_factor
        self.latent_scale = vae.config()["scaling_factor"] / model.config.scaling_factor

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self.vae._affine(x.device)
        z = (x.float() - bias) / scale  # the SD VAE's raw latents
        # it returns what the SD VAE would, and EDM2 feeds that VAE [0, 1] (as VaeEncoder.to_pixels)
        return self.model.decode((z * self.latent_scale).to(self.device)).sample * 2 - 1


def lpips_decoder(encoder: Encoder, decoder: str, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Model space -> [-1, 1] for LPIPS: the encoder's own decoder, or `decoder` (a TinyDecoder) for latents."""
    if not decoder:
        return encoder.to_pixels
    if not isinstance(encoder, VaeEncoder):
        raise ValueError(f"distill.lpips_decoder = {decoder!r} is for latent models (encode.encoder=vae); "
                         f"this run's encoder is {encoder.name!r}, whose outputs are pixels: unset it")
    return TinyDecoder(decoder, encoder, device).to_pixels


def decode_images(encoder: Encoder, stored: torch.Tensor, seeds: list[int]) -> np.ndarray:
    """Stored arrays [B, C, h, w] -> uint8 images [B, H, W, 3]; sample i draws from seeds[i] (VAE
    latents: the posterior sample), so the images depend on neither the batch nor the task layout."""
    x = torch.cat([encoder.to_model(stored[i : i + 1], torch.Generator().manual_seed(seed))
                   for i, seed in enumerate(seeds)])
    return encoder.decode(x)


def make_encoder(name: str, vae: str = DEFAULT_VAE, device: str = "cpu") -> Encoder:
    if name == "rgb":
        return RgbEncoder()
    if name == "vae":
        return VaeEncoder(vae, device)
    raise ValueError(f"unknown encoder {name!r}: expected rgb or vae (encode.encoder)")


def encoder_from_info(info: dict[str, Any], device: str = "cpu") -> Encoder:
    """The encoder an encode manifest describes (its outputs' "encoder" entry)."""
    return make_encoder(info["name"], info.get("vae", DEFAULT_VAE), device)

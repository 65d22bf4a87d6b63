"""Image decoding, conversion to RGB and the ADM centre crop (docs/algorithms.md, "Image preprocessing")."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class CorruptImage(Exception):
    """An image file PIL cannot fully decode. Picklable, so it crosses Ray task boundaries."""

    def __init__(self, source_id: str, reason: str) -> None:
        super().__init__(source_id, reason)
        self.source_id = source_id
        self.reason = reason

    def __str__(self) -> str:
        return f"corrupt image {self.source_id}: {self.reason}"


def decode_image(data: bytes, source_id: str) -> Image.Image:
    """Decode every pixel now (`load`), so truncated files fail here and not later."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
        raise CorruptImage(source_id, f"{type(e).__name__}: {e}") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale, 16-bit greyscale, palette, CMYK -> RGB; transparency is composited on white."""
    if img.mode.startswith("I;16"):  # keep the top 8 bits; a plain convert would clip at 255
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def center_crop_adm(img: Image.Image, resolution: int) -> Image.Image:
    """ADM: box-halve while the short side >= 2*res, bicubic short side -> res, centre crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    img = img.resize(size, resample=Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """Any decoded image -> uint8 [resolution, resolution, 3]."""
    return np.asarray(center_crop_adm(to_rgb(img), resolution), dtype=np.uint8)

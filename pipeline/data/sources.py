"""Image sources: synthetic shapes, scikit-learn's handwritten digits, an image folder, ImageNet (folders
or per-class tars).

Every source is a small picklable object listed once on the driver and shipped to Ray
tasks; `load(index)` returns the preprocessed uint8 image [res, res, 3], its class index
and a source id. Folder sources keep only relative paths, so a listing of ImageNet's
1.28M images pickles to tens of MB: `ray.put` it once rather than per task.
"""

from __future__ import annotations

import colorsys
import re
import tarfile
from collections.abc import Iterator
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from pipeline import store
from pipeline.config import EncodeConfig
from pipeline.data.preprocess import decode_image, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_SYNSET = re.compile(r"n\d{8}")
_SYNSET_TAR = re.compile(r"n\d{8}\.tar")
T = TypeVar("T")


class ImageSource(Protocol):
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, int, str]: ...


# ---------------------------------------------------------------------------------------
# Synthetic: class = shape; colour and background random per image, so that a class can be told only
# by its shape; size, offset from the centre and tilt vary a little.


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points, phase=-np.pi / 2) * radii[:, None]


# Unit-radius shapes as polygons with a mask value: 255 draws, 0 cuts a hole.
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular(48, 0.9), 255)],
    "square": [(_regular(4, phase=np.pi / 4), 255)],
    "triangle": [(_regular(3, phase=-np.pi / 2), 255)],
    "cross": [(_rect(-1, -0.28, 1, 0.28), 255), (_rect(-0.28, -1, 0.28, 1), 255)],
    "ring": [(_regular(48), 255), (_regular(48, 0.55), 0)],
    "star": [(_star(), 255)],
    "dots": [(_regular(32, 0.42) + [0, y], 255) for y in (-0.55, 0.55)],
    "ellipse": [(_regular(48) * [1.0, 0.5], 255)],
    "ell": [(_rect(-0.7, -1, -0.2, 1), 255), (_rect(-0.7, 0.5, 0.8, 1), 255)],
    "stripes": [(_rect(-0.9, y, 0.9, y + 0.3), 255) for y in (-0.9, -0.15, 0.6)],
}
_SHAPE_NAMES = tuple(_SHAPES)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _ramp(rng: np.random.Generator, res: int) -> np.ndarray:
    """A linear ramp in [0, 1] across the image along a random direction, [res, res]."""
    angle = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    return ramp / np.sqrt(2) + 0.5


def _background(rng: np.random.Generator, res: int) -> np.ndarray:
    """Muted two-colour gradient plus a few low-frequency waves per channel, [res, res, 3]."""
    hue, value = rng.uniform(0, 1), rng.uniform(0.25, 0.9)
    c0 = _hsv(hue, rng.uniform(0, 0.4), value)
    c1 = _hsv(hue + rng.uniform(-0.2, 0.2), rng.uniform(0, 0.4), value * rng.uniform(0.5, 1.2))
    bg = c0 + (c1 - c0) * _ramp(rng, res)[..., None]
    coords = np.arange(res, dtype=np.float32) / res
    freq = rng.uniform(-1.5, 1.5, (3, 2, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (3, 1, 1)).astype(np.float32)
    waves = np.sin(2 * np.pi * (freq[:, 0] * coords[None, :] + freq[:, 1] * coords[:, None])
                   + phase)
    amplitude = rng.uniform(0, 0.08, (3, 3)).astype(np.float32)  # [wave, channel]
    return bg + np.einsum("kij,kc->ijc", waves, amplitude)


def _shape_alpha(rng: np.random.Generator, shape: str, res: int) -> np.ndarray:
    """Coverage of a shape near the centre, of random size, offset and tilt, drawn at 4x and box-filtered."""
    size = 4 * res
    radius = rng.uniform(0.3, 0.4) * size
    centre = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    angle = rng.uniform(-0.3, 0.3)  # radians: a class keeps its orientation, roughly
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in _SHAPES[shape]:
        draw.polygon((polygon @ rotation * radius + centre).ravel().tolist(), fill=fill)
    return np.asarray(mask.reduce(4), dtype=np.float32) / 255


class SyntheticSource:
    """Procedural class-conditional images, deterministic per (seed, index); label = index % C."""

    def __init__(self, num_images: int, resolution: int, num_classes: int, seed: int) -> None:
        self.num_images, self.resolution, self.seed = num_images, resolution, seed
        self.num_classes = num_classes
        self.class_names = [f"{c}-{self._shape(c)}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.num_images

    def _shape(self, label: int) -> str:
        return _SHAPE_NAMES[label % len(_SHAPE_NAMES)]

    def load(self, index: int) -> tuple[np.ndarray, int, str]:
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        background = _background(rng, self.resolution)
        alpha = _shape_alpha(rng, self._shape(label), self.resolution)[..., None]
        colour = _hsv(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
        shading = 0.75 + 0.4 * _ramp(rng, self.resolution)[..., None]
        image = background * (1 - alpha) + colour * shading * alpha
        pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        return pixels, label, f"synthetic/{index}"


# ---------------------------------------------------------------------------------------
# Folder sources: listed once on the driver; `load` reads one file (or one tar member).


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _is_image(url: str) -> bool:
    return url.lower().endswith(IMAGE_EXTENSIONS)


def _check_folder(url: str, what: str) -> None:
    if not store.exists(url):
        raise ValueError(f"{what} {store.redact(url)} does not exist: set --set encode.path=URL "
                         "to the dataset folder (local path or fsspec URL)")
    if not store.is_dir(url):
        raise ValueError(f"{what} {store.redact(url)} is not a folder: point encode.path at the "
                         "folder that holds one sub-folder per class")


def _class_images(class_url: str) -> list[str]:
    """Image paths below one class folder, relative to the dataset root ('cls/sub/x.jpg')."""
    found = [f for f in store.walk_files(class_url) if _is_image(f)]
    if not found:
        raise ValueError(f"class folder {store.redact(class_url)} holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")
    assert all(f.startswith(class_url + "/") for f in found), (class_url, found[0])
    return [f"{_basename(class_url)}/{f[len(class_url) + 1:]}" for f in found]


class _ListedSource:
    """Images at relative paths under `root`, with their labels; the layout-specific parts
    (listing, reading bytes) live in the subclasses."""

    def __init__(self, root: str, resolution: int, class_names: list[str],
                 relpaths: list[str], labels: list[int]) -> None:
        self.root, self.resolution = root, resolution
        self.class_names, self.num_classes = class_names, len(class_names)
        self.relpaths = relpaths
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.relpaths)

    def _read(self, index: int) -> bytes:
        return store.read_bytes(store.join(self.root, self.relpaths[index]))

    def load(self, index: int) -> tuple[np.ndarray, int, str]:
        source_id = self.relpaths[index]
        image = decode_image(self._read(index), source_id)
        return preprocess(image, self.resolution), int(self.labels[index]), source_id


def class_quotas(sizes: list[int], limit: int) -> list[int]:
    """How many of each class a sample of `limit` takes: in proportion to the class sizes, rounded by
    largest remainder (ties to the lower class index), never more than a class has."""
    total = sum(sizes)
    if limit <= 0 or limit >= total:
        return list(sizes)
    exact = [limit * n / total for n in sizes]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: limit - sum(quotas)]:
        quotas[c] += 1
    return quotas


def _take(per_class: Iterator[list[T]], limit: int, seed: int) -> tuple[list[T], list[int]]:
    """Per-class lists concatenated with their labels; with `limit` > 0 a seeded, class-stratified sample
    of that many (every class in proportion), each class's picks in their listed order."""
    classes = list(per_class)
    quotas = class_quotas([len(found) for found in classes], limit)
    items: list[T] = []
    labels: list[int] = []
    for label, (found, quota) in enumerate(zip(classes, quotas)):
        if quota < len(found):
            picked = np.sort(np.random.default_rng([seed, label]).choice(len(found), quota, replace=False))
            found = [found[i] for i in picked]
        items += found
        labels += [label] * len(found)
    return items, labels


class ImageFolderSource(_ListedSource):
    """`root/<class>/**/*.{jpg,jpeg,png,webp,bmp,tif,tiff,gif}` (any case); classes are the sorted folder names."""

    def __init__(self, url: str, resolution: int, limit: int = 0, seed: int = 0) -> None:
        root = store.normalize_url(url)
        _check_folder(root, "image folder")
        class_urls = [d for d in store.list_dir(root)[0] if not _basename(d).startswith(".")]
        if not class_urls:
            raise ValueError(f"image folder {store.redact(root)} has no class sub-folders: "
                             "expected root/<class name>/<images>")
        relpaths, labels = _take((_class_images(d) for d in class_urls), limit, seed)
        super().__init__(root, resolution, [_basename(d) for d in class_urls], relpaths, labels)


def _tar_members(tar_url: str, synset: str) -> list[tuple[str, int, int]]:
    """(relative id, data offset, size) of every image in one tar, by a header scan."""
    with store.open_url(tar_url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        members = [(m.name.removeprefix("./"), m.offset_data, m.size)
                   for m in tar if m.isfile() and _is_image(m.name)]
    if not members:
        raise ValueError(f"{store.redact(tar_url)} holds no images: replace it with the "
                         "original ILSVRC2012 per-class tar")
    return sorted((f"{synset}/{name}", offset, size) for name, offset, size in members)


class ImageNetSource(_ListedSource):
    """ILSVRC2012 train: synset folders `n01440764/*.JPEG`, or per-class tars `n01440764.tar`.

    Classes are the sorted synsets. Tars are indexed once on the driver; `load` then reads
    one member's byte range. Synset folders win if both layouts are present.
    """

    def __init__(self, url: str, resolution: int, limit: int = 0, seed: int = 0) -> None:
        root = store.normalize_url(url)
        _check_folder(root, "imagenet folder")
        dirs, files = store.list_dir(root)
        folders = [d for d in dirs if _SYNSET.fullmatch(_basename(d))]
        tars = [f for f in files if _SYNSET_TAR.fullmatch(_basename(f))]
        if not folders and not tars:
            raise ValueError(f"imagenet folder {store.redact(root)} has neither synset folders "
                             "(n01440764/) nor synset tars (n01440764.tar): point encode.path at "
                             "the ILSVRC2012 train folder, or use encode.source=imagefolder")
        self.ranges: np.ndarray | None = None  # [N, 2] (offset, size) in the tars; None: folders
        if folders:
            synsets = [_basename(d) for d in folders]
            relpaths, labels = _take((_class_images(d) for d in folders), limit, seed)
        else:
            synsets = [_basename(t).removesuffix(".tar") for t in tars]
            members, labels = _take((_tar_members(t, s) for t, s in zip(tars, synsets)), limit, seed)
            relpaths = [name for name, _, _ in members]
            self.ranges = np.array([(o, s) for _, o, s in members], dtype=np.int64).reshape(-1, 2)
        super().__init__(root, resolution, synsets, relpaths, labels)

    def _read(self, index: int) -> bytes:
        if self.ranges is None:
            return super()._read(index)
        synset = self.relpaths[index].split("/", 1)[0]
        offset, size = self.ranges[index]
        return store.read_range(store.join(self.root, f"{synset}.tar"), int(offset), int(size))


# ---------------------------------------------------------------------------------------
# scikit-learn's handwritten digits: a small real dataset that ships with the library (offline).


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [1797, 8, 8], dark ink on white as scikit-learn shows them; labels [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("encode.source=digits needs scikit-learn, which ships the dataset: "
                         "pip install 'onestep[datasets]' (or scikit-learn)") from e
    digits = load_digits()
    ink = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels, 0..16
    return 255 - ink, digits.target.astype(np.int64)


class DigitsSource:
    """The 1,797 8x8 greyscale digits of scikit-learn (UCI's optical digits), 10 classes, enlarged to
    the resolution by the ADM preprocessing as any image file; `limit` > 0 takes a seeded sample,
    every class in proportion, as the folder sources do."""

    def __init__(self, resolution: int, limit: int = 0, seed: int = 0) -> None:
        images, labels = _load_digits()
        indices, self.labels = _take(([int(i) for i in np.flatnonzero(labels == c)] for c in range(10)), limit, seed)
        self.images, self.indices = images[indices], indices
        self.resolution, self.num_classes = resolution, 10
        self.class_names = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[np.ndarray, int, str]:
        image = Image.fromarray(self.images[index])  # uint8 [8, 8]: greyscale
        return preprocess(image, self.resolution), int(self.labels[index]), f"digits/{self.indices[index]}"


def make_source(cfg: EncodeConfig, seed: int) -> ImageSource:
    """The configured source, validated and listed here on the driver."""
    if cfg.source == "synthetic":
        return SyntheticSource(cfg.num_images, cfg.resolution, cfg.num_classes, seed)
    if cfg.source == "digits":
        return DigitsSource(cfg.resolution, limit=cfg.num_images, seed=seed)
    if cfg.source == "imagefolder":
        return ImageFolderSource(cfg.path, cfg.resolution, limit=cfg.num_images, seed=seed)
    return ImageNetSource(cfg.path, cfg.resolution, limit=cfg.num_images, seed=seed)

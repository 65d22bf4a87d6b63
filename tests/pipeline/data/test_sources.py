"""Image sources and ADM preprocessing on tiny generated datasets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import store
from pipeline.config import EncodeConfig
from pipeline.data.preprocess import CorruptImage, center_crop_adm, decode_image, to_rgb
from pipeline.data.sources import (DigitsSource, ImageFolderSource, ImageNetSource, SyntheticSource, class_quotas,
                                   make_source)
from helpers import image_bytes, make_image_folder, make_imagenet

SYNSETS = ["n01440764", "n01443537", "n02085620"]


# --- preprocessing --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 260), (31, 64), (64, 64), (1000, 129), (17, 5)])
def test_center_crop_adm_size(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (10, 20, 30))
    assert center_crop_adm(img, 64).size == (64, 64)


def test_center_crop_adm_halves_with_box_filter_first() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))
    # 300x260 at res 64: box-halve twice (150x130, 75x65), bicubic to 74x64, crop x in [5, 69).
    manual = img.resize((150, 130), Image.Resampling.BOX).resize((75, 65), Image.Resampling.BOX)
    manual = manual.resize((74, 64), Image.Resampling.BICUBIC).crop((5, 0, 69, 64))
    no_halving = img.resize((74, 64), Image.Resampling.BICUBIC).crop((5, 0, 69, 64))
    out = np.asarray(center_crop_adm(img, 64))
    assert np.array_equal(out, np.asarray(manual))
    assert not np.array_equal(out, np.asarray(no_halving))


def test_to_rgb_modes() -> None:
    grey = to_rgb(Image.new("L", (2, 2), 77))
    transparent = to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))
    half_black = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    palette = to_rgb(Image.new("RGB", (2, 2), (0, 0, 255)).convert("P"))
    cmyk = to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    deep = to_rgb(Image.fromarray(np.full((2, 2), 40000, np.uint16)))
    assert all(im.mode == "RGB" for im in (grey, transparent, half_black, palette, cmyk, deep))
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert half_black.getpixel((0, 0)) == (127, 127, 127)
    assert palette.getpixel((0, 0)) == (0, 0, 255)
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)
    assert deep.getpixel((0, 0)) == (40000 >> 8,) * 3


def test_decode_image_rejects_garbage_and_truncated_files() -> None:
    good = image_bytes(0, (40, 30))
    assert decode_image(good, "ok.jpg").size == (40, 30)
    for data in (b"not an image", good[: len(good) // 2]):
        with pytest.raises(CorruptImage, match="bad.jpg"):
            decode_image(data, "bad.jpg")
    err = pickle.loads(pickle.dumps(CorruptImage("a/b.jpg", "truncated")))
    assert (err.source_id, err.reason) == ("a/b.jpg", "truncated")


# --- synthetic ------------------------------------------------------------------------


@pytest.mark.parametrize("res", [16, 32, 64])
def test_synthetic_is_deterministic_per_index(res: int) -> None:
    a, b = SyntheticSource(50, res, 10, seed=3), SyntheticSource(50, res, 10, seed=3)
    image, label, source_id = a.load(17)
    assert image.shape == (res, res, 3) and image.dtype == np.uint8
    assert (label, source_id) == (7, "synthetic/17")
    assert np.array_equal(image, b.load(17)[0])
    assert not np.array_equal(image, SyntheticSource(50, res, 10, seed=4).load(17)[0])
    assert np.array_equal(pickle.loads(pickle.dumps(a)).load(17)[0], image)


def _saturated_colour(images: np.ndarray, count: int = 100) -> np.ndarray:
    """Mean RGB of each image's `count` most saturated pixels: the shape's colour."""
    pixels = images.reshape(len(images), -1, 3).astype(np.float64)
    saturation = pixels.max(-1) - pixels.min(-1)
    top = np.argsort(saturation, axis=1)[:, -count:]
    return np.take_along_axis(pixels, top[..., None], axis=1).mean(1)


def test_synthetic_classes_do_not_differ_in_colour() -> None:
    """Colour is random per image: a nearest-colour classifier is at chance (0.1); only the shape
    tells a class (the probe's tests show it can be learned)."""
    src = SyntheticSource(400, 32, 10, seed=0)
    colour = _saturated_colour(np.stack([src.load(i)[0] for i in range(400)]))
    labels = np.arange(400) % 10
    class_means = np.stack([colour[:200][labels[:200] == c].mean(0) for c in range(10)])
    distances = np.linalg.norm(colour[200:, None] - class_means[None], axis=-1)
    accuracy = (distances.argmin(1) == labels[200:]).mean()
    assert accuracy < 0.2


def test_synthetic_varies_within_class() -> None:
    src = SyntheticSource(200, 32, 10, seed=0)
    images = np.stack([src.load(i)[0] for i in range(2, 200, 10)]).astype(np.float64)  # class 2
    diffs = np.abs(images[:, None] - images[None]).mean(axis=(2, 3, 4))
    assert diffs[np.triu_indices(len(images), 1)].min() > 5
    assert images.std(axis=0).mean() > 20  # every pixel varies across the class


# --- scikit-learn's digits -------------------------------------------------------------


def test_digits_are_scikit_learns_images_as_dark_ink_on_white_with_their_labels() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    src = DigitsSource(8)  # at their own size the preprocessing leaves the pixels alone
    assert (len(src), src.num_classes, src.class_names) == (1797, 10, [str(c) for c in range(10)])
    assert np.bincount(src.labels).tolist() == np.bincount(raw.target).tolist()
    for index in (0, 500, 1796):
        image, label, source_id = src.load(index)
        original = int(source_id.removeprefix("digits/"))
        expected = 255 - np.round(raw.images[original] * 255 / 16)
        assert image.shape == (8, 8, 3) and np.array_equal(image[..., 1], expected) and label == raw.target[original]
    big, _, _ = DigitsSource(16).load(0)
    assert big.shape == (16, 16, 3) and big.min() < 60 and big.max() > 240  # ink and paper survive the enlarging


def test_num_images_of_the_digits_is_a_seeded_sample_of_every_class() -> None:
    sample = DigitsSource(16, limit=100, seed=5)
    assert np.bincount(sample.labels).tolist() == [10] * 10
    assert np.array_equal(sample.indices, DigitsSource(16, limit=100, seed=5).indices)
    assert not np.array_equal(sample.indices, DigitsSource(16, limit=100, seed=6).indices)
    assert isinstance(make_source(EncodeConfig(source="digits", num_images=0), seed=0), DigitsSource)


def test_digits_without_scikit_learn_name_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # an import of it now fails
    with pytest.raises(ValueError, match=r"needs scikit-learn.*onestep\[datasets\]"):
        DigitsSource(16)


# --- folders --------------------------------------------------------------------------


def _load_all(src: ImageFolderSource | ImageNetSource) -> list[tuple[np.ndarray, int, str]]:
    return [src.load(i) for i in range(len(src))]


def test_imagefolder_mixed_modes_and_a_corrupt_file(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", {"cat": 7, "dog": 3}, corrupt=["dog/zz_broken.jpg"])
    src = ImageFolderSource(str(root), 16)
    assert (src.num_classes, src.class_names, len(src)) == (2, ["cat", "dog"], 11)
    ids = src.relpaths
    assert ids == sorted(ids) and "cat/sub/img002.png" in ids and "cat/sub/img005.JPG" in ids
    assert not any(i.endswith(".txt") for i in ids)
    for index in range(10):
        image, label, source_id = src.load(index)
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert label == (0 if source_id.startswith("cat/") else 1)
    with pytest.raises(CorruptImage, match="dog/zz_broken.jpg"):
        src.load(10)
    limited = ImageFolderSource(str(root), 16, limit=8)
    assert set(limited.relpaths) <= set(ids) and np.bincount(limited.labels).tolist() == [5, 3]  # 7 cats, 4 dogs


def test_imagefolder_reads_bmp_tiff_and_gif(tmp_path: Path) -> None:
    """Folders exported by other tools: BMP, TIFF (both spellings) and GIF (a palette image) load as RGB."""
    files = {"a/x.bmp": ("BMP", "RGB"), "a/y.TIF": ("TIFF", "L"), "b/z.tiff": ("TIFF", "RGB"), "b/w.gif": ("GIF", "P")}
    for i, (rel, (fmt, mode)) in enumerate(files.items()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(image_bytes(i, (20, 24), fmt, mode))
    src = ImageFolderSource(str(tmp_path), 16)
    assert sorted(src.relpaths) == sorted(files) and src.class_names == ["a", "b"]
    for image, label, source_id in _load_all(src):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and image.std() > 0
        assert label == (0 if source_id.startswith("a/") else 1)


def test_imagefolder_on_memory_filesystem_matches_local(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", {"a": 3, "b": 2})
    for path in root.rglob("*"):
        if path.is_file():
            store.write_bytes(f"memory://sources-test/{path.relative_to(root)}", path.read_bytes())
    local, remote = ImageFolderSource(str(root), 16), ImageFolderSource("memory://sources-test", 16)
    remote = pickle.loads(pickle.dumps(remote))
    for (a, la, ia), (b, lb, ib) in zip(_load_all(local), _load_all(remote), strict=True):
        assert np.array_equal(a, b) and (la, ia) == (lb, ib)


def test_imagenet_folders_and_tars_agree(tmp_path: Path) -> None:
    folders = ImageNetSource(str(make_imagenet(tmp_path / "f", SYNSETS, 3, as_tars=False)), 32)
    tars = ImageNetSource(str(make_imagenet(tmp_path / "t", SYNSETS, 3, as_tars=True)), 32)
    assert folders.class_names == tars.class_names == SYNSETS
    assert tars.relpaths[0] == "n01440764/n01440764_0.JPEG" and tars.ranges is not None
    for (a, la, ia), (b, lb, ib) in zip(_load_all(folders), _load_all(tars), strict=True):
        assert np.array_equal(a, b) and (la, ia) == (lb, ib)
    assert ImageNetSource(str(tmp_path / "t"), 32, limit=4, seed=3).relpaths == \
        ImageNetSource(str(tmp_path / "f"), 32, limit=4, seed=3).relpaths  # the same sample of either layout


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist.*encode.path"):
        ImageFolderSource(str(tmp_path / "missing"), 16)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderSource(str(tmp_path / "nothing"), 16)
    root = make_image_folder(tmp_path / "ds", {"cat": 2})
    (root / "empty_class" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty_class holds no images"):
        ImageFolderSource(str(root), 16)
    with pytest.raises(ValueError, match="neither synset folders .* nor synset tars"):
        ImageNetSource(str(tmp_path / "nothing"), 16)


def test_make_source(tmp_path: Path) -> None:
    synthetic = make_source(EncodeConfig(num_images=12, num_classes=4, resolution=16), seed=1)
    assert isinstance(synthetic, SyntheticSource) and len(synthetic) == 12
    root = make_imagenet(tmp_path / "in", SYNSETS[:2], 2, as_tars=True)
    cfg = EncodeConfig(source="imagenet", path=str(root), num_images=0, resolution=16)
    imagenet = make_source(cfg, seed=1)
    assert isinstance(imagenet, ImageNetSource) and len(imagenet) == 4 and imagenet.num_classes == 2
    root = make_image_folder(tmp_path / "ds", {"a": 3, "b": 3})
    folder = make_source(EncodeConfig(source="imagefolder", path=str(root), num_images=4), seed=1)
    assert isinstance(folder, ImageFolderSource) and len(folder) == 4 and folder.num_classes == 2


def test_num_images_of_a_folder_is_a_seeded_sample_of_every_class_in_proportion(tmp_path: Path) -> None:
    """Not the first N of the sorted listing (which on ImageNet would be the first few classes): a
    sample with each class's share, reproducible from the seed."""
    assert class_quotas([50, 30, 20], 10) == [5, 3, 2]
    assert class_quotas([7, 7, 7], 10) == [4, 3, 3]  # largest remainder, ties to the lower class
    assert class_quotas([1, 99], 10) == [0, 10] and class_quotas([3, 4], 0) == class_quotas([3, 4], 9) == [3, 4]
    root = make_image_folder(tmp_path / "ds", {"a": 12, "b": 6, "c": 6})
    sample = ImageFolderSource(str(root), 16, limit=12, seed=5)
    counts = np.bincount(sample.labels, minlength=3)
    assert counts.tolist() == [6, 3, 3]
    assert sample.relpaths == ImageFolderSource(str(root), 16, limit=12, seed=5).relpaths
    assert sample.relpaths != ImageFolderSource(str(root), 16, limit=12, seed=6).relpaths
    every = ImageFolderSource(str(root), 16).relpaths
    assert all(every.index(a) < every.index(b) for a, b in zip(sample.relpaths, sample.relpaths[1:]))  # listed order
    imagenet = ImageNetSource(str(make_imagenet(tmp_path / "in", SYNSETS, 5, as_tars=True)), 16,
                              limit=len(SYNSETS) * 2, seed=0)
    assert np.bincount(imagenet.labels).tolist() == [2] * len(SYNSETS)

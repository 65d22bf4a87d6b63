"""Fréchet distance and feature statistics against independent computations.

The formulas: docs/algorithms.md, "Fréchet distance"."""

import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import save_random_inception

from pipeline import store
from pipeline.metrics import fid
from pipeline.metrics.fid import FeatureStats, frechet_distance


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_matches_symmetric_square_root_formula() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
    # Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2), whose argument is SPD: eigenvalues suffice
    root1 = scipy.linalg.sqrtm(s1).real
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_diagonal_and_one_dimensional_closed_forms() -> None:
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # commuting covariances: sum (sqrt(a) - sqrt(b))^2
    d = frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert d == pytest.approx(3 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2)
    assert frechet_distance([0.5], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(1.5**2 + (2 - 1) ** 2)


def test_self_distance_zero_and_monotone_in_noise() -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    noise = rng.normal(size=feats.shape)
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8
    dists = []
    for level in (0.1, 0.3, 1.0, 3.0):
        noisy = feats + level * noise
        dists.append(frechet_distance(mu, cov, noisy.mean(0), np.cov(noisy, rowvar=False)))
    assert all(d1 < d2 for d1, d2 in zip(dists, dists[1:])), dists


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # 5 samples in 32-d: rank-4 covariances
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    root1 = scipy.linalg.sqrtm(s1).real
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_matches_direct_scipy_sqrtm_of_the_product() -> None:
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    s1, s2 = random_spd(rng, 24), random_spd(rng, 24)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_feature_stats_match_numpy_and_merge() -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(loc=3.0, size=(500, 12)).astype(np.float32)
    whole = FeatureStats(12)
    for chunk in np.array_split(feats, 7):
        whole.add(chunk)
    np.testing.assert_allclose(whole.mean(), np.mean(feats.astype(np.float64), axis=0), rtol=1e-12)
    expected_cov = np.cov(feats.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(whole.cov(), expected_cov, rtol=1e-9, atol=1e-12)
    first, second = FeatureStats(12), FeatureStats(12)
    first.add(feats[:123])
    second.add(feats[123:])
    merged = first + second
    assert merged.count == 500
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-12, atol=1e-14)
    restored = FeatureStats.from_dict(merged.to_dict())
    assert restored.count == 500
    np.testing.assert_array_equal(restored.sum_outer, merged.sum_outer)
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        whole.add(feats[:, :5])


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_features_equal_clean_fids_own_pipeline(tmp_path: Path) -> None:
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset

    weights = save_random_inception(tmp_path / "inception-2015-12-05.pt")
    images = _images(5)
    files = []
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image)
        files.append(str(tmp_path / f"{i}.npy"))
    batch = torch.stack([ResizeDataset(files, mode="clean")[i] for i in range(5)])  # PIL bicubic per channel
    with torch.no_grad():
        expected = InceptionV3W(str(tmp_path), download=False)(batch).double().numpy()
    inception = fid.load_inception(weights)
    actual = inception.features(images)
    assert actual.dtype == np.float64 and actual.shape == (5, 2048) and inception.dim == 2048
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    assert not inception.random and inception.metric_name == "FID"


def test_clean_fid_weights_come_from_its_cache_or_its_download(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = save_random_inception(tmp_path / "tiny.pt")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(fid, "CLEAN_FID_DIR", str(cache))
    downloads: list[str] = []

    def offline(fpath: str) -> str:
        downloads.append(fpath)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid, "check_download_inception", offline)
    with pytest.raises(ValueError, match=r"refstats.inception_weights='clean-fid'.*could not download.*"
                                         r"inception-2015-12-05.pt on a machine with internet.*"
                                         r"set refstats.inception_weights=/path/or/url"):
        fid.load_inception("clean-fid")
    assert len(downloads) == 1 and os.listdir(cache) == []  # no half-written file left behind

    def download(fpath: str) -> str:
        downloads.append(fpath)
        return shutil.copy(tiny, os.path.join(fpath, "inception-2015-12-05.pt"))

    monkeypatch.setattr(fid, "check_download_inception", download)
    first = fid.load_inception("clean-fid").features(_images(2))
    assert len(downloads) == 2 and os.listdir(cache) == ["inception-2015-12-05.pt"]
    monkeypatch.setattr(fid, "check_download_inception", offline)
    np.testing.assert_array_equal(fid.load_inception("clean-fid").features(_images(2)), first)  # cached
    assert len(downloads) == 2


def test_weights_from_an_fsspec_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    local = save_random_inception(tmp_path / "inception-2015-12-05.pt")
    url = "memory://weights/inception-2015-12-05.pt"
    store.write_bytes(url, Path(local).read_bytes())
    images = _images(3)
    np.testing.assert_array_equal(fid.load_inception(url).features(images),
                                  fid.load_inception(local).features(images))
    with pytest.raises(ValueError, match=r"refstats.inception_weights='memory://weights/nope.pt'.*cannot copy"):
        fid.load_inception("memory://weights/nope.pt")


def test_files_that_are_not_the_inception_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "linear.pt"))
    wrong = torch.nn.Module()
    wrong.layers = torch.nn.Conv2d(3, 4, 3)
    torch.jit.script(wrong).save(str(tmp_path / "wrong.pt"))
    cases = {"garbage.pt": "is not a TorchScript file", "linear.pt": "has no `layers` submodule",
             "wrong.pt": "fails on a 299x299 image", "missing.pt": "no file"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=f"refstats.inception_weights=.*{name}.*{message}"):
            fid.load_inception(str(tmp_path / name))


def test_random_weights_are_the_same_network_in_every_load() -> None:
    images = _images(1)
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    first = fid.load_inception("random")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    torch.manual_seed(2)
    second = fid.load_inception("random")
    a, b = first.features(images), second.features(images)
    assert a.shape == (1, 2048) and np.isfinite(a).all() and a.std() > 0
    np.testing.assert_array_equal(a, b)
    assert first.random and first.metric_name == "FD (random-weight Inception)"

"""Fréchet distance and feature statistics against independent computations (papers.md, "Metrics")."""

import numpy as np
import pytest
import scipy.linalg

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


def test_non_finite_square_root_retries_with_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[np.ndarray] = []
    real_sqrtm = scipy.linalg.sqrtm

    def first_call_fails(m: np.ndarray) -> np.ndarray:
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    d = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.zeros(2), np.diag([4.0, 1.0]), eps=1e-3)
    assert len(calls) == 2 and np.isfinite(d)
    np.testing.assert_allclose(calls[1], np.diag([1.001 * 4.001, 4.001 * 1.001]))


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

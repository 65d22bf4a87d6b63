"""Fréchet distance between feature Gaussians and mergeable feature statistics (papers.md, "Metrics")."""

import numpy as np
import scipy.linalg


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), real part, in float64 (papers.md)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"shapes differ: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise the diagonals
        offset = eps * np.eye(dim)
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


class FeatureStats:
    """Running float64 count, sum [D] and sum of outer products [D, D]; mergeable across tasks."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)

    def add(self, features: np.ndarray) -> None:
        """Accumulate a batch of features [N, D] (any array-like on the CPU)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {x.shape}")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """New stats holding both sets of features."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {self.dim} and {other.dim}")
        out = FeatureStats(self.dim)
        out.count = self.count + other.count
        out.sum = self.sum + other.sum
        out.sum_outer = self.sum_outer + other.sum_outer
        return out

    __add__ = merge

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features added")
        return self.sum / self.count

    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D] (papers.md: Sigma = unbiased covariance)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, got {self.count}")
        mu = self.mean()
        return (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def to_dict(self) -> dict[str, np.ndarray]:
        count = np.array(self.count, np.int64)
        return {"count": count, "sum": self.sum.copy(), "sum_outer": self.sum_outer.copy()}

    @classmethod
    def from_dict(cls, d: dict[str, np.ndarray]) -> "FeatureStats":
        stats = cls(int(np.asarray(d["sum"]).shape[0]))
        stats.count = int(d["count"])
        stats.sum = np.asarray(d["sum"], np.float64).copy()
        stats.sum_outer = np.asarray(d["sum_outer"], np.float64).copy()
        return stats

"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) in any feature space.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set (k = 3 in the paper). Precision: the fraction of generated
points inside the real manifold; recall: the fraction of real points inside the generated one.
"""

from __future__ import annotations

import numpy as np
import torch

K = 3  # the paper's neighbourhood size


def knn_radii(x: torch.Tensor, k: int = K, batch: int = 1024) -> torch.Tensor:
    """[N]: each point's distance to its k-th nearest neighbour in x [N, D], itself excluded."""
    if len(x) <= k:
        raise ValueError(f"the k-NN manifold needs more than k = {k} points, got {len(x)}")
    radii = [torch.cdist(x[lo:lo + batch], x).kthvalue(k + 1, dim=1).values  # value 1 is the point itself
             for lo in range(0, len(x), batch)]
    return torch.cat(radii)


def coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch: int = 1024) -> float:
    """The fraction of queries [M, D] within radii[i] of some manifold point i ([N, D])."""
    inside = [(torch.cdist(queries[lo:lo + batch], manifold) <= radii).any(dim=1)
              for lo in range(0, len(queries), batch)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K) -> tuple[float, float]:
    """(precision, recall) of fake [M, D] against real [N, D] features, in float64."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = coverage(r, knn_radii(r, k), f)
    recall = coverage(f, knn_radii(f, k), r)
    return precision, recall

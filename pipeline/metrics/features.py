"""The pretrained feature networks by name, as refstats and evaluate load them.

    inception: clean-fid's Inception-v3 (FID);  dinov2: DINOv2 ViT-L/14 (FD_DINOv2, EDM2's second metric)

Each has `dim`, `features(uint8 [B, H, W, 3]) -> float64 [B, dim]`, and loads from its download
(the "auto" setting tries it), a local path or an fsspec URL.
"""

from __future__ import annotations

from typing import Any

from pipeline.metrics.dinov2 import load_dinov2, worker_dinov2
from pipeline.metrics.fid import load_inception, worker_inception

NETWORKS = ("inception", "dinov2")
DOWNLOAD = {"inception": "clean-fid", "dinov2": "hub"}  # what "auto" tries: the library's own download
SETTING = {"inception": "refstats.inception_weights", "dinov2": "refstats.dinov2_weights"}


def load_feature_network(name: str, weights: str, device: str = "cpu") -> Any:
    """A fresh network (checks the weights: a ValueError names the setting and the fix)."""
    return {"inception": load_inception, "dinov2": load_dinov2}[name](weights, device)


def worker_feature_network(name: str, weights: str, device: str = "cpu") -> Any:
    """The network, built once per process (Ray workers run many tasks)."""
    return {"inception": worker_inception, "dinov2": worker_dinov2}[name](weights, device)


def metric_name(name: str, network: Any) -> str:
    """How the report names the Fréchet distance in this network's features."""
    if name == "inception":
        return network.metric_name  # "FID", or "FD (random-weight Inception)"
    return "FD_DINOv2"

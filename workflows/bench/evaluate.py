"""Probe and Inception features images/s, and the metrics' share of the demo run's wall time.

    python workflows/bench.py evaluate --storage ./artifacts   # after `python workflows/full.py`
    python workflows/bench.py evaluate --iters 1               # quick; without a demo run, says so
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline import config as C
from pipeline import dag, store

from .common import Row, median_seconds, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--storage", default="./artifacts", help="where the demo ran (`python workflows/full.py`)")


def _features_rate(features: Callable[[np.ndarray], Any], resolution: int, batch: int, iters: int) -> float:
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    return batch / median_seconds(lambda: features(images), warmup=1, iters=iters)


def _demo_share(storage: str) -> list[Row]:
    """Each stage's wall time in the demo run stored at `storage`, and the metrics' share of the total."""
    cfg = C.load_config("demo", storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    manifests = {name: store.Store(storage).artifact(name, key).manifest() for name, key in keys.items()}
    missing = [name for name, m in manifests.items() if m is None]
    if missing:
        return [(f"demo stage times: no demo run in {storage} (missing {', '.join(missing)})",
                 "-", "run `python workflows/full.py` first")]
    seconds = {name: m["wall_time_s"] for name, m in manifests.items()}
    total = sum(seconds.values())
    rows = [(f"demo: {name} s", f"{s:.1f}", "") for name, s in seconds.items()]
    share = (seconds["evaluate"] + seconds["probe"] + seconds["refstats"]) / total
    return rows + [("demo: all stages s (Ray start not counted)", f"{total:.1f}", "<= 600"),
                   ("demo: (evaluate + probe + refstats) / all stages", f"{share:.1%}", "<= 15%")]


def run(a: argparse.Namespace) -> None:
    from pipeline.metrics.fid import load_inception
    from pipeline.metrics.probe import ProbeFeatures, ProbeNet

    torch.set_num_threads(a.threads)
    cfg = C.load_config("demo")
    res = cfg.encode.resolution
    probe = ProbeFeatures(ProbeNet(cfg.encode.num_classes, res, cfg.probe.channels, cfg.probe.feature_dim), "cpu")
    inception = load_inception("random", "cpu")  # the real network's architecture and cost
    rows = [(f"probe features images/s ({res} px, demo probe, batch 256, {a.threads} thr)",
             f"{_features_rate(probe.features, res, 256, a.iters):.0f}", ""),
            (f"Inception features images/s ({res} px resized to 299, batch 32, {a.threads} thr)",
             f"{_features_rate(inception.features, res, 32, a.iters):.1f}", "")]
    table(rows + _demo_share(a.storage))

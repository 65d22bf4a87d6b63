"""Probe and Inception features images/s, the metrics' share of a preset run's wall time, and the
share of distill's time its validation took.

    python workflows/bench.py evaluate --storage ./artifacts   # after `python workflows/full.py`
    python workflows/bench.py evaluate --config dmd2 --storage ./artifacts
    python workflows/bench.py evaluate --iters 1               # quick; without a run, says so
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--storage", default="./artifacts", help="where the preset ran (`python workflows/full.py`)")
    p.add_argument("--config", default="demo", help="the preset of that run")


def _features_rate(features: Callable[[np.ndarray], Any], resolution: int, batch: int, iters: int) -> float:
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    return batch / median_seconds(lambda: features(images), warmup=1, iters=iters)


def _validation_share(distill: dict[str, Any], storage: str) -> Row:
    """Validation's seconds (the metrics rows' val_seconds) against distill's training time."""
    rows = store.read_bytes(store.join(storage, "distill", distill["key"], "metrics.jsonl")).decode().splitlines()
    seconds = sum(json.loads(r).get("val_seconds", 0.0) for r in rows)
    return ("distill: validation s / training s", f"{seconds:.1f} / {distill['outputs']['train_wall_time_s']:.1f} = "
            f"{seconds / distill['outputs']['train_wall_time_s']:.1%}", "<= 10%")


def _run_share(preset: str, storage: str) -> list[Row]:
    """Each stage's wall time in the run of `preset` stored at `storage`, and the metrics' share of the total."""
    cfg = C.load_config(preset, storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    manifests = {name: store.Store(storage).artifact(name, key).manifest() for name, key in keys.items()}
    missing = [name for name, m in manifests.items() if m is None]
    if missing:
        return [(f"{preset} stage times: no {preset} run in {storage} (missing {', '.join(missing)})",
                 "-", f"run `python workflows/full.py --config {preset}` first")]
    seconds = {name: m["wall_time_s"] for name, m in manifests.items()}
    total = sum(seconds.values())
    rows = [(f"{preset}: {name} s", f"{s:.1f}", "") for name, s in seconds.items()]
    share = (seconds["evaluate"] + seconds["probe"] + seconds["refstats"]) / total
    return rows + [(f"{preset}: all stages s (Ray start not counted)", f"{total:.1f}", "<= 600"),
                   (f"{preset}: (evaluate + probe + refstats) / all stages", f"{share:.1%}", "<= 15%"),
                   _validation_share(manifests["distill"], storage)]


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
    table(rows + _run_share(a.config, a.storage))

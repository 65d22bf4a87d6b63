"""Teacher pairs/s with 1 and 2 Ray workers, against the bound batch / (forward x NFE).

    python workflows/bench.py pairs
    python workflows/bench.py pairs --shards 2 --pairs-per-shard 4 --steps 1 --batch 4   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from functools import partial

import torch

from pipeline import config as C
from pipeline import pairs as P
from pipeline import store
from pipeline.executor import RayExecutor, init_ray

from .common import forward_seconds, preset_network, table, teacher_artifact


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--pairs-per-shard", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)


def _pairs_rate(job: P.PairsJob, workers: int) -> float:
    num_shards = -(-job.cfg.num_pairs // job.cfg.pairs_per_shard)
    start = time.perf_counter()
    made = sum(RayExecutor(max_in_flight=workers).map(partial(P.make_shard, job), list(range(num_shards))))
    return made / (time.perf_counter() - start)


def run(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # as in a Ray worker with num_cpus=1
    net = preset_network("demo").eval()
    cfg = C.PairsConfig(num_pairs=a.shards * a.pairs_per_shard, num_steps=a.steps,
                        pairs_per_shard=a.pairs_per_shard, batch=a.batch)
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_artifact(tmp, net)
        job = P.PairsJob(store.Artifact(f"{tmp}/warm"), teacher, "network.safetensors", "",
                         dataclasses.replace(cfg, num_pairs=2, pairs_per_shard=1, num_steps=1), "cpu")
        _pairs_rate(job, 2)  # two workers started, modules imported
        one = _pairs_rate(dataclasses.replace(job, artifact=store.Artifact(f"{tmp}/one"), cfg=cfg), 1)
        two = _pairs_rate(dataclasses.replace(job, artifact=store.Artifact(f"{tmp}/two"), cfg=cfg), 2)
    nfe = 2 * a.steps - 1
    bound = a.batch / (forward_seconds(net, a.batch, iters=20) * nfe)
    what = f"demo net, {a.shards} shards x {a.pairs_per_shard}, {a.steps} steps, batch {a.batch}"
    table([(f"pairs/s, 1 worker ({what})", f"{one:.3g}", ""),
           ("pairs/s, 2 workers, same", f"{two:.3g}", ""),
           ("pairs speed-up, 2 vs 1 worker", f"{two / one:.2f}x", ">= 1.8x"),
           (f"bound pairs/s, batch / (forward x {nfe} NFE), 1 thread", f"{bound:.3g}", ""),
           ("pairs/s, 1 worker / bound", f"{one / bound:.2f}", ">= 0.95")])

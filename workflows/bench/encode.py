"""Encode images/s with 1 and 2 Ray workers, the shard reader's samples/s, `onestep status`'s wall time.

    python workflows/bench.py encode
    python workflows/bench.py encode --num-images 200 --resolution 16   # quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.shards import reader, shard_name, write_shard
from pipeline.executor import RayExecutor, init_ray

from .common import table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-images", type=int, default=8000)
    p.add_argument("--resolution", type=int, default=64)


def _encode_rate(root: str, workers: int, num_images: int, resolution: int) -> float:
    cfg = C.load_config("demo", [f"encode.num_images={num_images}", f"encode.resolution={resolution}",
                                 "encode.shard_size=500", "encode.batch=100"], storage=root)
    start = time.perf_counter()
    dag.run(cfg, until="encode", executor=RayExecutor(max_in_flight=workers))
    return num_images / (time.perf_counter() - start)


def _reader_rates(root: str, num_shards: int = 4, per_shard: int = 1000, batch: int = 256) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    urls = []
    for s in range(num_shards):
        url = store.join(root, shard_name("latents", s))
        arrays = rng.standard_normal((per_shard, 8, 64, 64)).astype(np.float16)
        write_shard(url, ({"key": f"{s * per_shard + i:08d}", "npy": a, "cls": i % 1000, "src": "bench"}
                          for i, a in enumerate(arrays)))
        urls.append(url)
    for _ in reader(urls, batch):  # warm the page cache
        pass
    rates = []
    for shuffle in (0, 1000):
        start = time.perf_counter()
        count = sum(len(labels) for _, labels in reader(urls, batch, shuffle_buffer=shuffle, seed=1))
        rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def _status_time(root: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--config", "demo", "--storage", root,
                    "--set", "encode.num_images=4000"], check=True, capture_output=True)
    return time.perf_counter() - start


def run(a: argparse.Namespace) -> None:
    num_images, resolution = a.num_images, a.resolution
    init_ray()  # Ray's start-up is not part of the encode rate
    with tempfile.TemporaryDirectory() as tmp:
        _encode_rate(f"{tmp}/warm", 2, 1000, resolution)  # workers started, modules imported
        one = _encode_rate(f"{tmp}/one", 1, num_images, resolution)
        two = _encode_rate(f"{tmp}/two", 2, num_images, resolution)
        plain, shuffled = _reader_rates(f"{tmp}/latents")
        status = _status_time(f"{tmp}/one")
    table([
        (f"encode images/s, 1 worker ({resolution}px synthetic)", f"{one:,.0f}", ""),
        (f"encode images/s, 2 workers ({resolution}px synthetic)", f"{two:,.0f}", ""),
        ("encode speed-up, 2 vs 1 worker", f"{two / one:.2f}x", ">= 1.7x"),
        ("reader samples/s, 64x64x8 float16, 1 process", f"{plain:,.0f}", ">= 5,000"),
        ("reader samples/s, same, with a 1000-sample shuffle buffer", f"{shuffled:,.0f}", ""),
        ("`onestep status` wall time, cached DAG", f"{status:.2f} s", "< 2 s"),
    ])

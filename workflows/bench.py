"""Benchmarks: each prints a table. Not tests: numbers depend on the machine.

    python workflows/bench.py encode      # encode images/s (1 vs 2 Ray workers), reader samples/s, status time
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config as C  # noqa: E402
from pipeline import dag, store  # noqa: E402
from pipeline.data.shards import reader, shard_name, write_shard  # noqa: E402
from pipeline.executor import RayExecutor, init_ray  # noqa: E402


def table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>14}  {target}")


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


def bench_encode(num_images: int, resolution: int) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--num-images", type=int, default=8000)
    enc.add_argument("--resolution", type=int, default=64)
    args = p.parse_args()
    if args.what == "encode":
        bench_encode(args.num_images, args.resolution)


if __name__ == "__main__":
    main()

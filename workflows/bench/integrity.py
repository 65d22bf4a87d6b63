"""The shard reader's samples/s with and without checksum verification, `onestep verify`'s MB/s, and a
training reader's samples/s with the shards it has parsed kept against parsed on every draw.

    python workflows/bench.py integrity
    python workflows/bench.py integrity --shards 2 --per-shard 50 --iters 1   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from pipeline import integrity, store
from pipeline.data import shards as shards_module
from pipeline.data.shards import reader, shard_name, write_shard

from .common import table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=32, help="the first shard's check is not overlapped: its share is 1/shards")
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="passes of each kind, alternating")


def _reader_pass(urls: list[str], batch: int, checked: bool) -> float:
    """Samples/s of one pass; `checked`: each shard read whole and its checksum verified before use (a process's first read)."""
    shards_module._VERIFIED.clear()
    if not checked:
        shards_module._VERIFIED.update(urls)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in reader(urls, batch, shuffle_buffer=1000, seed=1))
    return count / (time.perf_counter() - start)


def _resampled_pass(urls: list[str], batch: int, samples: int, keep: int) -> float:
    """Samples/s of a training reader (shards drawn at random) over `samples`, keeping up to `keep`
    bytes of parsed shards (0: every draw parsed from its tar)."""
    default, shards_module.RESAMPLED_KEEP_BYTES = shards_module.RESAMPLED_KEEP_BYTES, keep
    try:
        start = time.perf_counter()
        read = reader(urls, batch, shuffle_buffer=1000, seed=1, resampled=True, num_batches=samples // batch)
        count = sum(len(labels) for _, labels in read)
        return count / (time.perf_counter() - start)
    finally:
        shards_module.RESAMPLED_KEEP_BYTES = default


def run(a: argparse.Namespace) -> None:
    """The shards of a committed artifact (so their checksums are in its manifest), read with and without
    verification, alternating passes; then `onestep verify`'s checker alone. A thread reads and checks the
    next shard while the reader parses this one: only the first shard's check is waited for."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = store.Artifact(f"{tmp}/encode/0123456789abcdef")
        urls = []
        for s in range(a.shards):
            urls.append(artifact.path(shard_name("latents", s)))
            arrays = rng.standard_normal((a.per_shard, 4, 64, 64)).astype(np.float32)
            write_shard(urls[-1], ({"key": f"{s * a.per_shard + i:08d}", "npy": x, "cls": i % 1000, "src": "bench"}
                                   for i, x in enumerate(arrays)))
        artifact.commit({"stage": "encode"})
        _reader_pass(urls, a.batch, checked=True)  # page cache, imports
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.iters):
            for checked in (False, True):
                rates[checked].append(_reader_pass(urls, a.batch, checked))
        plain, checked = statistics.median(rates[False]), statistics.median(rates[True])
        samples, keep = 4 * a.shards * a.per_shard, shards_module.RESAMPLED_KEEP_BYTES
        kept = {0: [], keep: []}
        for _ in range(a.iters):
            for budget in kept:
                kept[budget].append(_resampled_pass(urls, a.batch, samples, budget))
        parsed, kept_rate = statistics.median(kept[0]), statistics.median(kept[keep])
        items = [(u, u.rsplit("/", 1)[1], os.path.getsize(u), None) for u in urls]
        start = time.perf_counter()
        integrity._check_files(items)
        verify_rate = sum(i[2] for i in items) / (time.perf_counter() - start) / 1e6
    table([
        (f"reader samples/s, 64x64x4 float32, shuffled, {a.shards} shards", f"{plain:,.0f}", ""),
        ("same, each shard checked (read whole, checksum) before use", f"{checked:,.0f}", ""),
        ("checksum cost, share of the reader's samples/s", f"{(plain - checked) / plain:+.1%}", "<= 2%"),
        ("`onestep verify` checker, one task, MB/s (page cache)", f"{verify_rate:,.0f}", ""),
        ("training reader (shards drawn at random), 4 passes, every draw parsed, samples/s", f"{parsed:,.0f}", ""),
        (f"same, parsed shards kept (up to {keep >> 20} MiB, the default)", f"{kept_rate:,.0f}", ""),
        ("kept / parsed", f"{kept_rate / parsed:.2f}x", "> 1"),
    ])

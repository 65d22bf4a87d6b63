"""Benchmarks: each prints a table. Not tests: numbers depend on the machine.

    python workflows/bench.py encode      # encode images/s (1 vs 2 Ray workers), reader samples/s, status time
    python workflows/bench.py train       # teacher images/s: bare forward+backward vs train_loop; GPU bf16 MFU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config as C  # noqa: E402
from pipeline import dag, store  # noqa: E402
from pipeline.data.encoders import DEFAULT_VAE, RAW_MEAN, RAW_STD, RgbEncoder, VaeEncoder  # noqa: E402
from pipeline.data.shards import reader, shard_name, write_shard  # noqa: E402
from pipeline.diffusion.loss import edm2_loss, sample_sigma  # noqa: E402
from pipeline.executor import DDPJob, InlineExecutor, RayExecutor, init_ray  # noqa: E402
from pipeline.models.edm2 import Denoiser, build_denoiser  # noqa: E402
from pipeline.training import gather_metrics  # noqa: E402
from stages import teacher as T  # noqa: E402


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


def _vae_info() -> dict[str, Any]:
    """VaeEncoder.info() of the SD VAE (downsample 8) without loading the VAE's config."""
    vae = VaeEncoder()
    return {"name": vae.name, "stored_channels": vae.stored_channels, "model_channels": vae.model_channels,
            "downsample": 8, "vae": DEFAULT_VAE, "raw_mean": list(RAW_MEAN), "raw_std": list(RAW_STD),
            "scale": vae.scale.tolist(), "bias": vae.bias.tolist()}


@dataclass(frozen=True)
class TrainSetting:
    """A network and data size measured bare and in the training loop, with how long to run each."""

    preset: str
    resolution: int
    num_classes: int
    batch: int
    encoder: dict[str, Any]  # the encode manifest's encoder info
    bare_iters: int  # timed forward+backward passes, after one warm-up pass
    steps_per_row: int  # optimiser steps per metrics row of the loop
    rows: int  # timed metrics rows, after one warm-up row

    @property
    def channels(self) -> int:  # model space
        return self.encoder["model_channels"]

    def __str__(self) -> str:
        res = self.resolution
        return f"{self.preset} {res}x{res}x{self.channels}, {self.num_classes} classes, batch {self.batch}"


def _round(batch: int, channels: int, resolution: int, num_classes: int, device: torch.device) -> T.Round:
    cfg = C.TeacherConfig()  # the default noise levels
    y = 0.5 * torch.randn(batch, channels, resolution, resolution, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return T.Round(y, labels, sample_sigma(batch, cfg.P_mean, cfg.P_std, None, device), torch.randn_like(y))


def _forward_backward(net: Denoiser, r: T.Round, bf16: bool) -> None:
    net.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        edm2_loss(net, r.y, r.labels, r.sigma, r.noise).loss.backward()


def _step_seconds(net: Denoiser, r: T.Round, warmup: int, iters: int, bf16: bool = False) -> float:
    """Median wall time of one forward+backward after `warmup` untimed ones."""
    times = []
    for _ in range(warmup + iters):
        start = time.perf_counter()
        _forward_backward(net, r, bf16)
        if r.y.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def _bare_rate(s: TrainSetting) -> float:
    torch.manual_seed(0)
    net = build_denoiser(s.preset, s.resolution, s.channels, s.num_classes).train()
    r = _round(s.batch, s.channels, s.resolution, s.num_classes, torch.device("cpu"))
    return s.batch / _step_seconds(net, r, warmup=1, iters=s.bare_iters)


def _write_data(s: TrainSetting, root: str, num_shards: int = 2, per_shard: int = 128) -> list[str]:
    """Shards as encode writes them: rgb pixels in [-1, 1], or VAE posterior mean and std."""
    rng = np.random.default_rng(0)
    shape = (per_shard, s.channels, s.resolution, s.resolution)
    urls = []
    for shard in range(num_shards):
        if s.encoder["name"] == "rgb":
            arrays = rng.uniform(-1, 1, shape)
        else:
            raw_mean, raw_std = (np.asarray(v)[:, None, None] for v in (RAW_MEAN, RAW_STD))
            mean = raw_mean + raw_std * rng.standard_normal(shape)
            arrays = np.concatenate([mean, rng.uniform(0.01, 0.1, shape)], axis=1)
        url = store.join(root, shard_name("shards/data", shard))
        write_shard(url, ({"key": f"{shard * per_shard + i:08d}", "npy": a, "cls": i % s.num_classes, "src": "bench"}
                          for i, a in enumerate(arrays.astype(np.float16))))
        urls.append(url)
    return urls


def _loop_rate(s: TrainSetting, root: str) -> float:
    """Median img_per_s of the loop's metrics rows after the first (shuffle buffer fill, first pass).

    One chunk: its checkpoint follows the last row and is not timed; no EMA snapshot falls inside
    (a real run writes one every 8M images).
    """
    row_nimg = s.batch * s.steps_per_row
    duration = row_nimg * (s.rows + 1)
    cfg = C.TeacherConfig(preset=s.preset, batch=s.batch, duration_nimg=duration, log_nimg=row_nimg,
                          checkpoint_nimg=duration, snapshot_nimg=2 * duration, lr_rampup_nimg=duration,
                          shuffle_buffer=200)
    net_config = build_denoiser(s.preset, s.resolution, s.channels, s.num_classes).config
    artifact = store.Artifact(store.join(root, "teacher"))
    args = T.LoopArgs(cfg, net_config, _write_data(s, store.join(root, "encode")), s.encoder, artifact, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress lines
        InlineExecutor().ddp(T.train_loop, args, DDPJob("teacher", artifact.path("checkpoints")))
    return statistics.median(row["img_per_s"] for row in gather_metrics(artifact)[1:])


def _gpu_rows(batch: int, peak_tflops: float) -> list[tuple[str, str, str]]:
    """XS and S at 64x64x4 in bf16 autocast: images/s and FLOPs (FlopCounterMode) / time / peak."""
    rows = []
    for preset in ("XS", "S"):
        torch.manual_seed(0)
        net = build_denoiser(preset, 64, 4, 1000).cuda().train()
        r = _round(batch, 4, 64, 1000, torch.device("cuda"))
        with FlopCounterMode(display=False) as counter:
            _forward_backward(net, r, bf16=True)
        seconds = _step_seconds(net, r, warmup=5, iters=20, bf16=True)
        fraction = counter.get_total_flops() / seconds / (peak_tflops * 1e12)
        rows += [(f"GPU images/s, {preset} 64x64x4 bf16, batch {batch}", f"{batch / seconds:,.0f}", ""),
                 (f"GPU fraction of peak bf16 ({peak_tflops:g} TFLOPS), same", f"{fraction:.1%}", ">= 35%")]
    return rows


CI = TrainSetting("ci", 16, 10, 32, RgbEncoder().info(), bare_iters=10, steps_per_row=2, rows=5)
XS = TrainSetting("XS", 64, 1000, 4, _vae_info(), bare_iters=3, steps_per_row=1, rows=3)


def bench_train(gpu_batch: int, peak_tflops: float) -> None:
    torch.set_num_threads(os.cpu_count() or 1)  # bare and loop run in this process on the same threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in (CI, XS):
            bare, loop = _bare_rate(s), _loop_rate(s, f"{tmp}/{s.preset}")
            rows += [(f"bare forward+backward images/s, {s} (CPU fp32)", f"{bare:.3g}", ""),
                     ("train_loop images/s, same (median metrics row after the first)", f"{loop:.3g}", ""),
                     ("train_loop overhead, 1 - loop / bare", f"{1 - loop / bare:.1%}", "<= 10%")]
    gpu = torch.cuda.is_available()
    table(rows + (_gpu_rows(gpu_batch, peak_tflops) if gpu else []))
    if not gpu:
        print("GPU rows skipped: torch.cuda.is_available() is False")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--num-images", type=int, default=8000)
    enc.add_argument("--resolution", type=int, default=64)
    train = sub.add_parser("train")
    train.add_argument("--gpu-batch", type=int, default=64, help="images per GPU pass (EDM2: 2048 over 32 GPUs)")
    train.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (989: H100 SXM)")
    args = p.parse_args()
    if args.what == "encode":
        bench_encode(args.num_images, args.resolution)
    if args.what == "train":
        bench_train(args.gpu_batch, args.peak_tflops)


if __name__ == "__main__":
    main()

"""Teacher images/s: the demo network's forward+backward in NHWC against NCHW; a bare forward+backward
against the training loop's, on the CPU; on a GPU, XS and S images/s and fraction of peak in bf16.

    python workflows/bench.py train
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import config as C
from pipeline import store
from pipeline.data.encoders import DEFAULT_VAE, RAW_MEAN, RAW_STD, RgbEncoder, VaeEncoder
from pipeline.data.shards import shard_name, write_shard
from pipeline.diffusion.loss import edm2_loss, sample_sigma
from pipeline.executor import DDPJob, InlineExecutor
from pipeline.models.edm2 import Denoiser, build_denoiser
from pipeline.teacher import Round, TeacherArgs, train_worker
from pipeline.training import CPU_BF16, cpu_has_bf16_units, gather_metrics

from .common import Row, median_seconds, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-batch", type=int, default=64, help="images per GPU pass (EDM2: 2048 over 32 GPUs)")
    p.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (989: H100 SXM)")


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


CI = TrainSetting("ci", 16, 10, 32, RgbEncoder().info(), bare_iters=10, steps_per_row=2, rows=5)
XS = TrainSetting("XS", 64, 1000, 4, _vae_info(), bare_iters=3, steps_per_row=1, rows=3)


def _round(batch: int, channels: int, resolution: int, num_classes: int, device: torch.device) -> Round:
    cfg = C.TeacherConfig()  # the default noise levels
    y = 0.5 * torch.randn(batch, channels, resolution, resolution, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    noise = torch.randn_like(y)
    y, noise = (t.contiguous(memory_format=torch.channels_last) for t in (y, noise))  # the loop's layout (pipeline/teacher.py)
    return Round(y, labels, sample_sigma(batch, cfg.P_mean, cfg.P_std, None, device), noise)


def _forward_backward(net: Denoiser, r: Round, bf16: bool) -> None:
    net.zero_grad(set_to_none=True)
    with torch.autocast(r.y.device.type, torch.bfloat16, enabled=bf16):
        edm2_loss(net, r.y, r.labels, r.sigma, r.noise).loss.backward()


def _step_seconds(net: Denoiser, r: Round, warmup: int, iters: int, bf16: bool = False) -> float:
    """Median wall time of one forward+backward after `warmup` untimed ones."""
    return median_seconds(partial(_forward_backward, net, r, bf16), warmup, iters)


def _layout_rows(iters: int = 10) -> list[Row]:
    """The demo teacher's forward+backward (batch 64) on the channels-last images the loop feeds it,
    against the same images in NCHW, and in bf16 autocast (the default on CPUs with AMX), interleaved."""
    cfg = C.load_config("demo").teacher
    torch.manual_seed(0)
    net = build_denoiser("demo", 16, 3, 10, **cfg.network_overrides()).train()
    r = _round(cfg.batch, 3, 16, 10, torch.device("cpu"))
    nchw = Round(r.y.contiguous(), r.labels, r.sigma, r.noise.contiguous())
    runs = {"NCHW": (nchw, False), "NHWC": (r, False), "NHWC bf16": (r, True)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):
        for name, (rnd, bf16) in runs.items():
            rates[name].append(cfg.batch / _step_seconds(net, rnd, warmup=1, iters=iters, bf16=bf16))
    nchw_rate, nhwc_rate, bf16_rate = (statistics.median(v) for v in rates.values())
    amx = "this CPU has AMX" if cpu_has_bf16_units() else "this CPU has no AMX: bf16 is emulated"
    return [("demo teacher forward+backward images/s, batch 64, NCHW", f"{nchw_rate:.3g}", ""),
            ("same, channels-last (NHWC, as the loop feeds it)", f"{nhwc_rate:.3g}", ""),
            ("NHWC / NCHW", f"{nhwc_rate / nchw_rate:.2f}x", "> 1 on CPUs"),
            ("same, NHWC in bf16 autocast", f"{bf16_rate:.3g}", ""),
            (f"bf16 / fp32, NHWC ({amx})", f"{bf16_rate / nhwc_rate:.2f}x", "> 1 with AMX")]


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
    args = TeacherArgs(cfg, net_config, _write_data(s, store.join(root, "encode")), s.encoder, artifact, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress lines
        InlineExecutor().ddp(train_worker, args, DDPJob("teacher", artifact.path("checkpoints")))
    return statistics.median(row["img_per_s"] for row in gather_metrics(artifact)[1:])


def gpu_rows(batch: int, peak_tflops: float, compile_too: bool = False, presets: tuple[str, ...] = ("XS", "S"),
             device: str = "cuda") -> list[Row]:
    """XS and S at 64x64x4 in bf16 autocast: images/s and FLOPs (FlopCounterMode, eager) / time / peak;
    with compile_too, the same step through torch.compile (teacher.compile)."""
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        net = build_denoiser(preset, 64, 4, 1000).to(device).train()
        r = _round(batch, 4, 64, 1000, torch.device(device))
        with FlopCounterMode(display=False) as counter:
            _forward_backward(net, r, bf16=True)
        for compiled in (False, True) if compile_too else (False,):
            model = torch.compile(net) if compiled else net
            seconds = _step_seconds(model, r, warmup=5, iters=20, bf16=True)
            fraction = counter.get_total_flops() / seconds / (peak_tflops * 1e12)
            how = "bf16 + torch.compile" if compiled else "bf16"
            rows += [(f"GPU images/s, {preset} 64x64x4 {how}, batch {batch}", f"{batch / seconds:,.0f}", ""),
                     (f"GPU fraction of peak bf16 ({peak_tflops:g} TFLOPS), same", f"{fraction:.1%}", ">= 35%")]
    return rows


def run(a: argparse.Namespace) -> None:
    torch.set_num_threads(os.cpu_count() or 1)  # bare and loop run in this process on the same threads
    rows = _layout_rows()
    os.environ[CPU_BF16] = "0"  # the loop in fp32, as the bare passes below, on any CPU
    with tempfile.TemporaryDirectory() as tmp:
        for s in (CI, XS):
            bare, loop = _bare_rate(s), _loop_rate(s, f"{tmp}/{s.preset}")
            rows += [(f"bare forward+backward images/s, {s} (CPU fp32)", f"{bare:.3g}", ""),
                     ("training loop images/s, same (median metrics row after the first)", f"{loop:.3g}", ""),
                     ("training loop overhead, 1 - loop / bare", f"{1 - loop / bare:.1%}", "<= 10%")]
    gpu = torch.cuda.is_available()
    table(rows + (gpu_rows(a.gpu_batch, a.peak_tflops) if gpu else []))
    if not gpu:
        print("GPU rows skipped: torch.cuda.is_available() is False")

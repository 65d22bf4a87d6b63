"""Benchmarks: each prints a table. Not tests: numbers depend on the machine.

    python workflows/bench.py encode      # encode images/s (1 vs 2 Ray workers), reader samples/s, status time
    python workflows/bench.py train       # teacher images/s: bare forward+backward vs train_loop; GPU bf16 MFU
    python workflows/bench.py sample      # Heun sampler overhead, evaluate images/s (1 vs 2 workers), phema memory
    python workflows/bench.py pairs       # pairs/s (1 vs 2 Ray workers) against the forward-pass bound
    python workflows/bench.py distill     # one distill step against the sum of its passes, each timed alone
    python workflows/bench.py distill --method dmd2   # the same for DMD2, and its peak memory against DMD's
    python workflows/bench.py evaluate    # probe and Inception features images/s; evaluate's share of the demo
    python workflows/bench.py integrity   # the reader's samples/s with and without checksum verification
    python workflows/bench.py gpu         # the first GPU run: gpu tests, XS/S bf16 images/s and MFU, sampler
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config as C  # noqa: E402
from pipeline import dag, integrity, store  # noqa: E402
from pipeline.data import shards as shards_module  # noqa: E402
from pipeline.data.encoders import (DEFAULT_VAE, RAW_MEAN, RAW_STD, RgbEncoder, VaeEncoder,  # noqa: E402
                                    encoder_from_info, lpips_decoder)
from pipeline.data.shards import reader, shard_name, write_shard  # noqa: E402
from pipeline.diffusion.dmd import (distribution_matching_loss, fake_score_loss, load_lpips,  # noqa: E402
                                   lpips_regression_loss)
from pipeline.diffusion.loss import edm2_loss, sample_sigma  # noqa: E402
from pipeline.diffusion.phema import reconstruct  # noqa: E402
from pipeline.diffusion.sampler import edm_sampler, seeded_noise  # noqa: E402
from pipeline.executor import DDPJob, InlineExecutor, RayExecutor, init_ray  # noqa: E402
from pipeline.models.edm2 import Denoiser, build_denoiser  # noqa: E402
from pipeline.training import gather_metrics  # noqa: E402
from pipeline.weights import read_weights, save_network, weights_bytes  # noqa: E402
from stages import distill as D  # noqa: E402
from stages import pairs as P  # noqa: E402
from stages import phema as PH  # noqa: E402
from stages import teacher as T  # noqa: E402
from stages.evaluate import EvalJob, Model, evaluate_range  # noqa: E402


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


def _reader_pass(urls: list[str], batch: int, checked: bool) -> float:
    """Samples/s of one pass; `checked`: each shard read whole and its checksum verified before use (a process's first read)."""
    shards_module._VERIFIED.clear()
    if not checked:
        shards_module._VERIFIED.update(urls)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in reader(urls, batch, shuffle_buffer=1000, seed=1))
    return count / (time.perf_counter() - start)


def bench_integrity(a: argparse.Namespace) -> None:
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
        items = [(u, u.rsplit("/", 1)[1], os.path.getsize(u), None) for u in urls]
        start = time.perf_counter()
        integrity._check_files(items)
        verify_rate = sum(i[2] for i in items) / (time.perf_counter() - start) / 1e6
    table([
        (f"reader samples/s, 64x64x4 float32, shuffled, {a.shards} shards", f"{plain:,.0f}", ""),
        ("same, each shard checked (read whole, checksum) before use", f"{checked:,.0f}", ""),
        ("checksum cost, share of the reader's samples/s", f"{(plain - checked) / plain:+.1%}", "<= 2%"),
        ("`onestep verify` checker, one task, MB/s (page cache)", f"{verify_rate:,.0f}", ""),
    ])


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
    with torch.autocast(r.y.device.type, torch.bfloat16, enabled=bf16):
        edm2_loss(net, r.y, r.labels, r.sigma, r.noise).loss.backward()


def _round_seconds(fns: list[Callable[[], Any]], warmup: int, iters: int) -> np.ndarray:
    """Wall times [iters, len(fns)]: each round calls every fn once, so load from other jobs
    falls on all of them alike; `warmup` untimed rounds first (CUDA work included)."""
    times = np.zeros((warmup + iters, len(fns)))
    for i, j in itertools.product(range(warmup + iters), range(len(fns))):
        start = time.perf_counter()
        fns[j]()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times[i, j] = time.perf_counter() - start
    return times[warmup:]


def _median_seconds(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall time of fn() after `warmup` untimed calls."""
    return float(np.median(_round_seconds([fn], warmup, iters)))


def _step_seconds(net: Denoiser, r: T.Round, warmup: int, iters: int, bf16: bool = False) -> float:
    """Median wall time of one forward+backward after `warmup` untimed ones."""
    return _median_seconds(partial(_forward_backward, net, r, bf16), warmup, iters)


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


def _gpu_rows(batch: int, peak_tflops: float, compile_too: bool = False, presets: tuple[str, ...] = ("XS", "S"),
              device: str = "cuda") -> list[tuple[str, str, str]]:
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


def _gpu_sampler_rows(batch: int, device: str = "cuda", preset: str = "XS") -> list[tuple[str, str, str]]:
    """The Heun sampler on an XS 64x64x4 network: images/s at evaluate's 32 steps, pairs/s at DMD's 256."""
    net = build_denoiser(preset, 64, 4, 1000).to(device).eval()
    noise, labels = seeded_noise(list(range(batch)), (4, 64, 64), 1000, device)
    rows = []
    for steps, what in ((32, "evaluate: images/s"), (256, "pairs: pairs/s")):
        with torch.no_grad():
            seconds = _median_seconds(partial(edm_sampler, net, noise, labels, num_steps=steps), warmup=1, iters=3)
        rows.append((f"Heun sampler, {preset} 64x64x4 fp32, {steps} steps, batch {batch}: {what}",
                     f"{batch / seconds:,.1f}", ""))
    return rows


def bench_gpu(a: argparse.Namespace) -> None:
    """The first GPU run in one command (under 8 minutes on one H100): the gpu-marked tests (bf16
    against fp32, the ci DAG with every GPU setting over NCCL), then XS and S training images/s and
    fraction of peak in bf16, eager and compiled, and the sampler's images/s and pairs/s."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "`bench.py train` and `bench.py pairs` measure the CPU")
    root = Path(__file__).resolve().parent.parent
    start = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"], cwd=root)
    rows = [("gpu-marked tests (bf16 vs fp32, the ci DAG on the GPU over NCCL)",
             "passed" if tests.returncode == 0 else f"FAILED (exit {tests.returncode}, output above)", "passed"),
            ("their wall time s", f"{time.perf_counter() - start:.0f}", "")]
    rows += _gpu_rows(a.gpu_batch, a.peak_tflops, compile_too=True)
    rows += _gpu_sampler_rows(a.sample_batch)
    rows.append(("GPU " + torch.cuda.get_device_name(), f"{time.perf_counter() - start:.0f} s in all", "<= 480 s"))
    table(rows)


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


def _preset_network(preset: str) -> Denoiser:
    """The teacher network of a pixel-space preset (demo, ci) at its dataset's size."""
    cfg = C.load_config(preset)
    assert cfg.encode.encoder == "rgb", cfg.encode.encoder
    torch.manual_seed(0)
    return build_denoiser(cfg.teacher.preset, cfg.encode.resolution, 3, cfg.encode.num_classes,
                          **cfg.teacher.network_overrides())


def _teacher_artifact(root: str, net: Denoiser) -> store.Artifact:
    """A phema-like artifact: network.json + network.safetensors, what evaluate/pairs/distill load."""
    artifact = store.Artifact(store.join(root, "phema"))
    save_network(artifact, "network", net)
    return artifact


def _forward_seconds(net: Denoiser, batch: int, iters: int) -> float:
    """Median time of one no-grad forward at this batch, as the sampler calls it."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise, labels = seeded_noise(list(range(batch)), shape, net.num_classes, "cpu")
    noise = noise.contiguous(memory_format=torch.channels_last)  # the sampler's NHWC layout
    sigma = torch.full((batch,), 1.0)
    with torch.no_grad():
        return _median_seconds(lambda: net(noise, sigma, labels), warmup=1, iters=iters)


class _TimedDenoiser:
    """A denoiser that adds up the wall time spent inside the network and counts its calls."""

    def __init__(self, net: Denoiser) -> None:
        self.net, self.seconds, self.calls = net, 0.0, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x, sigma, labels)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _sampler_rows(steps: int, batch: int, threads: int) -> list[tuple[str, str, str]]:
    net = _preset_network("demo").eval()
    forward = _forward_seconds(net, batch, iters=5)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise, labels = seeded_noise(list(range(batch)), shape, net.num_classes, "cpu")
    timed = _TimedDenoiser(net)
    start = time.perf_counter()
    edm_sampler(timed, noise, labels, num_steps=steps)
    sampler = time.perf_counter() - start
    nfe = 2 * steps - 1
    assert timed.calls == nfe, timed.calls
    return [(f"Heun sampler ms/image, demo net 32x32x3, {steps} steps, batch {batch} (CPU, {threads} thr)",
             f"{1e3 * sampler / batch:.1f}", ""),
            (f"NFE x one forward ms/image, same batch ({nfe} x median of 5)", f"{1e3 * nfe * forward / batch:.1f}", ""),
            ("sampler overhead, sampler / (NFE x forward) - 1", f"{sampler / (nfe * forward) - 1:.1%}", "<= 5%"),
            ("same, from inside the run: time outside the network / time in it",
             f"{(sampler - timed.seconds) / timed.seconds:.1%}", "<= 5%")]


def _eval_rate(job: EvalJob, items: list[tuple[int, int, int]], workers: int) -> tuple[float, float]:
    """(images/s, mean seconds inside a task)."""
    start = time.perf_counter()
    results = RayExecutor(max_in_flight=workers).map(partial(evaluate_range, job), items)
    rate = sum(stop - lo for _, lo, stop in items) / (time.perf_counter() - start)
    return rate, statistics.mean(r["seconds"] for r in results)


def _eval_rows(root: str, steps: int, images: int, per_task: int, batch: int) -> list[tuple[str, str, str]]:
    teacher = _teacher_artifact(root, _preset_network("demo"))
    model = Model("teacher", teacher, "network.safetensors", 0.1, steps)
    job = EvalJob([model], RgbEncoder().info(), {}, None, {}, [], [0], 1, batch, 0, "cpu")  # sampling alone
    items = [(0, lo, min(lo + per_task, images)) for lo in range(0, images, per_task)]
    init_ray()
    RayExecutor(max_in_flight=2).map(partial(evaluate_range, dataclasses.replace(job, batch=1)),
                                     [(0, 0, 1), (0, 1, 2)])  # two workers started, modules imported
    (one, task_one), (two, task_two) = _eval_rate(job, items, 1), _eval_rate(job, items, 2)
    what = f"{len(items)} tasks x {per_task} images, {steps} steps, batch {min(batch, per_task)}"
    return [(f"evaluate images/s, 1 worker (demo net, sampling only, {what})", f"{one:.3g}", ""),
            ("evaluate images/s, 2 workers, same", f"{two:.3g}", ""),
            ("evaluate speed-up, 2 vs 1 worker", f"{two / one:.2f}x", ">= 1.7x"),
            ("mean task seconds, 2 workers / 1 worker (> 1: the cores are busy with other work)",
             f"{task_two / task_one:.2f}", "~1")]


def _write_snapshots(state: dict[str, torch.Tensor], count: int, root: str) -> list[str]:
    """`count` float32 snapshots: the state plus 1% Gaussian noise each."""
    gen = torch.Generator().manual_seed(0)
    urls = []
    for i in range(count):
        snap = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        urls.append(store.join(root, f"snapshot-{i:03d}.safetensors"))
        store.write_bytes(urls[-1], weights_bytes(snap))
    return urls


def _phema_coefficients(num_snapshots: int, num_targets: int) -> np.ndarray:
    """[snapshots, targets] weights as the stage solves them: snapshots at 2 sigma_rels per time."""
    used = [{"nimg": (i // 2 + 1) << 20, "sigma_rel": (0.05, 0.10)[i % 2]} for i in range(num_snapshots)]
    sigma_rels = tuple(float(s) for s in np.linspace(0.03, 0.2, num_targets))
    return PH.coefficients(used, used[-1]["nimg"], sigma_rels)


def _rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int:
    """Give freed heap back to the OS and reset VmHWM to the current RSS (Linux >= 4.0); that RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else memory freed after writing the snapshots is reused
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_bytes("VmRSS")


def _phema_rows(root: str, preset: str, num_snapshots: int, num_targets: int) -> list[tuple[str, str, str]]:
    state = {k: v.float() for k, v in build_denoiser(preset, 64, 4, 1000).state_dict().items()}
    model_bytes = sum(v.numel() * 4 for v in state.values())
    urls = _write_snapshots(state, num_snapshots, root)
    weights = _phema_coefficients(num_snapshots, num_targets)
    del state
    before = _reset_peak_rss()
    start = time.perf_counter()
    outs = reconstruct((read_weights(url) for url in urls), weights)
    seconds = time.perf_counter() - start
    growth = _rss_bytes("VmHWM") - before
    assert len(outs) == num_targets
    bound = model_bytes * (num_targets + 1)
    what = f"{num_targets} targets from {num_snapshots} snapshots, {preset} 64x64x4 ({model_bytes / 4e6:.1f}M floats)"
    return [(f"phema reconstruct s, {what}, read from local files", f"{seconds:.1f}", ""),
            ("phema peak RSS growth, GB", f"{growth / 1e9:.2f}", ""),
            ("model size x (targets + 1), GB", f"{bound / 1e9:.2f}", ""),
            ("peak RSS growth / (model size x (targets + 1))", f"{growth / bound:.2f}", "~1 (phema.py docstring)")]


def bench_sample(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    rows = _sampler_rows(a.steps, a.batch, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows += _eval_rows(f"{tmp}/eval", a.eval_steps, a.eval_images, a.eval_per_task, a.batch)
    with tempfile.TemporaryDirectory() as tmp:
        rows += _phema_rows(tmp, a.phema_preset, a.phema_snapshots, a.phema_targets)
    table(rows)


def _pairs_rate(job: P.PairsJob, workers: int) -> float:
    num_shards = -(-job.cfg.num_pairs // job.cfg.pairs_per_shard)
    start = time.perf_counter()
    made = sum(RayExecutor(max_in_flight=workers).map(partial(P.make_shard, job), list(range(num_shards))))
    return made / (time.perf_counter() - start)


def bench_pairs(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # as in a Ray worker with num_cpus=1
    net = _preset_network("demo").eval()
    cfg = C.PairsConfig(num_pairs=a.shards * a.pairs_per_shard, num_steps=a.steps,
                        pairs_per_shard=a.pairs_per_shard, batch=a.batch)
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher_artifact(tmp, net)
        job = P.PairsJob(store.Artifact(f"{tmp}/warm"), teacher, "network.safetensors", "",
                         dataclasses.replace(cfg, num_pairs=2, pairs_per_shard=1, num_steps=1), "cpu")
        _pairs_rate(job, 2)  # two workers started, modules imported
        one = _pairs_rate(dataclasses.replace(job, artifact=store.Artifact(f"{tmp}/one"), cfg=cfg), 1)
        two = _pairs_rate(dataclasses.replace(job, artifact=store.Artifact(f"{tmp}/two"), cfg=cfg), 2)
    nfe = 2 * a.steps - 1
    bound = a.batch / (_forward_seconds(net, a.batch, iters=20) * nfe)
    what = f"demo net, {a.shards} shards x {a.pairs_per_shard}, {a.steps} steps, batch {a.batch}"
    table([(f"pairs/s, 1 worker ({what})", f"{one:.3g}", ""),
           ("pairs/s, 2 workers, same", f"{two:.3g}", ""),
           ("pairs speed-up, 2 vs 1 worker", f"{two / one:.2f}x", ">= 1.8x"),
           (f"bound pairs/s, batch / (forward x {nfe} NFE), 1 thread", f"{bound:.3g}", ""),
           ("pairs/s, 1 worker / bound", f"{one / bound:.2f}", ">= 0.95")])


LOSS_KEYS = ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")  # distill.run's teacher_loss


DMD2_SETTINGS = {"method": "dmd2", "lambda_reg": 0.0, "fake_updates_per_gen": 5}  # DMD2's rule, as in the README


def _distill_args(preset: str, root: str, method: str = "dmd") -> D.DistillArgs:
    cfg = C.load_config(preset)
    distill = dataclasses.replace(cfg.distill, **DMD2_SETTINGS) if method == "dmd2" else cfg.distill
    teacher = _teacher_artifact(root, _preset_network(preset))
    return D.DistillArgs(distill, {k: getattr(cfg.teacher, k) for k in LOSS_KEYS}, teacher, "network.safetensors",
                         "", [], [], RgbEncoder().info(), store.Artifact(f"{root}/distill"), 0)


def _pair_batches(net: Denoiser, reg_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(noise, target, labels) as the pairs reader yields them: float16 arrays, int64 labels."""
    shape = (reg_batch, net.img_channels, net.img_resolution, net.img_resolution)
    batch = (torch.randn(shape).half(), (0.5 * torch.randn(shape)).half(), torch.randint(net.num_classes, (reg_batch,)))
    return itertools.repeat(batch)


def _backward(fn: Callable[[], torch.Tensor], *nets: torch.nn.Module) -> None:
    for net in nets:
        net.zero_grad(set_to_none=True)
    fn().backward()


def _distill_passes(nets: D.Nets, lpips: torch.nn.Module, args: D.DistillArgs
                    ) -> list[tuple[str, int, Callable[[], Any]]]:
    """Each forward/backward a distill step does, to be timed alone: (what, times per step, call)."""
    cfg, loss, g = args.cfg, args.teacher_loss, nets.generator
    b, r, size = cfg.batch, cfg.reg_batch, cfg.lpips_size
    z = torch.randn(b + r, g.denoiser.img_channels, g.denoiser.img_resolution, g.denoiser.img_resolution)
    labels = torch.randint(g.denoiser.num_classes, (b + r,))
    with torch.no_grad():
        x = g(z, labels)
    sigma, noise = sample_sigma(b, loss["P_mean"], loss["P_std"], None, "cpu"), torch.randn_like(x[:b])
    dm_sigma = D.sample_dm_sigma(b, None, "cpu")
    pixels = x[b:].clamp(-1, 1)
    k = cfg.fake_updates_per_gen  # fake updates per step; all but the last make a fresh batch of G
    per_step = f" (x{k} per step)" if k > 1 else ""

    def fake_loss() -> torch.Tensor:
        return fake_score_loss(nets.fake, x[:b], labels[:b], sigma, noise, weighting=loss["weighting"],
                               min_snr_gamma=loss["min_snr_gamma"], use_uncertainty=loss["use_uncertainty"]).loss

    def no_grad_g() -> None:
        with torch.no_grad():
            g(z[:b], labels[:b])

    passes = [(f"fake score forward+backward (EDM2 loss), {b} images{per_step}", k,
               partial(_backward, fake_loss, nets.fake)),
              (f"G forward+backward, {b}+{r} images", 1, partial(_backward, lambda: g(z, labels).square().mean(), g)),
              (f"real + fake score forwards (DM gradient), {b} images", 1,
               lambda: distribution_matching_loss(x[:b], labels[:b], nets.real, nets.fake, dm_sigma, noise)),
              (f"LPIPS {cfg.lpips_net} forward+backward, {r} images at {size}px", 1, lambda: lpips_regression_loss(
                  lpips, pixels.clone().requires_grad_(), pixels.flip(0), size).backward())]
    if k > 1:
        passes.insert(0, (f"G forward, no grad, {b} images (x{k - 1} per step)", k - 1, no_grad_g))
    return passes


def _dmd2_passes(nets: D.Nets, args: D.DistillArgs) -> list[tuple[str, int, Callable[[], Any]]]:
    """Each forward/backward a DMD2 step does, to be timed alone: (what, times per step, call)."""
    cfg, loss, g = args.cfg, args.teacher_loss, nets.generator
    b, k = cfg.batch, cfg.fake_updates_per_gen
    z = torch.randn(b, g.denoiser.img_channels, g.denoiser.img_resolution, g.denoiser.img_resolution)
    labels = torch.randint(g.denoiser.num_classes, (b,))
    with torch.no_grad():
        x = g(z, labels)
    sigma, real = sample_sigma(2 * b, loss["P_mean"], loss["P_std"], None, "cpu"), 0.5 * torch.randn_like(x)
    both, labels2 = torch.cat([x, real]), torch.cat([labels, labels])

    def fake_side() -> torch.Tensor:
        denoised, u, logits = nets.fake(both, sigma, labels2, return_u=True, return_logits=True)
        return denoised.square().mean() + u.mean() + logits.mean()

    def g_gan() -> None:  # through the frozen fake score and head to the images
        frozen = [p.requires_grad_(False) for p in nets.fake.parameters()]
        xg = x.clone().requires_grad_()
        nets.fake(xg, sigma[:b], labels, return_logits=True)[1].mean().backward()
        for p in frozen:
            p.requires_grad_(True)

    def no_grad_g() -> None:
        with torch.no_grad():
            g(z, labels)

    return [(f"fake score + head forward+backward, {b} generated + {b} real images (x{k} per step)", k,
             partial(_backward, fake_side, nets.fake)),
            (f"G forward, no grad, {b} images (x{k - 1} per step)", k - 1, no_grad_g),
            (f"G forward+backward, {b} images", 1, partial(_backward, lambda: g(z, labels).square().mean(), g)),
            (f"real + fake score forwards (DM gradient), {b} images", 1,
             lambda: distribution_matching_loss(x, labels, nets.real, nets.fake, D.sample_dm_sigma(b, None, "cpu"),
                                                torch.randn_like(x))),
            (f"fake score + head forward+backward to the images (G's GAN term), {b} images", 1, g_gan)]


def _peak_step_bytes(step: Callable[[], Any]) -> int:
    """The rise of this process's peak RSS over one call (after a warm-up call)."""
    step()
    base = _reset_peak_rss()
    step()
    return _rss_bytes("VmHWM") - base


def bench_distill(a: argparse.Namespace) -> None:
    if a.method == "dmd2":
        bench_distill_dmd2(a)
        return
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args = _distill_args(a.preset, tmp)
        nets = D.build_nets(args, cpu)
    cfg = args.cfg
    lpips = load_lpips(cfg.lpips_net, cfg.lpips_pretrained, cfg.lpips_weights)
    to_pixels = lpips_decoder(encoder_from_info(args.encoder), cfg.lpips_decoder)  # as distill's train_loop
    pairs = _pair_batches(nets.real, cfg.reg_batch)

    def step() -> None:
        D.train_step(nets, nets.generator, nets.fake, pairs, to_pixels, lpips, args, cfg.batch, cpu)

    passes = _distill_passes(nets, lpips, args)
    times = _round_seconds([step, *(fn for _, _, fn in passes)], warmup=1, iters=a.iters)  # [iters, 1 + passes]
    times[:, 1:] *= np.array([count for _, count, _ in passes])  # each pass as often as a step makes it
    seconds, parts = np.median(times, axis=0)[0], np.median(times, axis=0)[1:]
    ratio = np.median(times[:, 0] / times[:, 1:].sum(axis=1))  # per round: both under the same load
    pretrained = "pretrained" if cfg.lpips_pretrained else "random"
    table([(f"distill step ms, {a.preset} preset (LPIPS {cfg.lpips_net} {pretrained}; CPU, {a.threads} thr)",
            f"{1e3 * seconds:.0f}", ""),
           *((f"  {name}, ms", f"{1e3 * t:.0f}", "") for (name, _, _), t in zip(passes, parts)),
           ("sum of the passes, ms", f"{1e3 * parts.sum():.0f}", ""),
           (f"step / sum of its passes, median of {a.iters} interleaved rounds", f"{ratio:.2f}",
            "~1 (rest: optimiser, clipping)")])


def bench_distill_dmd2(a: argparse.Namespace) -> None:
    """A DMD2 step (GAN head, 5 fake-side updates with real images, no regression) against the sum of its
    passes, and its peak memory against a DMD step's."""
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args, dmd_args = _distill_args(a.preset, tmp, "dmd2"), _distill_args(a.preset, tmp)
        nets, dmd_nets = D.build_nets(args, cpu), D.build_nets(dmd_args, cpu)
    cfg, encoder = args.cfg, encoder_from_info(args.encoder)
    shape = (cfg.batch, nets.real.img_channels, nets.real.img_resolution, nets.real.img_resolution)
    reals = itertools.repeat((0.5 * torch.randn(shape), torch.randint(nets.real.num_classes, (cfg.batch,))))

    def step() -> None:
        D.train_step_dmd2(nets, nets.generator, nets.fake, reals, encoder, args, cfg.batch, cpu)

    lpips = load_lpips(dmd_args.cfg.lpips_net, dmd_args.cfg.lpips_pretrained, dmd_args.cfg.lpips_weights)
    to_pixels = lpips_decoder(encoder, dmd_args.cfg.lpips_decoder)
    pairs = _pair_batches(dmd_nets.real, dmd_args.cfg.reg_batch)

    def dmd_step() -> None:
        D.train_step(dmd_nets, dmd_nets.generator, dmd_nets.fake, pairs, to_pixels, lpips, dmd_args, cfg.batch, cpu)

    passes = _dmd2_passes(nets, args)
    times = _round_seconds([step, *(fn for _, _, fn in passes)], warmup=1, iters=a.iters)
    times[:, 1:] *= np.array([count for _, count, _ in passes])
    seconds, parts = np.median(times, axis=0)[0], np.median(times, axis=0)[1:]
    ratio = np.median(times[:, 0] / times[:, 1:].sum(axis=1))
    dmd2_peak, dmd_peak = _peak_step_bytes(step), _peak_step_bytes(dmd_step)
    table([(f"DMD2 step ms, {a.preset} preset ({cfg.fake_updates_per_gen} fake-side updates; CPU, {a.threads} thr)",
            f"{1e3 * seconds:.0f}", ""),
           *((f"  {name}, ms", f"{1e3 * t:.0f}", "") for (name, _, _), t in zip(passes, parts)),
           ("sum of the passes, ms", f"{1e3 * parts.sum():.0f}", ""),
           (f"step / sum of its passes, median of {a.iters} interleaved rounds", f"{ratio:.2f}", "<= 1.1"),
           ("peak memory rise of a DMD2 step, MB", f"{dmd2_peak / 2**20:.0f}", ""),
           ("peak memory rise of a DMD step (LPIPS regression), MB", f"{dmd_peak / 2**20:.0f}", "")])


def _features_rate(features: Callable[[np.ndarray], Any], resolution: int, batch: int, iters: int) -> float:
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    return batch / _median_seconds(lambda: features(images), warmup=1, iters=iters)


def _demo_share(storage: str) -> list[tuple[str, str, str]]:
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


def bench_evaluate(a: argparse.Namespace) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--num-images", type=int, default=8000)
    enc.add_argument("--resolution", type=int, default=64)
    train = sub.add_parser("train")
    train.add_argument("--gpu-batch", type=int, default=64, help="images per GPU pass (EDM2: 2048 over 32 GPUs)")
    train.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (989: H100 SXM)")
    sample = sub.add_parser("sample")
    sample.add_argument("--steps", type=int, default=16, help="Heun steps of the timed sampler run")
    sample.add_argument("--batch", type=int, default=32)
    sample.add_argument("--eval-steps", type=int, default=8, help="Heun steps in the evaluate tasks")
    sample.add_argument("--eval-images", type=int, default=32)
    sample.add_argument("--eval-per-task", type=int, default=16)
    sample.add_argument("--phema-preset", default="XS", help="network whose snapshots phema combines (64x64x4)")
    sample.add_argument("--phema-snapshots", type=int, default=16)
    sample.add_argument("--phema-targets", type=int, default=8)
    sample.add_argument("--threads", type=int, default=1, help="torch threads of the in-process timings")
    pairs = sub.add_parser("pairs")
    pairs.add_argument("--shards", type=int, default=8)
    pairs.add_argument("--pairs-per-shard", type=int, default=64)
    pairs.add_argument("--steps", type=int, default=8)
    pairs.add_argument("--batch", type=int, default=32)
    distill = sub.add_parser("distill")
    distill.add_argument("--preset", default="ci", choices=("ci", "demo"))
    distill.add_argument("--iters", type=int, default=5, help="timed repeats of the step and of each pass")
    distill.add_argument("--threads", type=int, default=1)
    distill.add_argument("--method", default="dmd", choices=("dmd", "dmd2"))
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--gpu-batch", type=int, default=64, help="images per GPU pass for XS and S")
    gpu.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (989: H100 SXM)")
    gpu.add_argument("--sample-batch", type=int, default=256)
    integ = sub.add_parser("integrity")
    integ.add_argument("--shards", type=int, default=32, help="the first shard's check is not overlapped: its share is 1/shards")
    integ.add_argument("--per-shard", type=int, default=250)
    integ.add_argument("--batch", type=int, default=256)
    integ.add_argument("--iters", type=int, default=5, help="passes of each kind, alternating")
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--iters", type=int, default=5)
    evaluate.add_argument("--storage", default="./artifacts", help="where the demo ran (`python workflows/full.py`)")
    args = p.parse_args()
    if args.what == "encode":
        bench_encode(args.num_images, args.resolution)
    if args.what == "train":
        bench_train(args.gpu_batch, args.peak_tflops)
    if args.what == "sample":
        bench_sample(args)
    if args.what == "pairs":
        bench_pairs(args)
    if args.what == "distill":
        bench_distill(args)
    if args.what == "evaluate":
        bench_evaluate(args)
    if args.what == "gpu":
        bench_gpu(args)
    if args.what == "integrity":
        bench_integrity(args)


if __name__ == "__main__":
    main()

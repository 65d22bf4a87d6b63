"""What several benchmarks share: the printed table, interleaved timings, this process's memory,
the demo and ci teacher networks, and the setup of a distill step (DMD and DMD2)."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline import config as C
from pipeline import store
from pipeline.data.encoders import RgbEncoder
from pipeline.diffusion.sampler import seeded_noise
from pipeline.distill.method import DistillArgs
from pipeline.models.edm2 import Denoiser, build_denoiser
from pipeline.weights import save_network

Row = tuple[str, str, str]  # (measure, value, target)
Pass = tuple[str, int, Callable[[], Any]]  # (what, times per step, call)


def table(rows: list[Row]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>14}  {target}")


# --- timing ------------------------------------------------------------------------------------

def round_seconds(fns: list[Callable[[], Any]], warmup: int, iters: int) -> np.ndarray:
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


def median_seconds(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall time of fn() after `warmup` untimed calls."""
    return float(np.median(round_seconds([fn], warmup, iters)))


# --- this process's memory (Linux) -------------------------------------------------------------

def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> int:
    """Give freed heap back to the OS and reset VmHWM to the current RSS (Linux >= 4.0); that RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else memory freed after writing the snapshots is reused
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes("VmRSS")


# --- teacher networks --------------------------------------------------------------------------

def preset_network(preset: str) -> Denoiser:
    """The teacher network of a pixel-space preset (demo, ci) at its dataset's size."""
    cfg = C.load_config(preset)
    assert cfg.encode.encoder == "rgb", cfg.encode.encoder
    torch.manual_seed(0)
    return build_denoiser(cfg.teacher.preset, cfg.encode.resolution, 3, cfg.encode.num_classes,
                          **cfg.teacher.network_overrides())


def teacher_artifact(root: str, net: Denoiser) -> store.Artifact:
    """A phema-like artifact: network.json + network.safetensors, what evaluate/pairs/distill load."""
    artifact = store.Artifact(store.join(root, "phema"))
    save_network(artifact, "network", net)
    return artifact


def forward_seconds(net: Denoiser, batch: int, iters: int) -> float:
    """Median time of one no-grad forward at this batch, as the sampler calls it."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise, labels = seeded_noise(list(range(batch)), shape, net.num_classes, "cpu")
    noise = noise.contiguous(memory_format=torch.channels_last)  # the sampler's NHWC layout
    sigma = torch.full((batch,), 1.0)
    with torch.no_grad():
        return median_seconds(lambda: net(noise, sigma, labels), warmup=1, iters=iters)


# --- a distill step (DMD and DMD2) -------------------------------------------------------------

LOSS_KEYS = ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")  # distill.run's teacher_loss


DMD2_SETTINGS = {"method": "dmd2", "lambda_reg": 0.0, "fake_updates_per_gen": 5}  # DMD2's rule (docs/stages.md)


def distill_args(preset: str, root: str, method: str = "dmd") -> DistillArgs:
    cfg = C.load_config(preset)
    distill = dataclasses.replace(cfg.distill, **DMD2_SETTINGS) if method == "dmd2" else cfg.distill
    teacher = teacher_artifact(root, preset_network(preset))
    return DistillArgs(distill, {k: getattr(cfg.teacher, k) for k in LOSS_KEYS}, teacher, "network.safetensors",
                       "", [], [], RgbEncoder().info(), None, store.Artifact(f"{root}/distill"), 0)


def pair_batches(net: Denoiser, reg_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(noise, target, labels) as the pairs reader yields them: float16 arrays, int64 labels."""
    shape = (reg_batch, net.img_channels, net.img_resolution, net.img_resolution)
    batch = (torch.randn(shape).half(), (0.5 * torch.randn(shape)).half(), torch.randint(net.num_classes, (reg_batch,)))
    return itertools.repeat(batch)


def backward(fn: Callable[[], torch.Tensor], *nets: torch.nn.Module) -> None:
    for net in nets:
        net.zero_grad(set_to_none=True)
    fn().backward()


def step_rows(title: str, step: Callable[[], Any], passes: list[Pass], iters: int, target: str) -> list[Row]:
    """A step's ms (row `title`) against each of its passes timed alone, in `iters` interleaved rounds."""
    times = round_seconds([step, *(fn for _, _, fn in passes)], warmup=1, iters=iters)  # [iters, 1 + passes]
    times[:, 1:] *= np.array([count for _, count, _ in passes])  # each pass as often as a step makes it
    seconds, parts = np.median(times, axis=0)[0], np.median(times, axis=0)[1:]
    ratio = np.median(times[:, 0] / times[:, 1:].sum(axis=1))  # per round: both under the same load
    return [(title, f"{1e3 * seconds:.0f}", ""),
            *((f"  {name}, ms", f"{1e3 * t:.0f}", "") for (name, _, _), t in zip(passes, parts)),
            ("sum of the passes, ms", f"{1e3 * parts.sum():.0f}", ""),
            (f"step / sum of its passes, median of {iters} interleaved rounds", f"{ratio:.2f}", target)]

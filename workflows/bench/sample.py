"""The Heun sampler's overhead over its network calls, evaluate images/s with 1 and 2 Ray workers,
and phema's peak memory.

    python workflows/bench.py sample
    python workflows/bench.py sample --steps 2 --batch 4 --eval-steps 1 --eval-images 4 --eval-per-task 2 \
        --phema-snapshots 2 --phema-targets 1   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from functools import partial

import numpy as np
import torch

from pipeline import store
from pipeline.data.encoders import RgbEncoder
from pipeline.diffusion.phema import reconstruct, solve_coefficients
from pipeline.evaluation import EvalJob, Model, evaluate_range
from pipeline.executor import RayExecutor, init_ray
from pipeline.models.edm2 import Denoiser, build_denoiser
from pipeline.sampling import Generator
from pipeline.weights import read_weights, weights_bytes

from .common import Row, forward_seconds, preset_network, reset_peak_rss, rss_bytes, table, teacher_artifact


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=16, help="Heun steps of the timed sampler run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=8, help="Heun steps in the evaluate tasks")
    p.add_argument("--eval-images", type=int, default=32)
    p.add_argument("--eval-per-task", type=int, default=16)
    p.add_argument("--phema-preset", default="XS", help="network whose snapshots phema combines (64x64x4)")
    p.add_argument("--phema-snapshots", type=int, default=16)
    p.add_argument("--phema-targets", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process timings")


class _TimedDenoiser:
    """A denoiser that adds up the wall time spent inside the network and counts its calls."""

    def __init__(self, net: Denoiser) -> None:
        self.net, self.seconds, self.calls = net, 0.0, 0
        self.img_channels, self.img_resolution, self.num_classes = net.img_channels, net.img_resolution, net.num_classes

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x, sigma, labels)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _sampler_rows(steps: int, batch: int, threads: int) -> list[Row]:
    net = preset_network("demo").eval()
    forward = forward_seconds(net, batch, iters=5)
    timed = _TimedDenoiser(net)
    gen = Generator.teacher(timed, steps)
    start = time.perf_counter()
    gen(list(range(batch)))
    sampler = time.perf_counter() - start
    nfe = gen.nfe
    assert timed.calls == nfe, timed.calls
    return [(f"Heun sampler ms/image (seeded noise included), demo net 32x32x3, {steps} steps, batch {batch} "
             f"(CPU, {threads} thr)",
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


def _eval_rows(root: str, steps: int, images: int, per_task: int, batch: int) -> list[Row]:
    teacher = teacher_artifact(root, preset_network("demo"))
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
    """[snapshots, targets] weights as phema solves them: snapshots at 2 sigma_rels per time."""
    nimg = [(i // 2 + 1) << 20 for i in range(num_snapshots)]
    sigma_rels = [float(s) for s in np.linspace(0.03, 0.2, num_targets)]
    return solve_coefficients(nimg, [(0.05, 0.10)[i % 2] for i in range(num_snapshots)], [nimg[-1]] * num_targets,
                              sigma_rels)


def _phema_rows(root: str, preset: str, num_snapshots: int, num_targets: int) -> list[Row]:
    state = {k: v.float() for k, v in build_denoiser(preset, 64, 4, 1000).state_dict().items()}
    model_bytes = sum(v.numel() * 4 for v in state.values())
    urls = _write_snapshots(state, num_snapshots, root)
    weights = _phema_coefficients(num_snapshots, num_targets)
    del state
    before = reset_peak_rss()
    start = time.perf_counter()
    outs = reconstruct((read_weights(url) for url in urls), weights)
    seconds = time.perf_counter() - start
    growth = rss_bytes("VmHWM") - before
    assert len(outs) == num_targets
    bound = model_bytes * (num_targets + 1)
    what = f"{num_targets} targets from {num_snapshots} snapshots, {preset} 64x64x4 ({model_bytes / 4e6:.1f}M floats)"
    return [(f"phema reconstruct s, {what}, read from local files", f"{seconds:.1f}", ""),
            ("phema peak RSS growth, GB", f"{growth / 1e9:.2f}", ""),
            ("model size x (targets + 1), GB", f"{bound / 1e9:.2f}", ""),
            ("peak RSS growth / (model size x (targets + 1))", f"{growth / bound:.2f}", "~1 (phema.py docstring)")]


def run(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    rows = _sampler_rows(a.steps, a.batch, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows += _eval_rows(f"{tmp}/eval", a.eval_steps, a.eval_images, a.eval_per_task, a.batch)
    with tempfile.TemporaryDirectory() as tmp:
        rows += _phema_rows(tmp, a.phema_preset, a.phema_snapshots, a.phema_targets)
    table(rows)

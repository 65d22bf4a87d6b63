"""The first GPU run in one command (under 8 minutes on one H100): the gpu-marked tests, XS and S
training images/s and fraction of peak in bf16 (eager and compiled), the sampler's images/s and pairs/s.

    python workflows/bench.py gpu   # on a machine with a CUDA GPU; elsewhere it says so and exits
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from pipeline.models.edm2 import build_denoiser
from pipeline.sampling import Generator

from .common import Row, median_seconds, table
from .train import gpu_rows

REPO = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-batch", type=int, default=64, help="images per GPU pass for XS and S")
    p.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (989: H100 SXM)")
    p.add_argument("--sample-batch", type=int, default=256)


def _gpu_sampler_rows(batch: int, device: str = "cuda", preset: str = "XS") -> list[Row]:
    """The Heun sampler on an XS 64x64x4 network, seeded noise included: images/s at evaluate's 32 steps,
    pairs/s at DMD's 256."""
    net = build_denoiser(preset, 64, 4, 1000).to(device).eval()
    rows = []
    for steps, what in ((32, "evaluate: images/s"), (256, "pairs: pairs/s")):
        gen = Generator.teacher(net, steps)
        seconds = median_seconds(partial(gen, list(range(batch)), None, device), warmup=1, iters=3)
        rows.append((f"Heun sampler, {preset} 64x64x4 fp32, {steps} steps, batch {batch}: {what}",
                     f"{batch / seconds:,.1f}", ""))
    return rows


def run(a: argparse.Namespace) -> None:
    """The gpu-marked tests (bf16 against fp32, the ci DAG with every GPU setting over NCCL), then the
    training and sampler rows."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "`bench.py train` and `bench.py pairs` measure the CPU")
    start = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"], cwd=REPO)
    rows = [("gpu-marked tests (bf16 vs fp32, the ci DAG on the GPU over NCCL)",
             "passed" if tests.returncode == 0 else f"FAILED (exit {tests.returncode}, output above)", "passed"),
            ("their wall time s", f"{time.perf_counter() - start:.0f}", "")]
    rows += gpu_rows(a.gpu_batch, a.peak_tflops, compile_too=True)
    rows += _gpu_sampler_rows(a.sample_batch)
    rows.append(("GPU " + torch.cuda.get_device_name(), f"{time.perf_counter() - start:.0f} s in all", "<= 480 s"))
    table(rows)

"""The training loop's pieces (pipeline/trainer.py): checkpoint files, metrics rows, the divergence guard,
mixed precision.

No Ray here: a loop gets a `TrainSession` from the executor; storage goes through `store`.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from pipeline import store
from pipeline.tracking import LiveLog, StageRun

STATE_FILE = "state.pt"
STATE_CHECKSUM = "state.xxh3"


def zero_nonfinite_grads_(params: Iterable[torch.nn.Parameter]) -> bool:
    """Replace NaN/inf gradient entries by 0 in place (EDM2); True when all were finite."""
    grads = [p.grad for p in params if p.grad is not None]
    finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True  # one pass
    if not finite:
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return finite


class Diverged(ValueError):
    """A training run stopped by its divergence guard (the message names the step, the loss and the fix)."""


class DivergenceGuard:
    """Stops a run whose loss has left the range it started in, before anything is checkpointed or
    committed from it: `patience` non-finite steps in a row, or a logged loss above `max_ratio` x
    max(|its value at the first step|, 1) for `patience` log intervals in a row.

    The reference is the untrained network's loss, not a median of early log rows: a learning rate
    far too high (teacher.lr=1e6) has its very first row at 3e14, so no early row is healthy. Every
    value it sees is already reduced over the workers, so every rank decides the same.
    """

    def __init__(self, stage: str, max_ratio: float, patience: int, fix: str) -> None:
        self.stage, self.max_ratio, self.patience, self.fix = stage, max_ratio, patience, fix
        self.reference: dict[str, float] = {}
        self.bad_steps = 0
        self.bad_rows: dict[str, int] = {}

    def start(self, **losses: float) -> None:
        """The first step's losses (across workers): the scale each logged loss is held to."""
        for name, value in losses.items():
            self.reference.setdefault(name, abs(value) if math.isfinite(value) else 1.0)

    def step(self, finite: bool, nimg: int) -> None:
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if self.bad_steps >= self.patience:
            raise Diverged(f"{self.stage} diverged at {nimg} images: the loss or its gradients were not finite "
                           f"for {self.bad_steps} steps in a row. {self.fix}")

    def row(self, row: dict[str, Any]) -> None:
        for name, ref in self.reference.items():
            value, limit = float(row[name]), self.max_ratio * max(ref, 1.0)
            bad = not math.isfinite(value) or value > limit
            self.bad_rows[name] = self.bad_rows.get(name, 0) + 1 if bad else 0
            if self.bad_rows[name] >= self.patience:
                raise Diverged(f"{self.stage} diverged at {row['nimg']} images: {name} = {value:.4g}, above "
                               f"{self.max_ratio:g} x its starting value {ref:.4g}, for {self.bad_rows[name]} log "
                               f"intervals in a row. {self.fix}")

    def suspect(self) -> bool:
        """A logged loss is out of range: the state now is not one to checkpoint. (A non-finite step is
        not: its gradients were zeroed, so it changed nothing.)"""
        return any(self.bad_rows.values())


def check_diverged(metrics: dict[str, Any], stage: str) -> None:
    """In the driver, after training: a run its guard stopped is an error, and nothing is committed."""
    if metrics.get("diverged"):
        raise Diverged(f"{metrics['diverged']} The last good checkpoint is kept; the {stage} artifact is not "
                       "committed, so nothing downstream uses this run.")


def save_state(directory: str, state: dict[str, Any]) -> str:
    """Training state (tensors, numbers, nested dicts) as one file, loadable with weights_only, and its
    checksum beside it (torch's archive does not check the bytes of a tensor)."""
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(os.path.join(directory, STATE_FILE), "wb") as f:
        f.write(buffer.getvalue())
    with open(os.path.join(directory, STATE_CHECKSUM), "w") as f:
        f.write(store.xxh3(buffer.getvalue()))
    return directory


def load_state(directory: str) -> dict[str, Any]:
    """A checkpoint's state; a damaged file is an error naming it and the fix."""
    path = os.path.join(directory, STATE_FILE)

    def damaged(reason: str) -> store.ChecksumMismatch:
        return store.ChecksumMismatch(f"checkpoint {path} {reason}: it is damaged; delete its folder to resume from "
                                      "the checkpoint before it, or rerun with --force STAGE for a fresh start")

    with open(path, "rb") as f:
        data = f.read()
    try:
        with open(os.path.join(directory, STATE_CHECKSUM)) as f:
            expected = f.read().strip()
    except FileNotFoundError:  # a checkpoint from before onestep wrote checksums: torch's own checks only
        expected = None
    if expected is not None and store.xxh3(data) != expected:
        raise damaged(f"does not match its checksum ({len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
        raise damaged(f"cannot be read ({type(e).__name__}: {e})") from e


CPU_BF16 = "ONESTEP_CPU_BF16"  # 1 or 0: bf16 autocast on CPUs or not; unset: where the CPU has AMX


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware tiles (Intel AMX, Sapphire Rapids and later): there
    oneDNN's bf16 convolutions run 1.4-1.7x fp32's (the demo teacher's forward+backward); elsewhere bf16 is
    emulated and slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def bf16_enabled(device: torch.device) -> bool:
    """bf16 autocast: always on GPUs; on CPUs as $ONESTEP_CPU_BF16 says (1 or 0), else where the CPU has AMX."""
    if device.type == "cuda":
        return True
    asked = os.environ.get(CPU_BF16, "")
    if asked not in ("", "0", "1"):
        raise ValueError(f"${CPU_BF16}={asked!r}: set it to 1 (bf16 on the CPU), 0 (fp32), or unset it (auto)")
    return asked == "1" if asked else cpu_has_bf16_units()


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast where `bf16_enabled`: bf16 matmuls and convolutions, fp32 weights and losses."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16_enabled(device))


class MetricsLog:
    """Rows of metrics: printed as a progress line on rank 0, written as JSONL pieces per chunk, and, given
    the stage's `tracking.StageRun`, sent live from rank 0 to its trackers (pipeline/tracking.py)."""

    def __init__(self, name: str, total_nimg: int, rank: int, tracking: StageRun | None = None) -> None:
        self.name, self.total, self.rank = name, total_nimg, rank
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.live = LiveLog(tracking) if tracking is not None and rank == 0 else None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.rank == 0:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.items() if not isinstance(v, dict))
            # not print(): Ray Train patches it to log as well as write, which shows every line twice
            sys.stdout.write(f"{self.name} {100 * row['nimg'] / self.total:5.1f}% {shown}\n")
            sys.stdout.flush()
        if self.live is not None:
            self.live.add(row)

    @property
    def wants_images(self) -> bool:
        """Whether a tracker takes images here (rank 0 with a backend): making one is wasted work otherwise."""
        return self.live is not None

    def image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        """A uint8 [H, W, 3] image (e.g. a validation grid) to the trackers, at `nimg` images seen."""
        if self.live is not None:
            self.live.image(tag, image, nimg)

    def flush(self, artifact: store.Artifact, chunk_start: int) -> None:
        """Rank 0 writes this chunk's rows as `metrics/{chunk_start}.jsonl` (and its TensorBoard event file)."""
        if self.rank == 0 and self.rows:
            with artifact.open(f"metrics/{chunk_start:012d}.jsonl", "wb") as f:
                f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows).encode())
        if self.live is not None:
            self.live.flush(artifact, chunk_start)
        self.rows = []

    def close(self) -> None:
        """The trackers' runs of this worker end with its training, however it ends: the last step, an early
        stop, a divergence, an error."""
        if self.live is not None:
            self.live.close()


def gather_metrics(artifact: store.Artifact) -> list[dict[str, Any]]:
    """Every metrics row of the run so far, in order, and `metrics.jsonl` written from them."""
    folder = artifact.path("metrics")
    files = store.list_dir(folder)[1] if store.exists(folder) else []
    rows = [json.loads(line) for url in files for line in store.read_bytes(url).decode().splitlines()]
    with artifact.open("metrics.jsonl", "wb") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return rows

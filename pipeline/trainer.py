"""The one training loop: the teacher (pipeline/teacher.py) and distillation (pipeline/distill/) both run it.

    train(session, trainee, loop)              # on every DDP worker, from the executor's ctx.ddp
    train(session, trainee, loop, validation)  # scoring trainee.generator() where due (distill)

Time is counted in images seen by all workers together (nimg), as EDM2's training loop counts it.
Training runs in chunks between checkpoints: each chunk's data stream and each step's random draws
are seeded from (seed, rank, nimg), so a run resumed from its last checkpoint goes on exactly as if
it had not stopped. The loop owns everything but the model: chunks, checkpoints (`session.report`),
resume (`session.restore`), the metrics rows (progress lines, `metrics/*.jsonl`, the trackers), the
divergence guard, validation where due with keep-best and early stop (`Watch`), and the end: the
trainee's save on rank 0, the trackers' runs closed on every ending. What it trains, a `Trainee`,
owns its networks, optimisers, data streams and losses.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch

from pipeline.executor import TrainSession
from pipeline.metrics.validation import Validation, Watch
from pipeline.sampling import Generator
from pipeline.seeds import mix_seed
from pipeline.store import Artifact
from pipeline.tracking import StageRun
from pipeline.training import DivergenceGuard, Diverged, MetricsLog, load_state, save_state

VALIDATION_FILE = "validation.json"  # the validation curve, the one kept, and why a run stopped early

Step = dict[str, Any]  # what a trainee's step returns; its "nonfinite_steps" is 1.0 when its gradients were not finite


class Trainee(Protocol):
    """What the loop trains. Built on a worker (networks on its device, wrapped for DDP); the loop
    restores it, then steps it."""

    def state(self) -> dict[str, Any]: ...  # its part of a checkpoint (called on rank 0)

    def load(self, state: dict[str, Any]) -> None: ...  # from a checkpoint's state

    def begin_chunk(self, seed: int, steps: int) -> None: ...  # this chunk's data streams, seeded, `steps` long

    def step(self, nimg: int) -> Step: ...  # one optimiser step from `nimg` images seen

    def after_step(self, nimg: int) -> None: ...  # after the step that reached `nimg`: EMAs, snapshots

    def guard_losses(self, step: Step) -> dict[str, float]: ...  # the first step's losses over the workers

    def reduce(self, steps: list[Step], nimg: int, img_per_s: float) -> dict[str, Any]: ...  # a metrics row

    def save(self, weights: dict[str, torch.Tensor] | None) -> None: ...  # rank 0, at the end: the kept weights


class Validated(Trainee, Protocol):
    def generator(self) -> Generator: ...  # what validation samples and keep-best keeps the weights of


@dataclass(frozen=True)
class Loop:
    """What the loop needs besides its trainee (picklable): where it writes, its schedule in images (all
    workers together), its divergence guard, and what it does with validations."""

    name: str  # the stage: progress lines and messages
    artifact: Artifact
    seed: int
    batch: int  # images per step
    duration_nimg: int
    checkpoint_nimg: int
    log_nimg: int
    divergence_ratio: float
    divergence_patience: int
    divergence_fix: str  # what a divergence message tells the user to change
    tracking: StageRun | None = None  # the stage's tracker runs, for rank 0's MetricsLog
    keep: str = ""  # best | last: validations are recorded (VALIDATION_FILE) and choose the weights saved; "": none
    val_every_nimg: int = 0  # validations at the start, every this many images and at the end (0: none)
    early_stop_ratio: float = 2.0  # keep: best stops a collapse (Watch)
    early_stop_patience: int = 0


def train(session: TrainSession, trainee: Trainee, loop: Loop, validation: Validation | None = None) -> None:
    """Runs on every DDP worker: chunks of steps until `loop.duration_nimg`, an early stop or a divergence;
    then rank 0 saves. A divergence is reported as the run's last metrics (`check_diverged` raises it in the
    driver), not raised: every rank reaches the same verdict, and Ray Train would restart a failed worker
    from the last checkpoint only to diverge again. With a validated best kept, the run stops there and
    saves that instead."""
    watch = Watch(loop.keep == "best", loop.early_stop_ratio, loop.early_stop_patience) if loop.keep else None
    nimg = session.restore(partial(_load, trainee, watch)) or 0
    log = MetricsLog(loop.name, loop.duration_nimg, session.rank, loop.tracking)
    try:
        if validation is not None and nimg == 0:  # the starting point of the curve
            log.add({"nimg": 0, **_validate(session, trainee, loop, validation, watch, log, 0)})
        guard = DivergenceGuard(loop.name, loop.divergence_ratio, loop.divergence_patience, loop.divergence_fix)
        while nimg < loop.duration_nimg and not (watch is not None and watch.stopped):
            try:
                nimg = _chunk(session, trainee, loop, validation, watch, log, guard, nimg)
            except Diverged as e:
                if watch is None or watch.best_weights is None:
                    session.report({"nimg": nimg, "diverged": str(e)}, None)  # every rank: the same verdict
                    return
                log.flush(loop.artifact, nimg)  # the rows up to the divergence, for the curves
                watch.stopped = f"the divergence guard stopped it ({e})"
        if session.rank == 0:
            _save(trainee, loop, watch)
    finally:
        log.close()


def _chunk(session: TrainSession, trainee: Trainee, loop: Loop, validation: Validation | None,
           watch: Watch | None, log: MetricsLog, guard: DivergenceGuard, nimg: int) -> int:
    """Steps from `nimg` to the next checkpoint (or the end, or an early stop), a metrics row every
    `log_nimg` with a validation where due, then the checkpoint; returns the images seen."""
    chunk_start = nimg
    chunk_end = min((nimg // loop.checkpoint_nimg + 1) * loop.checkpoint_nimg, loop.duration_nimg)
    trainee.begin_chunk(mix_seed(loop.seed, session.rank, nimg), (chunk_end - nimg) // loop.batch)
    steps: list[Step] = []
    tick = time.perf_counter()
    while nimg < chunk_end:
        torch.manual_seed(mix_seed(loop.seed, session.rank, nimg))  # noise, sigma, labels, dropout, VAE sampling
        steps.append(trainee.step(nimg))
        if not guard.reference:  # this process's first step: the scale the guard holds losses to
            guard.start(**trainee.guard_losses(steps[-1]))
        nimg += loop.batch
        guard.step(not steps[-1]["nonfinite_steps"], nimg)
        trainee.after_step(nimg)
        if nimg % loop.log_nimg == 0 or nimg == chunk_end:
            row = trainee.reduce(steps, nimg, len(steps) * loop.batch / (time.perf_counter() - tick))
            if validation is not None and _validation_due(loop, nimg):
                row.update(_validate(session, trainee, loop, validation, watch, log, nimg))
            log.add(row)
            guard.row(row)
            steps, tick = [], time.perf_counter()
            if watch is not None and watch.stopped:
                break
    log.flush(loop.artifact, chunk_start)
    if guard.suspect():
        raise Diverged(f"{loop.name} diverged at {nimg} images: a loss was out of range at this checkpoint (see "
                       f"metrics.jsonl), so it was not saved. {guard.fix}")
    _checkpoint(session, trainee, watch, nimg)
    return nimg


def _validation_due(loop: Loop, nimg: int) -> bool:
    return bool(loop.val_every_nimg) and (nimg % loop.val_every_nimg == 0 or nimg == loop.duration_nimg)


def _validate(session: TrainSession, trainee: Validated, loop: Loop, validation: Validation, watch: Watch,
              log: MetricsLog, nimg: int) -> dict[str, float]:
    """Score the trainee's generator on the validation seeds and record it in `watch`: the row's figures
    (and a grid of samples to the trackers). Every rank reports them: a sweep's scheduler (Ray Tune) reads
    them. On a collapse, rank 0 says so in one line."""
    start = time.perf_counter()
    generator = trainee.generator()
    generator.net.eval()  # sampling in eval mode: no in-place renormalisation of the training weights
    try:
        figures = validation.score(generator, session.all_reduce, session.device)
        if log.wants_images:
            log.image("validation/samples", validation.grid(generator, session.device), nimg)
    finally:
        generator.net.train()
    watch.add(nimg, figures, generator.net.state_dict)
    row = {f"val_{k}": float(v) for k, v in figures.items() if v is not None and k != "count"}
    row["val_seconds"] = time.perf_counter() - start  # validation's cost, beside the steps' img_per_s
    session.report({"nimg": nimg, **row}, None)
    if watch.stopped and session.rank == 0:
        sys.stdout.write(f"{loop.name}: stopping early at {nimg} images: {watch.stopped}; keeping the one of "
                         f"{watch.best['nimg']} images\n")
    return row


def _checkpoint(session: TrainSession, trainee: Trainee, watch: Watch | None, nimg: int) -> None:
    """Every rank reports; rank 0 attaches the state: the trainee's, the validations' and the images seen."""
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if session.rank == 0:
            recorded = {"watch": watch.state()} if watch is not None else {}
            path = save_state(tmp, {**trainee.state(), **recorded, "nimg": nimg})
        session.report({"nimg": nimg}, path)


def _load(trainee: Trainee, watch: Watch | None, path: str) -> int:
    state = load_state(path)
    trainee.load(state)
    if watch is not None:
        watch.load(state["watch"])
    return int(state["nimg"])


def _save(trainee: Trainee, loop: Loop, watch: Watch | None) -> None:
    """The trainee's weights (keep: best, the best validation's) and the validation record."""
    trainee.save(watch.best_weights if watch is not None else None)
    if watch is not None:
        loop.artifact.write_json(VALIDATION_FILE, {"curve": watch.curve, "kept": watch.kept, "stopped": watch.stopped})

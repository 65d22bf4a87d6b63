"""Executors: how a stage's work runs. The only library module that imports ray.

`map(fn, items, resources)`: `RayExecutor` runs each call as a Ray task (per-task CPUs/GPUs,
bounded in flight, retried when a worker dies) on the cluster named by RAY_ADDRESS (as under
`ray job submit`) or on a local instance bound to 127.0.0.1. `InlineExecutor` runs the same
calls in-process, for debugging (`--set executor=inline`) and for `memory://` storage.

`ddp(train_fn, args, job)`: runs `train_fn(session, args)` on every training worker. Under
Ray it is a Ray Train `TorchTrainer` (gloo on CPUs, NCCL on GPUs) whose checkpoints live in
the artifact, with `FailureConfig` so a lost worker resumes from the last checkpoint; inline
it is one worker in this process. The `TrainSession` is all a training loop sees of either.

`trials(fn, items, schedule)`: a sweep's trials, `fn(item, executor)` each. Under Ray they run in
parallel as Ray Tune trials, whose training jobs report to Tune, and ASHA stops the trials whose
reported metric falls behind; inline they run one after another, each to its end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tqdm.auto import tqdm

from pipeline import store

if TYPE_CHECKING:  # torch loads only where training runs: `onestep status` stays fast
    import torch

T = TypeVar("T")

log = logging.getLogger("onestep")


@dataclass(frozen=True)
class Resources:
    """What one task asks of the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    spread: bool = False  # spread tasks over nodes rather than packing them


@dataclass(frozen=True)
class TrialSchedule:
    """How a sweep's trials run: the metric their training reports (validation), ASHA's early stopping on
    it after `grace_t` (0: none, every trial runs to its end), and what one trial's training job asks for."""

    metric: str = "val_fd_probe"
    mode: str = "min"
    time_attr: str = "nimg"  # the reports' clock
    max_t: int = 1  # a trial's length on that clock
    grace_t: int = 0
    workers: int = 1  # DDP workers of one trial
    use_gpu: bool = False
    concurrency: int = 0  # trials at once; 0: as many as the cluster holds


@dataclass
class TrialOutcome:
    """One trial: `fn`'s result (done), or the reports it made before ASHA stopped it, or its error."""

    status: str  # done | stopped | failed
    result: Any = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class DDPJob:
    """A distributed training run: where its checkpoints live and what it asks of the cluster."""

    name: str  # the stage, e.g. "teacher"
    checkpoint_url: str  # a folder inside the stage's artifact
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 2


class TrainSession(Protocol):
    """What a training loop sees of the executor that runs it."""

    rank: int
    world_size: int
    device: torch.device

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module: ...  # DDP when distributed

    def restore(self, load: Callable[[str], T]) -> T | None: ...  # load(dir) of the latest checkpoint

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...  # every rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...  # sum over ranks, in place


class Executor(Protocol):
    def num_nodes(self) -> int: ...  # machines the tasks may run on

    def check(self, resources: Resources, what: str) -> None: ...  # per map task

    def check_ddp(self, job: DDPJob) -> None: ...  # the whole training job

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]: ...

    def ddp(self, train_fn: Callable[[TrainSession, Any], Any], args: Any, job: DDPJob) -> dict[str, Any]: ...

    def trials(self, fn: Callable[[Any, Executor], Any], items: Sequence[Any],
               schedule: TrialSchedule) -> list[TrialOutcome]: ...


def _gpu_error(what: str, wanted: float, have: float) -> ValueError:
    return ValueError(f"{what} asks for {wanted:g} GPU(s) per task but only {have:g} are available: "
                      f"set {what}.num_gpus=0 to run on CPUs, or run on a cluster with GPUs")


def _check_ddp(job: DDPJob, cpus: float, gpus: float) -> None:
    if job.use_gpu and gpus < job.num_workers:
        raise ValueError(f"{job.name}.use_gpu with {job.num_workers} worker(s) needs {job.num_workers} GPU(s), "
                         f"the cluster has {gpus:g}: set {job.name}.use_gpu=false, lower "
                         f"{job.name}.num_workers, or run on a cluster with GPUs")
    if cpus < job.num_workers:
        raise ValueError(f"{job.name}.num_workers={job.num_workers} needs {job.num_workers} CPUs, the "
                         f"cluster has {cpus:g}: lower {job.name}.num_workers")


class InlineExecutor:
    """Runs every call in this process, in order."""

    def num_nodes(self) -> int:
        return 1

    def check(self, resources: Resources, what: str) -> None:
        import torch

        have = torch.cuda.device_count()
        if resources.num_gpus > have:
            raise _gpu_error(what, resources.num_gpus, have)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not items)]

    def check_ddp(self, job: DDPJob) -> None:
        if job.num_workers != 1:
            raise ValueError(f"executor=inline runs one training worker: set {job.name}.num_workers=1, "
                             "or use the ray executor")
        import torch

        _check_ddp(job, float(os.cpu_count() or 1), float(torch.cuda.device_count()))

    def ddp(self, train_fn: Callable[[TrainSession, Any], Any], args: Any, job: DDPJob) -> dict[str, Any]:
        self.check_ddp(job)
        session = InlineSession(job)
        train_fn(session, args)
        return session.last_metrics

    def trials(self, fn: Callable[[Any, Executor], Any], items: Sequence[Any],
               schedule: TrialSchedule) -> list[TrialOutcome]:
        """One after another, each to its end (no early stopping inline); a trial's error is its outcome."""
        outcomes = []
        for item in items:
            try:
                outcomes.append(TrialOutcome("done", fn(item, self)))
            except ValueError as e:
                outcomes.append(TrialOutcome("failed", error=str(e)))
        return outcomes


class InlineSession:
    """One training worker in this process; checkpoints are folders `ckpt-NNNNNN` in the artifact,
    each complete once its `_done` marker (written last) exists."""

    rank, world_size = 0, 1

    def __init__(self, job: DDPJob) -> None:
        import torch

        self.url = job.checkpoint_url
        self.device = torch.device("cuda" if job.use_gpu else "cpu")
        self.last_metrics: dict[str, Any] = {}

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        return net

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _checkpoints(self) -> list[str]:
        if not store.exists(self.url):
            return []
        dirs, _ = store.list_dir(self.url)
        return [d for d in dirs if store.exists(store.join(d, "_done"))]

    def restore(self, load: Callable[[str], T]) -> T | None:
        done = self._checkpoints()
        if not done:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return load(store.copy_to_local(done[-1], tmp))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.last_metrics = metrics
        if checkpoint_dir is None:
            return
        target = store.join(self.url, f"ckpt-{len(self._checkpoints()):06d}")
        for name in sorted(os.listdir(checkpoint_dir)):
            with open(os.path.join(checkpoint_dir, name), "rb") as f:
                store.write_bytes(store.join(target, name), f.read())
        store.write_bytes(store.join(target, "_done"), b"")


def init_ray() -> None:
    """Attach to RAY_ADDRESS if set (ray job submit), else start a local instance on loopback."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # read when ray is imported, and inherited by every worker it starts
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node IP (and gloo's) = 127.0.0.1
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        host, _, port = address.rpartition(":")
        try:
            if "://" not in address and port.isdigit():  # ray.init retries an unreachable GCS for minutes
                socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:  # refused, unknown host, or a timeout while reaching the GCS
            raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address!r}: {e}. "
                             "Unset RAY_ADDRESS to start a local instance, or fix the address.") from e
        return
    # the dashboard (None: started where ray[default] is installed) serves the state API, which Ray
    # Train's placement-group cleaner polls, warning every few seconds without it; on loopback,
    # on 8265 or the next free port
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=None, logging_level=logging.WARNING)


def _node_resources() -> list[dict[str, float]]:
    """The total resources of each live node of the Ray cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor:
    """Runs each call as a Ray task; results come back in the order of `items`. Inside a sweep's trial,
    `trials_at_once` training jobs share the cluster's CPUs, and training reports go to Ray Tune."""

    def __init__(self, max_in_flight: int = 64, max_retries: int = 3, trials_at_once: int = 1,
                 report_to_tune: bool = False) -> None:
        init_ray()
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.trials_at_once, self.report_to_tune = trials_at_once, report_to_tune

    def num_nodes(self) -> int:
        import ray

        return sum(node["Alive"] for node in ray.nodes())

    def check(self, resources: Resources, what: str) -> None:
        """A task runs on one node: some node must have its CPUs and GPUs."""
        nodes = _node_resources()
        gpus, cpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0), max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        if resources.num_gpus > gpus:
            raise _gpu_error(what, resources.num_gpus, gpus)
        if not any(n.get("GPU", 0.0) >= resources.num_gpus and n.get("CPU", 0.0) >= resources.num_cpus for n in nodes):
            raise ValueError(f"{what} asks for {resources.num_cpus:g} CPUs (and {resources.num_gpus:g} GPUs) per task but "
                             f"no node has them (the largest has {cpus:g} CPUs): lower {what}.num_cpus")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]:
        import ray

        task = ray.remote(_apply).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                          max_retries=self.max_retries,
                                          scheduling_strategy="SPREAD" if resources.spread else "DEFAULT")
        fn_ref = ray.put(fn)  # shipped once, however many items
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        todo = iter(enumerate(items))
        with tqdm(total=len(items), desc=desc, disable=not items) as bar:
            try:
                while True:
                    for i, item in todo:
                        pending[task.remote(fn_ref, item)] = i
                        if len(pending) >= self.max_in_flight:
                            break
                    if not pending:
                        return results
                    [ready], _ = ray.wait(list(pending), num_returns=1)
                    results[pending.pop(ready)] = ray.get(ready)
                    bar.update(1)
            except BaseException as e:
                for ref in pending:
                    ray.cancel(ref)
                _raise_ours(e)
                raise

    def check_ddp(self, job: DDPJob) -> None:
        """Each worker takes one CPU (and one GPU with use_gpu) on some node: count the workers that fit."""
        nodes = _node_resources()
        fit = sum(int(min(n.get("CPU", 0.0), n.get("GPU", 0.0) if job.use_gpu else math.inf)) for n in nodes)
        if fit < job.num_workers:
            _check_ddp(job, sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes))
            raise ValueError(f"{job.name}.num_workers={job.num_workers} workers of 1 CPU{' + 1 GPU' if job.use_gpu else ''} "
                             f"each: only {fit} fit on the cluster's nodes: lower {job.name}.num_workers")

    def ddp(self, train_fn: Callable[[TrainSession, Any], Any], args: Any, job: DDPJob) -> dict[str, Any]:
        import ray

        self.check_ddp(job)
        cpus = ray.cluster_resources().get("CPU", 0.0)
        # CPU training: the workers share the cluster's cores (Ray sets each one's thread count).
        per_worker = 1.0 if job.use_gpu else float(max(1, int(cpus // (job.num_workers * self.trials_at_once))))
        return _ray_ddp(train_fn, args, job, per_worker, self.report_to_tune)

    def trials(self, fn: Callable[[Any, Executor], Any], items: Sequence[Any],
               schedule: TrialSchedule) -> list[TrialOutcome]:
        """Ray Tune trials, at most `concurrency` at once (default: as many training jobs as the cluster
        holds); with `grace_t`, ASHA stops a trial whose metric is in the worse half of those that reached
        the same time (rungs at grace_t, 2 grace_t, ...)."""
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        # Checkpoint reports and a trial's return carry no validation figure: ASHA passes over them, but Tune's
        # strict check would fail the trial for them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        at_once = min(len(items), schedule.concurrency or self._trials_that_fit(schedule))
        scheduler = ASHAScheduler(time_attr=schedule.time_attr, metric=schedule.metric, mode=schedule.mode,
                                  max_t=schedule.max_t, grace_period=schedule.grace_t, reduction_factor=2,
                                  stop_last_trials=False) if schedule.grace_t else FIFOScheduler()
        trainable = tune.with_parameters(_tune_trial, fn=fn, items=list(items), at_once=at_once,
                                         max_in_flight=self.max_in_flight)
        with tempfile.TemporaryDirectory() as tmp:
            # the trial's driver holds no CPU (Tune needs some resource: a byte of memory): the work is its job's
            tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0, "memory": 1}),
                               param_space={"index": tune.grid_search(list(range(len(items))))},
                               tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=at_once),
                               run_config=tune.RunConfig(storage_path=tmp, name="sweep", verbose=0))
            results = sorted(tuner.fit(), key=lambda r: r.config["index"])
        return [_outcome(r, schedule) for r in results]

    def _trials_that_fit(self, schedule: TrialSchedule) -> int:
        import ray

        total = ray.cluster_resources()
        have = total.get("GPU", 0.0) if schedule.use_gpu else total.get("CPU", 0.0)
        return max(1, int(have // schedule.workers))


class RaySession:
    """A Ray Train worker: rank and device from Ray Train, checkpoints through `ray.train.report`."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        import torch

        if self.world_size == 1:  # nothing to synchronise: DDP would only copy every gradient into its buckets
            return net
        if self.device.type == "cuda":
            return torch.nn.parallel.DistributedDataParallel(net, device_ids=[self.device.index])
        return torch.nn.parallel.DistributedDataParallel(net)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed

        torch.distributed.all_reduce(tensor)
        return tensor

    def restore(self, load: Callable[[str], T]) -> T | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            return load(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _ray_train_worker(config: dict[str, Any]) -> None:
    config["train_fn"](RaySession(), config["args"])


def _tune_trial(config: dict[str, Any], fn: Callable[[Any, Executor], Any], items: list[Any], at_once: int,
                max_in_flight: int) -> dict[str, Any]:
    """A Ray Tune trial: `fn` of its item, with an executor whose training jobs report to Tune."""
    executor = RayExecutor(max_in_flight, trials_at_once=at_once, report_to_tune=True)
    try:
        return {"trial_result": json.dumps(fn(items[config["index"]], executor))}
    except Exception as e:
        _raise_ours(e)
        raise


def _outcome(result: Any, schedule: TrialSchedule) -> TrialOutcome:
    """A Tune result as a TrialOutcome: done (its result), failed (onestep's one-line error), or stopped."""
    frame = result.metrics_dataframe
    columns = [c for c in (schedule.time_attr, schedule.metric) if frame is not None and c in frame]
    reports = [] if len(columns) < 2 else frame[columns].dropna().to_dict("records")
    if result.error is not None:
        found = _ours(result.error)
        return TrialOutcome("failed", reports=reports, error=str(found if found is not None else result.error))
    if "trial_result" in (result.metrics or {}):
        return TrialOutcome("done", json.loads(result.metrics["trial_result"]), reports)
    return TrialOutcome("stopped", reports=reports)


def _ray_ddp(train_fn: Callable[[TrainSession, Any], Any], args: Any, job: DDPJob,
             cpus_per_worker: float, report_to_tune: bool = False) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    filesystem, path = store.pyarrow_filesystem(job.checkpoint_url)
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={"train_fn": train_fn, "args": args},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=job.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=_tune_callbacks() if report_to_tune else None,
        ),
    )
    try:
        return dict(trainer.fit().metrics or {})
    except Exception as e:
        _raise_ours(e)
        raise


def _tune_callbacks() -> list[Any]:
    """Ray Train's reports (rank 0's) forwarded to the Ray Tune trial that runs the training job."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _ours(e: BaseException) -> ValueError | None:
    """The first of onestep's errors (a ValueError: bad input, a damaged file, a diverged run) in the
    chain of an error that Ray wrapped: a task's RayTaskError (`.cause`), Ray Train's WorkerGroupError
    (`.worker_failures`), their causes."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ValueError) and (type(seen) is ValueError or
                                             type(seen).__module__.startswith(("pipeline", "stages"))):
            return seen
        for worker in [f for _, f in sorted(getattr(seen, "worker_failures", {}).items())]:
            if (found := _ours(worker)) is not None:
                return found
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return None


def _raise_ours(e: BaseException) -> None:
    """Raise onestep's error inside `e` with its one-line message instead of Ray's remote traceback;
    return when there is none (or it is `e` itself)."""
    found = _ours(e)
    if found is not None and found is not e:
        raise type(found)(*found.args) from None


def make_executor(name: str, max_in_flight: int = 64) -> Executor:
    if name == "inline":
        return InlineExecutor()
    return RayExecutor(max_in_flight=max_in_flight)

"""Executors: how a stage's map-style work runs. The only library module that imports ray.

`RayExecutor` runs each call as a Ray task (per-task CPUs/GPUs, bounded in flight, retried
when a worker dies) on the cluster named by RAY_ADDRESS (as under `ray job submit`) or on a
local instance bound to 127.0.0.1. `InlineExecutor` runs the same calls in-process, for
debugging (`--set executor=inline`) and for `memory://` storage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

log = logging.getLogger("onestep")


@dataclass(frozen=True)
class Resources:
    """What one task asks of the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


class Executor(Protocol):
    def check(self, resources: Resources, what: str) -> None: ...

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]: ...


def _gpu_error(what: str, wanted: float, have: float) -> ValueError:
    return ValueError(f"{what} asks for {wanted:g} GPU(s) per task but only {have:g} are available: "
                      f"set {what}.num_gpus=0 to run on CPUs, or run on a cluster with GPUs")


class InlineExecutor:
    """Runs every call in this process, in order."""

    def check(self, resources: Resources, what: str) -> None:
        import torch

        have = torch.cuda.device_count()
        if resources.num_gpus > have:
            raise _gpu_error(what, resources.num_gpus, have)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not items)]


def init_ray() -> None:
    """Attach to RAY_ADDRESS if set (ray job submit), else start a local instance on loopback."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:  # ConnectionError, or a timeout while reaching the GCS
            raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address!r}: {e}. "
                             "Unset RAY_ADDRESS to start a local instance, or fix the address.") from e
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor:
    """Runs each call as a Ray task; results come back in the order of `items`."""

    def __init__(self, max_in_flight: int = 64, max_retries: int = 3) -> None:
        init_ray()
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries

    def check(self, resources: Resources, what: str) -> None:
        import ray

        total = ray.cluster_resources()
        if resources.num_gpus > total.get("GPU", 0.0):
            raise _gpu_error(what, resources.num_gpus, total.get("GPU", 0.0))
        if resources.num_cpus > total.get("CPU", 0.0):
            raise ValueError(f"{what} asks for {resources.num_cpus:g} CPUs per task but the cluster has "
                             f"{total.get('CPU', 0.0):g}: lower {what}.num_cpus")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            resources: Resources = Resources(), desc: str = "") -> list[Any]:
        import ray

        task = ray.remote(_apply).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                          max_retries=self.max_retries)
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
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise


def make_executor(name: str, max_in_flight: int = 64) -> Executor:
    if name == "inline":
        return InlineExecutor()
    return RayExecutor(max_in_flight=max_in_flight)

"""What a stage is, declared: the one record the DAG, the CLI, `onestep runs` and the trackers read.

A declaration names the stage, its VERSION (bumped by hand when its results change for the same config),
its config section, its upstream stages, how it runs (Ray map tasks, a DDP training job, or in the
driver), what its outputs are, the figures a finished run is judged by, and its run function, as
`module:function`: the module (and torch with it) is imported only when the stage runs, so planning,
`onestep status` and `onestep runs` stay light. This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAP, DDP, DRIVER = "map", "ddp", "driver"  # Ray tasks over items; a Ray Train job; the driver itself


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    section: str  # its field of pipeline.config.Config
    upstream: tuple[str, ...]
    runs: str  # MAP: tasks of section.num_cpus (and num_gpus); DDP: section.num_workers, section.use_gpu
    run: str | Callable[..., Any]  # "module:function" (or the function), run(ctx, section, inputs) -> outputs
    outputs: type = dict  # the typed outputs (pipeline/outputs.py) its manifest holds
    headline: tuple[str, ...] = ()  # dotted paths into the outputs a finished run is judged by
    # {stage: (field, value)}: an upstream only when the section has field == value
    upstream_if: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    runs_if: tuple[str, Any] | None = None  # (field, value): `runs` only then, in the driver otherwise
    piecewise: bool = False  # its run makes only the pieces not yet committed (pipeline/integrity.py)

    def __post_init__(self) -> None:
        assert self.runs in (MAP, DDP, DRIVER), self.runs
        assert callable(self.run) or ":" in self.run, f"{self.name}: run must be 'module:function', got {self.run!r}"

    def config(self, cfg: Any) -> Any:
        return getattr(cfg, self.section)

    def inputs(self, cfg: Any) -> tuple[str, ...]:
        """The upstream stages this config reads (and whose keys are in this stage's key)."""
        section = self.config(cfg)
        return tuple(u for u in self.upstream
                     if u not in self.upstream_if or getattr(section, self.upstream_if[u][0]) == self.upstream_if[u][1])

    def execution(self, section: Any) -> str:
        """How it runs under this section: `runs`, or DRIVER where `runs_if` does not hold."""
        if self.runs_if is not None and getattr(section, self.runs_if[0]) != self.runs_if[1]:
            return DRIVER
        return self.runs

    def function(self) -> Callable[..., Any]:
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

"""The stage graph: cache keys, deciding what to run, and running it.

A stage's key is the first 16 hex digits of the sha256 of the canonical JSON of its name,
VERSION, result-affecting config fields, the run seed and its upstream keys; so a change
reruns that stage and everything downstream of it, nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any

from pipeline import config as C
from pipeline import lease, store, tracking
from pipeline.executor import DDPJob, Executor, Resources, TrainSession, make_executor
from pipeline.outputs import canonical
from pipeline.stage import DDP, MAP, Stage

log = logging.getLogger("onestep")


def graph() -> dict[str, Stage]:
    """The declared stages (stages/__init__.py) by name, in a topological order."""
    from stages import STAGES

    return {stage.name: stage for stage in STAGES}


def key_config(node: Stage, cfg: C.Config) -> dict[str, Any]:
    """The stage's result fields, with each content field's URL replaced by what it points to."""
    section = node.config(cfg)
    fields = C.result_fields(section)
    for name in C.content_fields(section):
        if fields[name]:
            try:
                fields[name] = {"content": store.Store(cfg.storage).content_id(fields[name])}
            except ValueError as e:
                raise ValueError(f"{node.section}.{name}: {e}: fix the URL, or leave it empty") from None
    return fields


def stage_key(node: Stage, cfg: C.Config, upstream_keys: dict[str, str]) -> str:
    payload = {
        "stage": node.name,
        "version": node.version,
        "config": key_config(node, cfg),
        "seed": cfg.seed,
        "upstream": upstream_keys,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_keys(nodes: dict[str, Stage], cfg: C.Config) -> dict[str, str]:
    keys: dict[str, str] = {}
    for node in nodes.values():
        keys[node.name] = stage_key(node, cfg, {u: keys[u] for u in node.inputs(cfg)})
    return keys


def closure(nodes: dict[str, Stage], start: set[str], downstream: bool, cfg: C.Config | None = None) -> set[str]:
    """`start` plus every stage upstream (or downstream) of it: of it under `cfg`, or under any config."""
    up = {n: set(nodes[n].inputs(cfg) if cfg else nodes[n].upstream) for n in nodes}
    edges = {n: {m for m in nodes if n in up[m]} for n in nodes} if downstream else up
    seen, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges[n])
    return seen


@dataclass
class Plan:
    keys: dict[str, str]
    states: dict[str, str]  # done | partial | missing (before forcing)
    selected: list[str]  # stages this invocation is about, in order
    to_run: list[str]  # of those, what will be computed
    forced: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'stage':<10} {'key':<16}  {'stored':<8} action"]
        for name in self.selected:
            action = ("force" if name in self.forced else "run") if name in self.to_run else "cached"
            lines.append(f"{name:<10} {self.keys[name]:<16}  {self.states[name]:<8} {action}")
        return "\n".join(lines)


def check_names(nodes: dict[str, Stage], names: list[str], flag: str) -> None:
    for name in names:
        if name not in nodes:
            raise ValueError(f"{flag} {name}: unknown stage; stages: {', '.join(nodes)}")


def make_plan(nodes: dict[str, Stage], cfg: C.Config, st: store.Store, only: list[str] = (),
              force: list[str] = (), until: str | None = None) -> Plan:
    check_names(nodes, [*only, *force, *([until] if until else [])], "--only/--force/--until")
    keys = cache_keys(nodes, cfg)
    states = {n: st.artifact(n, keys[n]).state() for n in nodes}
    if only:
        selected = set(only)
    elif until:
        selected = closure(nodes, {until}, downstream=False, cfg=cfg)
    else:
        selected = set(nodes)
    forced = closure(nodes, set(force), downstream=True, cfg=cfg) if force else set()
    order = [n for n in nodes if n in selected]
    to_run = [n for n in order if n in forced or states[n] != "done"]
    for n in to_run:
        for u in nodes[n].inputs(cfg):
            if u not in selected and states[u] != "done":
                raise ValueError(
                    f"stage {n} needs the {u} artifact (key {keys[u]}), which is not in storage "
                    f"{store.redact(st.root)}: run `onestep run --until {u}` (same config) first"
                )
    return Plan(keys, states, order, to_run, [n for n in order if n in forced])


@dataclass
class StageContext:
    """What a stage's `run(ctx, cfg, inputs)` gets: where to write, how to fan out, the run seed."""

    artifact: store.Artifact
    executor: Executor
    seed: int
    log: logging.Logger = log
    tracking: tracking.StageRun | None = None  # for a training loop's MetricsLog (pipeline/training.py)

    def map(self, fn: Any, items: list[Any], resources: Resources = Resources(), desc: str = "") -> list[Any]:
        return self.executor.map(fn, items, resources, desc)

    def ddp(self, train_fn: Callable[[TrainSession, Any], Any], args: Any, job: DDPJob) -> dict[str, Any]:
        return self.executor.ddp(train_fn, args, job)


def run_stage(node: Stage, cfg: C.Config, st: store.Store, keys: dict[str, str], executor: Executor,
              before_commit: Callable[[], None] = lambda: None,
              runs: tracking.DagRun | None = None) -> dict[str, Any]:
    """Run one stage and commit its artifact; with `runs`, inside its tracking runs (a child of the DAG's)."""
    artifact = st.artifact(node.name, keys[node.name])
    upstream = {u: keys[u] for u in node.inputs(cfg)}
    stage_run = runs.stage(node.name, keys[node.name], upstream, node.config(cfg), artifact.url) if runs else None
    manifest = None
    try:
        manifest = _run_and_commit(node, cfg, st, keys, executor, before_commit, stage_run)
        return manifest
    finally:
        if runs:
            runs.end(stage_run, artifact, manifest)


def _run_and_commit(node: Stage, cfg: C.Config, st: store.Store, keys: dict[str, str], executor: Executor,
                    before_commit: Callable[[], None], stage_run: tracking.StageRun | None) -> dict[str, Any]:
    artifact = st.artifact(node.name, keys[node.name])
    section = node.config(cfg)
    inputs = {u: st.artifact(u, keys[u]) for u in node.inputs(cfg)}
    for upstream in inputs.values():
        upstream.check_sizes()  # one listing each: a missing or cut file stops here, naming the fix
    ctx = StageContext(artifact, executor, cfg.seed, tracking=stage_run)
    log.info("%s: running (key %s) -> %s", node.name, keys[node.name], store.redact(artifact.url))
    start = time.time()
    try:
        outputs = canonical(node.function()(ctx, section, inputs) or {})
    except Exception as e:
        lost = store.connection_lost(e, st.root, f"stage {node.name}")
        if lost is not None:
            raise lost from e
        raise
    manifest = {
        "stage": node.name,
        "key": keys[node.name],
        "version": node.version,
        "preset": cfg.preset,
        "config": C.to_dict(section),
        "seed": cfg.seed,
        "upstream": {u: keys[u] for u in node.inputs(cfg)},
        "outputs": outputs,
        "wall_time_s": round(time.time() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    before_commit()
    return artifact.commit(manifest)


def run(cfg: C.Config, only: list[str] = (), force: list[str] = (), until: str | None = None,
        dry_run: bool = False, executor: Executor | None = None,
        nodes: dict[str, Stage] | None = None, wait: bool = True) -> Plan:
    """Compute the missing (or forced) artifacts of the selected stages, in order, each under its lease
    (`pipeline/lease.py`): an artifact another run is writing is waited for and used (or, with
    `wait=False`, an error)."""
    nodes = nodes or graph()
    st = store.Store(cfg.storage)
    store.check_storage(st.root)  # before anything reads it: a bad URL fails in seconds, naming the fix
    plan = make_plan(nodes, cfg, st, only, force, until)
    if dry_run or not plan.to_run:
        return plan
    store.check_writable(st.root)
    if executor is None:
        check_executor_storage(cfg.executor, st.root)
        executor = make_executor(cfg.executor, cfg.max_in_flight)
    check_cluster_storage(executor.num_nodes(), st.root, cfg.shared_storage)
    check_resources(executor, [nodes[name] for name in plan.to_run], cfg)
    log.info("plan:\n%s", plan.table())
    for name in plan.forced:  # all before any stage runs: no forced artifact outlives its remade inputs
        with lease.held(st.artifact(name, plan.keys[name]).url, cfg.lease_timeout_s, name, wait):
            st.artifact(name, plan.keys[name]).delete()
    with tracking.dag_run(cfg, plan.to_run) as runs:
        for name in plan.to_run:
            artifact = st.artifact(name, plan.keys[name])
            with lease.held(artifact.url, cfg.lease_timeout_s, name, wait) as held:
                if artifact.state() == "done":  # committed by the run whose lease this one waited for
                    log.info("%s: made by another run meanwhile (key %s): using it", name, plan.keys[name])
                    continue
                run_stage(nodes[name], cfg, st, plan.keys, executor, held.check, runs)
    return plan


def check_executor_storage(executor: str, root: str) -> None:
    if executor == "ray" and store.protocol(root) == "memory":
        raise ValueError("memory:// storage lives inside one process, so Ray workers cannot see it: "
                         "use --set executor=inline, or a local path / s3:// URL as --storage")


def check_cluster_storage(num_nodes: int, root: str, shared: bool) -> None:
    """Tasks on other nodes must see the storage: refuse a local path on a multi-node cluster."""
    if num_nodes > 1 and store.protocol(root) == "file" and not shared:
        raise ValueError(
            f"storage {root} is a local path but the Ray cluster has {num_nodes} nodes, whose tasks "
            "would not see each other's files: use object storage (--storage s3://BUCKET/PATH or "
            "gs://...), or, if every node mounts this path (NFS, Lustre), --set shared_storage=true"
        )


def check_resources(executor: Executor, to_run: list[Stage], cfg: C.Config) -> None:
    """Before any stage starts: every stage's tasks and training workers fit the cluster."""
    for node in to_run:
        section = node.config(cfg)
        how = node.execution(section)
        if how == MAP:
            executor.check(Resources(section.num_cpus, getattr(section, "num_gpus", 0.0)), node.section)
        elif how == DDP:
            executor.check_ddp(DDPJob(node.section, "", section.num_workers, section.use_gpu, 0))

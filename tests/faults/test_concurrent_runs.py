"""Concurrent runs on one storage: two and three `onestep run`s started at the same instant, many times, on
local disk and on the moto S3 server, with seeded random delays around every storage write, lease
release and commit. Every run must exit 0 and each artifact must be made once (the others use it).

The runs are long-lived worker processes (forked from one that imported torch and the stages once),
each calling `onestep run` in-process for every repeat, on a fresh storage root per repeat. The suite
runs a few repeats; `ONESTEP_STRESS_REPEATS=100 pytest tests/faults/test_concurrent_runs.py -s` runs
two and three runs 100 times each on both storages and prints the figures.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import multiprocessing
import os
import queue
import random
import time
import traceback
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline import config as C
from pipeline import dag, store

REPEATS = int(os.environ.get("ONESTEP_STRESS_REPEATS", "0"))  # 0: the suite's sizes (SUITE)
MAX_DELAY_S = 0.03
STAGES = ("encode", "refstats")
# A lease goes stale only after 60 s without a heartbeat, far beyond any stall of a busy machine: a takeover
# here would be a race, not a slow run. A waiting run looks again every POLL_S (onestep's min(5 s, timeout / 4)).
SETTINGS = ["encode.num_images=8", "encode.shard_size=4", "refstats.inception_weights=", "refstats.dinov2_weights=",
            "executor=inline", "lease_timeout_s=60"]
POLL_S = 0.2
ROUND_LIMIT_S = 1800  # room for the S3 client's retries (60 s read timeouts) of a request moto dropped


def _args(storage: str, guide: str) -> list[str]:
    """`onestep run` of encode and refstats; pairs.guide is a content field, so every run hashes that file
    for the cache keys and remembers its hash in the storage (`_sha256/`), all at once."""
    sets = [*SETTINGS, f"pairs.guide={guide}"]
    return ["run", "--config", "ci", "--storage", storage, "--until", "refstats", *(a for s in sets for a in ("--set", s))]


def _delayed(fn: Any, rng: random.Random) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        time.sleep(rng.uniform(0, MAX_DELAY_S))
        try:
            return fn(*args, **kwargs)
        finally:
            time.sleep(rng.uniform(0, MAX_DELAY_S))
    return call


def _inject_delays(rng: random.Random, made: list[str]) -> None:
    """Random delays before and after each storage write, lease write and release, and commit (and the
    storage probe's write and remove); waits for a lease of POLL_S; every stage this process makes is
    recorded in `made`."""
    from pipeline import lease

    for owner, name in ((store, "write_bytes"), (store, "create_exclusive"), (store, "remove"),
                        (store.Artifact, "commit"), (lease.Lease, "_write"), (lease.Lease, "release")):
        setattr(owner, name, _delayed(getattr(owner, name), rng))
    probe_fs = store._probe_fs

    def delayed_probe_fs(url: str) -> Any:
        fs, path = probe_fs(url)
        for name in ("pipe_file", "rm_file"):
            setattr(fs, name, _delayed(getattr(fs, name), rng))
        return fs, path

    run_stage = dag.run_stage

    def recorded_run_stage(node: dag.Node, *args: Any, **kwargs: Any) -> Any:
        made.append(node.name)
        return run_stage(node, *args, **kwargs)

    store._probe_fs, dag.run_stage = delayed_probe_fs, recorded_run_stage
    lease.time = types.SimpleNamespace(time=time.time, sleep=lambda seconds: time.sleep(min(seconds, POLL_S)))


def _jobs(jobs: Any, parent: int) -> Iterator[Any]:
    """The jobs sent, until None, or until the parent is gone."""
    while True:
        try:
            job = jobs.get(timeout=5)
        except queue.Empty:
            with contextlib.suppress(ProcessLookupError):
                os.kill(parent, 0)
                continue
            return
        if job is None:
            return
        yield job


def _worker(index: int, jobs: Any, results: Any, parent: int) -> None:
    """One run slot: for each (storage, guide, start time, seed) job, `onestep run` at that instant."""
    from pipeline import cli

    warnings = logging.StreamHandler()
    logging.basicConfig(level=logging.WARNING, handlers=[warnings])
    rng, made = random.Random(), []
    _inject_delays(rng, made)
    results.put((index, "ready", [], ""))
    for storage, guide, start_at, seed in _jobs(jobs, parent):
        rng.seed(seed * 1009 + index)
        made.clear()
        time.sleep(max(0.0, start_at - time.time()))
        err = io.StringIO()
        warnings.setStream(err)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):  # its error line; no tables
                code = cli.main(_args(storage, guide))
        except BaseException:  # anything but a clean exit is a failure of this run
            code = None
            err.write(traceback.format_exc())
        results.put((index, code, list(made), err.getvalue()))


class Runs:
    """`count` worker processes that start `onestep run` together on request."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("forkserver")  # each worker forked from one process that imported them
        ctx.set_forkserver_preload(["stages.encode", "stages.refstats", "pipeline.cli", "s3fs"])
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(count)]
        self.procs = [ctx.Process(target=_worker, args=(i, q, self.results, os.getpid()), daemon=True)
                      for i, q in enumerate(self.jobs)]
        for p in self.procs:
            p.start()
        assert sorted(self.results.get(timeout=300)[0] for _ in self.procs) == list(range(count))

    def together(self, runs: int, storage: str, guide: str, seed: int) -> list[tuple[int, Any, list[str], Any]]:
        start_at = time.time() + 0.3
        for q in self.jobs[:runs]:
            q.put((storage, guide, start_at, seed))
        return sorted(self.results.get(timeout=ROUND_LIMIT_S) for _ in range(runs))

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(30)


@pytest.fixture(scope="module")
def runs(s3_bucket) -> Any:  # after s3_bucket: the workers inherit its endpoint and credentials
    workers = Runs(3)
    yield workers
    workers.close()


def _left_behind(storage: str, guide: str) -> list[str]:
    """What is wrong with a storage after the runs: an artifact not committed, a lease or probe file left."""
    cfg = C.load_config("ci", SETTINGS + [f"pairs.guide={guide}"], storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    artifacts = [store.Store(storage).artifact(s, keys[s]) for s in STAGES]
    problems = [f"{a.url} not committed" for a in artifacts if a.state() != "done"]
    problems += [f"lease left: {a.url}.lease" for a in artifacts if store.exists(a.url + ".lease")]
    return problems + [f"left: {f}" for f in store.list_dir(storage)[1]]


def stress(runs: Runs, root: str, guide: str, count: int, repeats: int) -> dict[str, Any]:
    """`repeats` rounds of `count` runs started together, each round on its own storage under `root`."""
    start, failures, made = time.time(), [], Counter()
    for r in range(repeats):
        storage = store.join(root, f"r{r:03d}")
        for index, code, stages, log in runs.together(count, storage, guide, seed=r):
            if code != 0 or "the lease of" in log:  # an error, or a lease taken over or lost
                failures.append(f"repeat {r}, run {index}: exit {code}\n{log}")
            made.update((r, s) for s in stages)
        failures += [f"repeat {r}: {problem}" for problem in _left_behind(storage, guide)]
    twice = sorted(k for k, n in made.items() if n != 1)
    return {"runs": count, "repeats": repeats, "failures": failures, "made_twice": twice,
            "artifacts": sum(made.values()), "wall_s": round(time.time() - start, 1)}


SUITE = [("local", 2, 3), ("local", 3, 3), ("s3", 3, 1)]  # under a minute on a 2-core machine
FULL = [(where, count, REPEATS) for where in ("local", "s3") for count in (2, 3)]


@pytest.mark.parametrize("where,count,repeats", FULL if REPEATS else SUITE)
def test_runs_started_together_all_succeed_and_make_each_artifact_once(where, count, repeats, runs, tmp_path, s3_bucket):
    guide = tmp_path / "guide.pkl"
    guide.write_bytes(os.urandom(4096))
    root = str(tmp_path / "store") if where == "local" else f"{s3_bucket}/concurrent-{time.time_ns()}"
    figures = stress(runs, root, str(guide), count, repeats)
    print(f"\n{where}: {figures['runs']} runs x {figures['repeats']} repeats: {len(figures['failures'])} failed, "
          f"{figures['artifacts']} artifacts made, {len(figures['made_twice'])} twice, {figures['wall_s']} s")
    assert figures["failures"] == [], "\n".join(figures["failures"][:3])
    assert figures["made_twice"] == [] and figures["artifacts"] == len(STAGES) * figures["repeats"]

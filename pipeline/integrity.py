"""`onestep verify` and `onestep run --repair`: which stored files are not what their manifest recorded,
and remaking them.

Every committed artifact's manifest lists each file's size and xxh3-64 checksum (`store.Artifact.commit`).
`verify` re-reads every file of the chosen artifacts, in parallel tasks of about `VERIFY_TASK_BYTES`
each, and reports the missing, cut and altered ones. `repair` remakes what is damaged: for a stage that
makes its artifact piece by piece (encode, pairs, phema: `piecewise=True` in its declaration, stages/__init__.py) it
deletes the damaged pieces (their files and markers) and the manifest, and reruns the stage, which
makes only the missing pieces; any other stage is remade whole. When the remade files' checksums differ
from the old ones (GPUs are not bitwise deterministic; logs, with their wall times, do not count), the
stages downstream are remade too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline import config as C
from pipeline import dag, store
from pipeline.executor import Executor, Resources, make_executor
from pipeline.stage import Stage

log = logging.getLogger("onestep")

VERIFY_TASK_BYTES = 256 << 20  # files per verify task: about this many bytes (and at most 256 files)


@dataclass(frozen=True)
class Damage:
    stage: str
    file: str  # relative to the artifact
    problem: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.file}: {self.problem}"


def _check_files(items: list[tuple[str, str, int, str | None]]) -> list[tuple[str, str]]:
    """(file, problem) for each damaged file of [(url, file, size, checksum)] (a task)."""
    damaged = []
    for url, rel, size, expected in items:
        try:
            found_size, digest = store.checksum(url)
        except FileNotFoundError:
            damaged.append((rel, "missing"))
            continue
        if found_size != size:
            damaged.append((rel, f"{found_size} bytes, the manifest says {size}"))
        elif expected is not None and digest != expected:
            damaged.append((rel, f"altered: checksum {digest}, the manifest says {expected}"))
    return damaged


def _batches(items: list[tuple[str, str, int, str | None]]) -> list[list[tuple[str, str, int, str | None]]]:
    batches: list[list[Any]] = [[]]
    total = 0
    for item in items:
        if batches[-1] and (total + item[2] > VERIFY_TASK_BYTES or len(batches[-1]) >= 256):
            batches.append([])
            total = 0
        batches[-1].append(item)
        total += item[2]
    return [b for b in batches if b]


def damaged_files(stage: str, artifact: store.Artifact, executor: Executor) -> list[Damage]:
    """The damaged files of a committed artifact: every file read back and checked against its manifest."""
    try:
        manifest = artifact.manifest()
    except store.ChecksumMismatch as e:
        return [Damage(stage, store.MANIFEST, str(e))]
    if manifest is None:
        return []
    sums = manifest.get("checksums", {})
    if not sums:
        log.warning("%s: the manifest records no checksums (made before onestep kept them): sizes checked only", stage)
    items = [(artifact.path(rel), rel, size, sums.get(rel)) for rel, size in sorted(manifest["files"].items())]
    found = executor.map(_check_files, _batches(items), Resources(num_cpus=1), desc=f"verify {stage}")
    return [Damage(stage, rel, problem) for batch in found for rel, problem in batch]


def verify(cfg: C.Config, stages: list[str] = (), executor: Executor | None = None) -> tuple[dict[str, str], list[Damage]]:
    """({stage: state}, damaged files) of the chosen stages' artifacts (default: every stage)."""
    nodes = dag.graph()
    dag.check_names(nodes, list(stages), "verify")
    st = store.Store(cfg.storage)
    store.check_storage(st.root)
    keys = dag.cache_keys(nodes, cfg)
    states, damage = {}, []
    for name in [n for n in nodes if not stages or n in stages]:
        artifact = st.artifact(name, keys[name])
        states[name] = artifact.state()
        if states[name] == "done":
            executor = executor or make_executor(cfg.executor, cfg.max_in_flight)  # (Ray starts only if needed)
            damage += damaged_files(name, artifact, executor)
    return states, damage


def _piece_files(artifact: store.Artifact, files: list[str]) -> dict[str, list[str]] | None:
    """{piece marker: its files} of the pieces holding the damaged `files`; None when one of them is in no
    piece, or a marker is unreadable (the stage is then remade whole)."""
    if store.MANIFEST in files:
        return None
    owners: dict[str, list[str]] = {}
    for rel in artifact.manifest()["files"]:
        if rel.startswith(store.PIECES + "/") and rel.endswith(".json"):
            try:
                owners[rel] = list(artifact.read_json(rel)["checksums"])
            except (ValueError, KeyError, FileNotFoundError):
                if rel in files:
                    return None
    chosen = {}
    for rel in files:
        marker = rel if rel in owners else next((m for m, owned in owners.items() if rel in owned), None)
        if marker is None:
            return None
        chosen[marker] = owners[marker]
    return chosen


def _drop_damaged(node: Stage, artifact: store.Artifact, damage: list[Damage]) -> str:
    """Delete what the stage's rerun will remake; returns what was dropped, for the log."""
    pieces = _piece_files(artifact, [d.file for d in damage]) if node.piecewise else None
    if pieces is None:
        artifact.delete()
        return "the whole artifact"
    store.remove(artifact.path(store.MANIFEST))  # first: the artifact is no longer done
    for marker, files in pieces.items():
        store.remove(artifact.path(marker))
        for rel in files:
            store.remove(artifact.path(rel))
    return f"{len(pieces)} piece(s): {', '.join(sorted(pieces))}"


def _content(manifest: dict[str, Any]) -> dict[str, str] | None:
    """The checksums of what a stage made, its logs left out (their wall times differ between runs)."""
    sums = manifest.get("checksums")
    return None if sums is None else {rel: d for rel, d in sums.items() if not rel.startswith("metrics")}


def repair(cfg: C.Config, stages: list[str], executor: Executor | None = None) -> list[str]:
    """Remake the damaged files of the stages' artifacts; returns the stages downstream of a repaired
    one whose inputs changed (their artifacts are deleted, for the next run to remake)."""
    nodes = dag.graph()
    dag.check_names(nodes, list(stages), "--repair")
    st = store.Store(cfg.storage)
    keys = dag.cache_keys(nodes, cfg)
    executor = executor or make_executor(cfg.executor, cfg.max_in_flight)
    stale: set[str] = set()
    for name in [n for n in nodes if n in stages]:
        artifact = st.artifact(name, keys[name])
        if artifact.state() != "done":
            log.info("repair %s: not committed (%s): the run finishes it", name, artifact.state())
            continue
        damage = damaged_files(name, artifact, executor)
        if not damage:
            log.info("repair %s: every file is intact", name)
            continue
        for d in damage:
            log.warning("repair: %s", d)
        try:
            before = _content(artifact.manifest())
        except store.ChecksumMismatch:
            before = None
        log.warning("repair %s: remaking %s", name, _drop_damaged(nodes[name], artifact, damage))
        dag.run(cfg, only=[name], executor=executor, nodes=nodes)
        if _content(artifact.manifest()) != before:
            downstream = dag.closure(nodes, {name}, downstream=True) - {name}
            log.warning("repair %s: the remade files differ from the old ones: remaking %s", name,
                        ", ".join(n for n in nodes if n in downstream) or "nothing downstream")
            stale |= downstream
    for name in stale:
        st.artifact(name, keys[name]).delete()
    return [n for n in nodes if n in stale]

"""`onestep runs`: the table of every artifact on a storage, read from the manifests alone (no tracking
backend needed): stage, key, status, when, how long, headline numbers, and the config against its preset.

    onestep runs --storage /tmp/onestep
    onestep runs --storage s3://bucket/onestep --stage distill --config ci
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline import config as C
from pipeline import dag, lease, store
from pipeline.tracking import headline

KEY = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Entry:
    """One stored artifact."""

    stage: str
    key: str
    status: str  # done | running (a live lease) | partial (files, no manifest, no live lease)
    manifest: dict[str, Any] | None


def _status(artifact: store.Artifact, timeout_s: float) -> str:
    if artifact.exists(store.MANIFEST):
        return "done"
    record = lease.Lease(artifact.url, timeout_s).current()[1]
    return "running" if record is not None and lease.stale(record, timeout_s) is None else "partial"


def entries(root: str, stages: list[str], lease_timeout_s: float) -> list[Entry]:
    """Every artifact folder `{root}/{stage}/{key}` of the given stages, oldest first (unfinished last)."""
    st = store.Store(root)
    found = []
    for stage in stages:
        folder = store.join(st.root, stage)
        keys = [url.rsplit("/", 1)[-1] for url in store.list_dir(folder)[0]] if store.exists(folder) else []
        for key in filter(KEY.match, keys):
            artifact = st.artifact(stage, key)
            status = _status(artifact, lease_timeout_s)
            found.append(Entry(stage, key, status, artifact.manifest() if status == "done" else None))
    return sorted(found, key=lambda e: (e.manifest is None, (e.manifest or {}).get("created", ""), e.stage))


def config_diff(stage_config: dict[str, Any], preset: C.Config, section: str) -> dict[str, Any]:
    """The fields of a stage's recorded config that differ from the preset's."""
    base = C.to_dict(getattr(preset, section))
    return {name: value for name, value in stage_config.items() if base.get(name, object()) != value}


def _preset(name: str, cache: dict[str, C.Config | None]) -> C.Config | None:
    if name not in cache:
        try:
            cache[name] = C.load_config(name)
        except ValueError:  # a config file that is not here any more
            cache[name] = None
    return cache[name]


def _row(entry: Entry, against: str | None, presets: dict[str, C.Config | None]) -> list[str]:
    m = entry.manifest
    if m is None:
        return [entry.stage, entry.key, entry.status, "-", "-", "-", "-"]
    name = against or m.get("preset", "demo")
    preset = _preset(name, presets)
    section = dag.graph()[entry.stage].section
    diff = config_diff(m["config"], preset, section) if preset else {}
    numbers = headline(entry.stage, m["outputs"])
    return [entry.stage, entry.key, entry.status, m["created"].replace("T", " ")[:16], f"{m['wall_time_s']:.1f} s",
            " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" for k, v in numbers.items()) or "-",
            f"{name}: " + (" ".join(f"{k}={v}" for k, v in diff.items()) or "same") if preset else f"{name}: ?"]


def table(root: str, stages: list[str], against: str | None = None, lease_timeout_s: float = 120.0) -> str:
    """The runs table; `against`: the preset every config is compared with (default: each one's own)."""
    store.check_storage(root)
    presets: dict[str, C.Config | None] = {}
    rows = [["stage", "key", "status", "created (UTC)", "wall", "headline", "config vs preset"]]
    rows += [_row(e, against, presets) for e in entries(root, stages, lease_timeout_s)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join([f"storage: {store.redact(store.normalize_url(root))}", *lines])

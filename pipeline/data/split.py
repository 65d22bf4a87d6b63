"""The probe's split of a dataset into training and held-out images (`split.parquet` in the probe
artifact): every sample the probe used, with its index, shard, position in the shard, label and
whether it is held out. evaluate's real row is drawn from the held-out part.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.sources import class_quotas
from pipeline.store import Artifact

COLUMNS = ("index", "shard", "position", "label", "holdout")


def write_split(artifact: Artifact, data: dict[str, np.ndarray]) -> None:
    table = pa.table({k: data[k] for k in COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with artifact.open("split.parquet", "wb") as f:
        f.write(buf.getvalue())


def read_split(artifact: Artifact) -> pa.Table:
    """split.parquet: index, shard, position, label, holdout of every sample the probe used."""
    return pq.read_table(io.BytesIO(artifact.read_bytes("split.parquet")))


def stratified(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Positions (sorted) of a seeded sample of `limit` of `labels` with every class in proportion to its
    count (largest remainder), so that a sample of a dataset stored class by class covers every class."""
    classes = np.unique(labels)
    quotas = class_quotas([int((labels == c).sum()) for c in classes], limit)
    rng = np.random.default_rng([seed, 0x5A3B1E])
    picked = [rng.choice(np.flatnonzero(labels == c), quota, replace=False) for c, quota in zip(classes, quotas)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)

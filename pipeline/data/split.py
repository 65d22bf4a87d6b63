"""The probe's split of a dataset into training and held-out images (`split.parquet` in the probe
artifact): every sample the probe used, with its index, shard, position in the shard, label and
whether it is held out. evaluate's real row is drawn from the held-out part.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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

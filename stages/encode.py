"""encode: an image dataset -> WebDataset shards of normalised pixels or VAE latents.

    onestep run --config ci --until encode --storage /tmp/onestep

Sample i goes to shard i // shard_size, so shards do not depend on how many tasks made them.
Each task encodes a group of shards; a shard commits alone (tar, then its marker), so a rerun
after a crash encodes only the missing shards. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EncodeConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import make_encoder
from pipeline.data.preprocess import CorruptImage
from pipeline.data.shards import shard_name, write_shard
from pipeline.data.sources import make_source
from pipeline.executor import Resources
from pipeline.outputs import EncodeOutputs
from pipeline.store import Artifact

PREFIX = "shards/data"


def piece_name(shard: int) -> str:
    return f"shard-{shard:06d}"


@dataclass(frozen=True)
class ShardJob:
    """Everything a task needs; the source and encoder pickle small (no images, no weights)."""

    artifact: Artifact
    source: Any
    encoder: Any
    shard_size: int
    batch: int
    max_corrupt: int  # more unreadable images than this in one shard fails the stage early


def _encoded_samples(job: ShardJob, shard: int, skipped: list[str]) -> Iterator[dict[str, Any]]:
    start = shard * job.shard_size
    stop = min(start + job.shard_size, len(job.source))
    for lo in range(start, stop, job.batch):
        images, meta = [], []
        for index in range(lo, min(lo + job.batch, stop)):
            try:
                image, label, source_id = job.source.load(index)
            except CorruptImage as e:
                skipped.append(f"{e.source_id}: {e.reason}")
                if len(skipped) > job.max_corrupt:
                    raise ValueError(f"too many unreadable images (first: {skipped[:3]}): raise "
                                     "encode.max_corrupt_fraction or clean the dataset") from e
                continue
            images.append(image)
            meta.append((index, label, source_id))
        if not images:
            continue
        arrays = job.encoder.encode(np.stack(images))
        for array, (index, label, source_id) in zip(arrays, meta):
            yield {"key": f"{index:08d}", "npy": array, "cls": label, "src": source_id}


def encode_shards(job: ShardJob, shards: list[int]) -> int:
    """Encode and commit each shard not yet committed; returns how many this call made."""
    made = 0
    for shard in shards:
        if job.artifact.piece_done(piece_name(shard)):
            continue
        skipped: list[str] = []
        samples: list[tuple[str, int, str]] = []

        def keep(sample: dict[str, Any]) -> dict[str, Any]:
            samples.append((sample["key"], sample["cls"], sample["src"]))
            return sample

        gen = (keep(s) for s in _encoded_samples(job, shard, skipped))
        count = write_shard(job.artifact.path(shard_name(PREFIX, shard)), gen)
        keys, labels, sources = (list(col) for col in zip(*samples)) if samples else ([], [], [])
        job.artifact.commit_piece(piece_name(shard), {
            "count": count, "keys": keys, "labels": labels, "sources": sources, "skipped": skipped,
        }, files=[shard_name(PREFIX, shard)])
        made += 1
    return made


def _task_groups(num_shards: int, num_tasks: int) -> list[list[int]]:
    tasks = num_shards if num_tasks <= 0 else min(num_tasks, num_shards)
    return [list(range(num_shards))[t::tasks] for t in range(tasks)]


def _write_index(artifact: Artifact, pieces: list[dict[str, Any]]) -> None:
    table = pa.table({
        "key": [k for p in pieces for k in p["keys"]],
        "shard": [s for s, p in enumerate(pieces) for _ in p["keys"]],
        "label": pa.array([lab for p in pieces for lab in p["labels"]], pa.int32()),
        "source": [src for p in pieces for src in p["sources"]],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with artifact.open(EncodeOutputs.file("index"), "wb") as f:
        f.write(buf.getvalue())


def run(ctx: StageContext, cfg: EncodeConfig, inputs: dict[str, Artifact]) -> EncodeOutputs:
    resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ctx.executor.check(resources, "encode")
    source = make_source(cfg, ctx.seed)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    encoder = make_encoder(cfg.encoder, cfg.vae, device)
    encoder_info = encoder.info()  # a VAE that cannot be loaded fails here, before any task
    num_shards = math.ceil(len(source) / cfg.shard_size)
    max_corrupt = int(cfg.max_corrupt_fraction * len(source))
    job = ShardJob(ctx.artifact, source, encoder, cfg.shard_size, cfg.batch, max_corrupt)
    todo = [s for s in range(num_shards) if not ctx.artifact.piece_done(piece_name(s))]
    ctx.log.info("encode: %d images -> %d shards (%d to make)", len(source), num_shards, len(todo))
    groups = [g for g in _task_groups(num_shards, cfg.num_tasks) if set(g) & set(todo)]
    made = sum(ctx.map(partial(encode_shards, job), groups, resources, desc="encode"))

    pieces = [ctx.artifact.read_piece(piece_name(s)) for s in range(num_shards)]
    skipped = [name for p in pieces for name in p["skipped"]]
    if len(skipped) > max_corrupt:
        raise ValueError(f"{len(skipped)} of {len(source)} images are unreadable (first: {skipped[:3]}); "
                         "raise encode.max_corrupt_fraction or clean the dataset")
    if skipped:
        ctx.log.warning("encode: skipped %d unreadable images, e.g. %s", len(skipped), skipped[:5])
    _write_index(ctx.artifact, pieces)
    counts = Counter(lab for p in pieces for lab in p["labels"])
    down = encoder.downsample
    return EncodeOutputs(
        num_samples=sum(p["count"] for p in pieces),
        num_shards=num_shards,
        shards=[shard_name(PREFIX, s) for s in range(num_shards)],
        shards_made_this_run=made,
        num_classes=source.num_classes,
        class_names=list(source.class_names),
        class_counts={str(k): counts[k] for k in sorted(counts)},
        shape=[encoder.stored_channels, cfg.resolution // down, cfg.resolution // down],
        encoder=encoder_info,
        skipped={"count": len(skipped), "first": skipped[:10]},
    )

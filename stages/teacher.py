"""teacher: train an EDM2 denoiser on the encode shards, DDP under Ray Train.

    onestep run --config ci --until teacher --storage /tmp/onestep

The training is pipeline/teacher.py's trainee in the library's loop (pipeline/trainer.py): time in
images, chunks between checkpoints, a resumed run that goes on exactly as if it had not stopped,
the divergence guard. EMA snapshots for post-hoc EMA are written every `snapshot_nimg` as
`snapshots/ema-{sigma_rel}-{nimg}.safetensors`; this stage indexes them once training is done.

With `teacher.source: edm2-release` or `edm2-snapshots` nothing is trained: the stage brings in
NVIDIA's released network or indexes a folder of its raw snapshots (pipeline/models/edm2_import.py).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import TeacherConfig
from pipeline.dag import StageContext
from pipeline.executor import DDPJob
from pipeline.store import Artifact
from pipeline.teacher import TeacherArgs, build_network, train_worker
from pipeline.training import check_diverged, gather_metrics

VERSION = "2"  # 2: attention reads qkv in EDM2's channel order
UPSTREAM = ("encode",)


def snapshot_index(artifact: Artifact, cfg: TeacherConfig) -> list[dict[str, Any]]:
    """Every committed snapshot: file, images seen, sigma_rel; written as `snapshots/index.json`."""
    index = []
    for nimg in range(cfg.snapshot_nimg, cfg.duration_nimg + 1, cfg.snapshot_nimg):
        piece = f"snapshot-{nimg:012d}"
        if not artifact.piece_done(piece):
            raise RuntimeError(f"teacher finished but snapshot {nimg} was not committed")
        for sigma_rel, name in sorted(artifact.read_piece(piece)["files"].items()):
            index.append({"file": name, "nimg": nimg, "sigma_rel": float(sigma_rel)})
    artifact.write_json("snapshots/index.json", index)
    return index


def run(ctx: StageContext, cfg: TeacherConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    encode = inputs["encode"].manifest()["outputs"]
    if cfg.source != "train":  # NVIDIA's released teacher: imported (edm2-release) or indexed for phema
        from pipeline.models import edm2_import

        entry = edm2_import.release_teacher if cfg.source == "edm2-release" else edm2_import.release_snapshots
        return entry(cfg.release, ctx.artifact, encode)
    net = build_network(cfg, encode)  # an unknown preset or a resolution it cannot take fails here
    ctx.log.info("teacher: %s, %.1fM parameters, %d classes, %s", cfg.preset,
                 sum(p.numel() for p in net.parameters()) / 1e6, net.num_classes, encode["shape"])
    shard_urls = [inputs["encode"].path(name) for name in encode["shards"]]
    args = TeacherArgs(cfg, net.config, shard_urls, encode["encoder"], ctx.artifact, ctx.seed, ctx.tracking)
    job = DDPJob("teacher", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_worker, args, job)
    rows = gather_metrics(ctx.artifact)
    check_diverged(metrics, "teacher")
    index = snapshot_index(ctx.artifact, cfg)
    last_ema = {s["sigma_rel"]: s["file"] for s in index if s["nimg"] == cfg.duration_nimg}
    return {
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "network": net.config,
        "snapshots": index,
        "final_ema": last_ema,
        "metrics": rows[-1] if rows else {},
        "train_wall_time_s": round(time.perf_counter() - start, 1),
    }

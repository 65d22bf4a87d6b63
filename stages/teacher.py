"""teacher: train an EDM2 denoiser on the encode shards, DDP under Ray Train.

    onestep run --config ci --until teacher --storage /tmp/onestep

The training is pipeline/teacher.py's trainee in the library's loop (pipeline/trainer.py): time in
images, chunks between checkpoints, a resumed run that goes on exactly as if it had not stopped,
the divergence guard. EMA snapshots for post-hoc EMA are written every `snapshot_nimg` as
`snapshots/ema-{sigma_rel}-{nimg}.safetensors`; this stage indexes them once training is done.

With `teacher.source: edm2-release` or `edm2-snapshots` nothing is trained: the stage brings in
NVIDIA's released network (read by pipeline/models/edm2_import.py) or indexes a folder of its raw
snapshots, which phema then streams from where they are.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline import store
from pipeline.config import TeacherConfig
from pipeline.dag import StageContext
from pipeline.executor import DDPJob
from pipeline.models.edm2_import import (RECONSTRUCTION_NAME, check_dataset, check_encoder, release_network,
                                         snapshot_files, time_and_length)
from pipeline.outputs import EncodeOutputs, TeacherOutputs
from pipeline.store import Artifact
from pipeline.teacher import TeacherArgs, build_network, train_worker
from pipeline.training import check_diverged, gather_metrics
from pipeline.weights import save_network


def snapshot_index(artifact: Artifact, cfg: TeacherConfig) -> list[dict[str, Any]]:
    """Every committed snapshot: file, images seen, sigma_rel; written as `snapshots/index.json`."""
    index = []
    for nimg in range(cfg.snapshot_nimg, cfg.duration_nimg + 1, cfg.snapshot_nimg):
        piece = f"snapshot-{nimg:012d}"
        if not artifact.piece_done(piece):
            raise RuntimeError(f"teacher finished but snapshot {nimg} was not committed")
        for sigma_rel, name in sorted(artifact.read_piece(piece)["files"].items()):
            index.append({"file": name, "nimg": nimg, "sigma_rel": float(sigma_rel)})
    artifact.write_json(TeacherOutputs.file("snapshots"), index)
    return index


def released(url: str, artifact: Artifact, encode: EncodeOutputs) -> TeacherOutputs:
    """`teacher.source: edm2-release`: the released post-hoc reconstruction, checked against the encode
    artifact and written as the teacher's network."""
    nimg, sigma_rel = time_and_length(url, RECONSTRUCTION_NAME, "post-hoc reconstructions")
    net, top = release_network(url)
    check_dataset(net, encode, url)
    check_encoder(top, encode.encoder, url)
    save_network(artifact, "network", net)
    return TeacherOutputs(num_parameters=sum(p.numel() for p in net.parameters()), network=net.config, snapshots=[],
                          final_ema={}, metrics={}, source="edm2-release",
                          release={"url": store.redact(url), "nimg": nimg, "sigma_rel": sigma_rel})


def released_snapshots(folder: str, artifact: Artifact, encode: EncodeOutputs) -> TeacherOutputs:
    """`teacher.source: edm2-snapshots`: the folder's raw snapshots indexed for phema; the last one is read
    here to check it and to get the network."""
    snapshots = snapshot_files(folder)
    net, top = release_network(snapshots[-1]["url"])
    check_dataset(net, encode, snapshots[-1]["url"])
    check_encoder(top, encode.encoder, snapshots[-1]["url"])
    artifact.write_json(TeacherOutputs.file("config"), net.config)
    return TeacherOutputs(num_parameters=sum(p.numel() for p in net.parameters()), network=net.config,
                          snapshots=snapshots, final_ema={}, metrics={}, source="edm2-snapshots",
                          release={"url": store.redact(folder)})


def run(ctx: StageContext, cfg: TeacherConfig, inputs: dict[str, Artifact]) -> TeacherOutputs:
    encode = EncodeOutputs.read(inputs["encode"])
    if cfg.source != "train":  # NVIDIA's released teacher: imported (edm2-release) or indexed for phema
        source = released if cfg.source == "edm2-release" else released_snapshots
        return source(cfg.release, ctx.artifact, encode)
    net = build_network(cfg, encode)  # an unknown preset or a resolution it cannot take fails here
    ctx.log.info("teacher: %s, %.1fM parameters, %d classes, %s", cfg.preset,
                 sum(p.numel() for p in net.parameters()) / 1e6, net.num_classes, encode.shape)
    args = TeacherArgs(cfg, net.config, encode.shard_urls(inputs["encode"]), encode.encoder, ctx.artifact, ctx.seed,
                       ctx.tracking)
    job = DDPJob("teacher", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_worker, args, job)
    rows = gather_metrics(ctx.artifact)
    check_diverged(metrics, "teacher")
    index = snapshot_index(ctx.artifact, cfg)
    return TeacherOutputs(num_parameters=sum(p.numel() for p in net.parameters()), network=net.config,
                          snapshots=index, final_ema={s["sigma_rel"]: s["file"] for s in index
                                                      if s["nimg"] == cfg.duration_nimg},
                          metrics=rows[-1] if rows else {}, train_wall_time_s=round(time.perf_counter() - start, 1))

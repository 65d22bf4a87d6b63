"""teacher: train an EDM2 denoiser on the encode shards, DDP under Ray Train.

    onestep run --config ci --until teacher --storage /tmp/onestep

Time is counted in images (nimg). Training runs in chunks between checkpoints; each chunk's
data stream and each step's noise are seeded from (seed, rank, nimg), so a run resumed from a
checkpoint continues exactly as if it had not stopped. EMA snapshots for post-hoc EMA are
written every `snapshot_nimg` as `snapshots/ema-{sigma_rel}-{nimg}.safetensors`.

With `teacher.source: edm2-release` or `edm2-snapshots` nothing is trained: the stage brings in
NVIDIA's released network or indexes a folder of its raw snapshots (pipeline/models/edm2_release.py).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch

from pipeline.config import TeacherConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import encoder_from_info
from pipeline.data.shards import reader
from pipeline.diffusion.loss import edm2_loss, sample_sigma
from pipeline.diffusion.phema import PowerFunctionEMA
from pipeline.executor import DDPJob, TrainSession
from pipeline.store import Artifact
from pipeline.seeds import mix_seed
from pipeline.tracking import StageRun
from pipeline.training import (DivergenceGuard, Diverged, MetricsLog, check_diverged, gather_metrics, load_state,
                               mixed_precision, save_state, train_guarded, zero_nonfinite_grads_)
from pipeline.weights import save_network, weights_bytes
from pipeline.models.edm2 import Denoiser, build_denoiser

VERSION = "2"  # 2: attention reads qkv in EDM2's channel order
UPSTREAM = ("encode",)
SIGMA_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0)  # upper edges of the per-sigma loss buckets; last is open


@dataclass(frozen=True)
class LoopArgs:
    """Everything a training worker needs (picklable)."""

    cfg: TeacherConfig
    net_config: dict[str, Any]
    shard_urls: list[str]
    encoder: dict[str, Any]  # the encode manifest's encoder info
    artifact: Artifact
    seed: int
    tracking: StageRun | None = None  # the stage's tracker runs, for rank 0's MetricsLog


@dataclass(frozen=True)
class Round:
    """One forward/backward pass of a worker: clean data, labels, noise levels and unit noise."""

    y: torch.Tensor  # [b, C, H, W] in model space
    labels: torch.Tensor | None  # [b]
    sigma: torch.Tensor  # [b]
    noise: torch.Tensor  # [b, C, H, W]


def learning_rate(cfg: TeacherConfig, nimg: int) -> float:
    """EDM2: lr_ref / sqrt(max(t / t_ref, 1)), t in batches, times a linear warm-up in images."""
    t = nimg / cfg.batch
    decay = 1 / math.sqrt(max(t / cfg.lr_decay_batches, 1.0))
    rampup = min(nimg / cfg.lr_rampup_nimg, 1.0) if cfg.lr_rampup_nimg > 0 else 1.0
    return cfg.lr * decay * rampup


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
               rounds: list[Round], lr: float, cfg: TeacherConfig) -> tuple[torch.Tensor, bool]:
    """One optimiser step over the global batch: this worker's rounds, gradients averaged by DDP.

    The loss is the sum over elements / global batch: each round's loss (sum / b) is divided by
    the number of rounds, and DDP averages over workers. Returns (per-sample losses, finite).
    """
    opt.zero_grad(set_to_none=True)
    per_sample = []
    autocast = mixed_precision(rounds[0].y.device)
    for i, r in enumerate(rounds):
        last = i == len(rounds) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast:
            out = edm2_loss(model, r.y, r.labels, r.sigma, r.noise, weighting=cfg.weighting,
                            min_snr_gamma=cfg.min_snr_gamma, use_uncertainty=cfg.use_uncertainty)
            (out.loss / len(rounds)).backward()
        per_sample.append(out.per_sample.float())
    finite = zero_nonfinite_grads_(params)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return torch.cat(per_sample), finite


def _rounds(batches: Iterator, encoder: Any, cfg: TeacherConfig, device: torch.device,
            conditional: bool, accum: int) -> list[Round]:
    rounds = []
    for _ in range(accum):
        stored, labels = next(batches)
        y = encoder.to_model(stored.to(device))  # VAE: mean + std * randn, then scale and bias
        sigma = sample_sigma(y.shape[0], cfg.P_mean, cfg.P_std, None, device)
        noise = torch.randn_like(y)
        # NHWC: the forward+backward runs ~1.15x faster on CPUs (bench.py train); the same values
        y, noise = (t.contiguous(memory_format=torch.channels_last) for t in (y, noise))
        rounds.append(Round(y, labels.to(device) if conditional else None, sigma, noise))
    return rounds


def _bucket_sums(per_sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[2 * (buckets + 1)]: loss sums then counts per sigma bucket."""
    index = torch.bucketize(sigma, torch.tensor(SIGMA_BUCKETS, device=sigma.device))
    n = len(SIGMA_BUCKETS) + 1
    sums = torch.zeros(n, device=sigma.device).index_add_(0, index, per_sample)
    counts = torch.zeros(n, device=sigma.device).index_add_(0, index, torch.ones_like(per_sample))
    return torch.cat([sums, counts])


def _bucket_names() -> list[str]:
    edges = ["0", *map(str, SIGMA_BUCKETS), "inf"]
    return [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


def _write_snapshots(artifact: Artifact, ema: PowerFunctionEMA, nimg: int) -> None:
    files = {}
    for sigma_rel in ema.sigma_rels:
        name = snapshot_name(sigma_rel, nimg)
        with artifact.open(name, "wb") as f:
            f.write(weights_bytes(ema.ema_state(sigma_rel)))
        files[f"{sigma_rel:.4f}"] = name
    artifact.commit_piece(f"snapshot-{nimg:012d}", {"nimg": nimg, "files": files}, files=list(files.values()))


def snapshot_name(sigma_rel: float, nimg: int) -> str:
    return f"snapshots/ema-{sigma_rel:.4f}-{nimg:012d}.safetensors"


def _restore(net: torch.nn.Module, opt: torch.optim.Optimizer, ema: PowerFunctionEMA, path: str) -> int:
    state = load_state(path)
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    ema.load_state_dict(state["ema"])
    return int(state["nimg"])


def _train_chunk(session: TrainSession, args: LoopArgs, model: torch.nn.Module, net: torch.nn.Module,
                 params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, ema: PowerFunctionEMA, encoder: Any,
                 accum: int, log: MetricsLog, guard: DivergenceGuard, nimg: int) -> int:
    """Train from `nimg` to the next checkpoint (or the end), checkpoint, and return the images seen."""
    cfg, device, rank = args.cfg, session.device, session.rank
    chunk_start = nimg
    chunk_end = min((nimg // cfg.checkpoint_nimg + 1) * cfg.checkpoint_nimg, cfg.duration_nimg)
    steps = (chunk_end - nimg) // cfg.batch
    batches = iter(reader(args.shard_urls, cfg.batch_per_worker, rank=rank, world_size=session.world_size,
                          seed=mix_seed(args.seed, rank, nimg), shuffle_buffer=cfg.shuffle_buffer,
                          resampled=True, num_batches=steps * accum))
    sums, nonfinite, tick, tick_nimg = torch.zeros(2 * len(SIGMA_BUCKETS) + 2, device=device), 0, time.perf_counter(), nimg
    for _ in range(steps):
        torch.manual_seed(mix_seed(args.seed, rank, nimg))  # noise, sigma, dropout, VAE sampling
        rounds = _rounds(batches, encoder, cfg, device, args.net_config["num_classes"] > 0, accum)
        lr = learning_rate(cfg, nimg)
        per_sample, finite = train_step(model, params, opt, rounds, lr, cfg)
        if not guard.reference:  # the first step of this process: the scale the guard holds losses to
            guard.start(loss=float(session.all_reduce(per_sample.mean().reshape(1))) / session.world_size)
        nimg += cfg.batch
        guard.step(finite, nimg)
        ema.update(net, nimg, cfg.batch)
        sums += _bucket_sums(per_sample, torch.cat([r.sigma for r in rounds]))
        nonfinite += not finite
        if rank == 0 and nimg % cfg.snapshot_nimg == 0:
            _write_snapshots(args.artifact, ema, nimg)
        if nimg % cfg.log_nimg == 0 or nimg == chunk_end:
            row = _metrics_row(session, sums, nonfinite, nimg, lr, (nimg - tick_nimg) / (time.perf_counter() - tick))
            log.add(row)
            guard.row(row)
            sums.zero_()
            nonfinite, tick, tick_nimg = 0, time.perf_counter(), nimg
    log.flush(args.artifact, chunk_start)
    if guard.suspect():
        raise Diverged(f"teacher diverged at {nimg} images: the loss was out of range at this checkpoint (see "
                       f"metrics.jsonl), so it was not saved. {guard.fix}")
    _checkpoint(session, net, opt, ema, nimg)
    return nimg


def train_loop(session: TrainSession, args: LoopArgs) -> None:
    """Runs on every DDP worker: chunks of steps between checkpoints, until duration_nimg."""
    cfg, device, rank = args.cfg, session.device, session.rank
    torch.manual_seed(args.seed)  # the same initial weights on every worker
    net = build_denoiser(**args.net_config).to(device).train()
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    ema = PowerFunctionEMA(net, cfg.ema_sigma_rels)
    nimg = session.restore(partial(_restore, net, opt, ema)) or 0
    model = session.wrap(net)
    model = torch.compile(model) if cfg.compile else model
    encoder = encoder_from_info(args.encoder, str(device))
    accum = cfg.batch // (session.world_size * cfg.batch_per_worker)
    log = MetricsLog("teacher", cfg.duration_nimg, rank, args.tracking)
    guard = DivergenceGuard("teacher", cfg.divergence_ratio, cfg.divergence_patience,
                            f"Lower teacher.lr (now {cfg.lr:g}) or raise teacher.batch (now {cfg.batch}).")
    chunk = partial(_train_chunk, session, args, model, net, params, opt, ema, encoder, accum, log, guard)
    if train_guarded(session, nimg, cfg.duration_nimg, chunk) and rank == 0:
        save_network(args.artifact, "network", net)  # the raw (non-EMA) weights at the end


def _metrics_row(session: TrainSession, sums: torch.Tensor, nonfinite: int, nimg: int, lr: float,
                 img_per_s: float) -> dict[str, Any]:
    """The metrics row, reduced over the workers; `img_per_s` is already global (nimg counts every worker's images)."""
    totals = session.all_reduce(torch.cat([sums, torch.tensor([float(nonfinite)], device=sums.device)]))
    n = len(SIGMA_BUCKETS) + 1
    loss_sums, counts = totals[:n].tolist(), totals[n:2 * n].tolist()
    return {
        "nimg": nimg,
        "loss": sum(loss_sums) / max(sum(counts), 1.0),
        "loss_by_sigma": {k: s / c for k, s, c in zip(_bucket_names(), loss_sums, counts) if c},
        "lr": lr,
        "img_per_s": img_per_s,
        "nonfinite_steps": int(totals[-1].item()),
    }


def _checkpoint(session: TrainSession, net: torch.nn.Module, opt: torch.optim.Optimizer,
                ema: PowerFunctionEMA, nimg: int) -> None:
    """Every rank reports; rank 0 attaches the state (network, optimiser, EMAs, images seen)."""
    metrics = {"nimg": nimg}
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if session.rank == 0:
            path = save_state(tmp, {"net": net.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                                    "nimg": nimg})
        session.report(metrics, path)


def _shard_urls(encode: Artifact) -> list[str]:
    return [encode.path(name) for name in encode.manifest()["outputs"]["shards"]]


def build_network(cfg: TeacherConfig, encode_outputs: dict[str, Any]) -> Denoiser:
    """The denoiser for this dataset: channels and resolution from the encode artifact."""
    channels, resolution = encode_outputs["encoder"]["model_channels"], encode_outputs["shape"][-1]
    num_classes = encode_outputs["num_classes"] if cfg.conditional else 0
    return build_denoiser(cfg.preset, resolution, channels, num_classes, **cfg.network_overrides())


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
        from pipeline.models import edm2_release

        entry = edm2_release.release_teacher if cfg.source == "edm2-release" else edm2_release.release_snapshots
        return entry(cfg.release, ctx.artifact, encode)
    net = build_network(cfg, encode)  # an unknown preset or a resolution it cannot take fails here
    ctx.log.info("teacher: %s, %.1fM parameters, %d classes, %s", cfg.preset,
                 sum(p.numel() for p in net.parameters()) / 1e6, net.num_classes, encode["shape"])
    args = LoopArgs(cfg, net.config, _shard_urls(inputs["encode"]), encode["encoder"], ctx.artifact, ctx.seed,
                    ctx.tracking)
    job = DDPJob("teacher", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_loop, args, job)
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

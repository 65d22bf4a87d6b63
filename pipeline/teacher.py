"""Training an EDM2 teacher: what the training loop (pipeline/trainer.py) trains in the teacher stage.

    train_worker(session, TeacherArgs(...))   # on every DDP worker, from the stage's ctx.ddp

A step is one optimiser step over the global batch with the EDM2 loss (docs/algorithms.md, "EDM2 loss
and learned uncertainty") and EDM2's learning rate (docs/algorithms.md, "Learning rate"). After each
step the power-function EMAs advance (docs/algorithms.md, "Power-function EMA and post-hoc EMA"), and
every `snapshot_nimg` they are written as `snapshots/ema-{sigma_rel}-{nimg}.safetensors`, each
snapshot committed as a piece of the artifact.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pipeline.config import TeacherConfig
from pipeline.data.encoders import encoder_from_info
from pipeline.data.shards import reader
from pipeline.diffusion.loss import edm2_loss, sample_sigma
from pipeline.diffusion.phema import PowerFunctionEMA
from pipeline.executor import TrainSession
from pipeline.models.edm2 import Denoiser, build_denoiser
from pipeline.outputs import EncodeOutputs
from pipeline.store import Artifact
from pipeline.tracking import StageRun
from pipeline.trainer import Loop, Step, train
from pipeline.training import mixed_precision, zero_nonfinite_grads_
from pipeline.weights import save_network, weights_bytes

SIGMA_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0)  # upper edges of the per-sigma loss buckets; last is open


@dataclass(frozen=True)
class TeacherArgs:
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


def build_network(cfg: TeacherConfig, encode: EncodeOutputs) -> Denoiser:
    """The denoiser for this dataset: channels and resolution from the encode artifact."""
    channels, resolution = encode.encoder["model_channels"], encode.shape[-1]
    num_classes = encode.num_classes if cfg.conditional else 0
    return build_denoiser(cfg.preset, resolution, channels, num_classes, **cfg.network_overrides())


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


def snapshot_name(sigma_rel: float, nimg: int) -> str:
    return f"snapshots/ema-{sigma_rel:.4f}-{nimg:012d}.safetensors"


def bucket_names() -> list[str]:
    edges = ["0", *map(str, SIGMA_BUCKETS), "inf"]
    return [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


def _bucket_sums(per_sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[2 * (buckets + 1)]: loss sums then counts per sigma bucket."""
    index = torch.bucketize(sigma, torch.tensor(SIGMA_BUCKETS, device=sigma.device))
    n = len(SIGMA_BUCKETS) + 1
    sums = torch.zeros(n, device=sigma.device).index_add_(0, index, per_sample)
    counts = torch.zeros(n, device=sigma.device).index_add_(0, index, torch.ones_like(per_sample))
    return torch.cat([sums, counts])


class Teacher:
    """The loop's trainee (pipeline/trainer.py): the denoiser, its Adam optimiser and its EMAs, on one worker."""

    def __init__(self, session: TrainSession, args: TeacherArgs) -> None:
        self.session, self.args, self.cfg = session, args, args.cfg
        torch.manual_seed(args.seed)  # the same initial weights on every worker
        self.net = build_denoiser(**args.net_config).to(session.device).train()
        self.params = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=self.cfg.lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)
        self.ema = PowerFunctionEMA(self.net, self.cfg.ema_sigma_rels)
        model = session.wrap(self.net)
        self.model = torch.compile(model) if self.cfg.compile else model
        self.encoder = encoder_from_info(args.encoder, str(session.device))
        self.accum = self.cfg.batch // (session.world_size * self.cfg.batch_per_worker)
        self.batches: Iterator = iter(())

    def state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])

    def begin_chunk(self, seed: int, steps: int) -> None:
        cfg, session = self.cfg, self.session
        self.batches = iter(reader(self.args.shard_urls, cfg.batch_per_worker, rank=session.rank,
                                   world_size=session.world_size, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
                                   resampled=True, num_batches=steps * self.accum))

    def step(self, nimg: int) -> Step:
        rounds = [self._round() for _ in range(self.accum)]
        lr = learning_rate(self.cfg, nimg)
        per_sample, finite = train_step(self.model, self.params, self.opt, rounds, lr, self.cfg)
        return {"per_sample": per_sample, "sigma": torch.cat([r.sigma for r in rounds]), "lr": lr,
                "nonfinite_steps": float(not finite)}

    def _round(self) -> Round:
        stored, labels = next(self.batches)
        device = self.session.device
        y = self.encoder.to_model(stored.to(device))  # VAE: mean + std * randn, then scale and bias
        sigma = sample_sigma(y.shape[0], self.cfg.P_mean, self.cfg.P_std, None, device)
        noise = torch.randn_like(y)
        # NHWC: the forward+backward runs ~1.15x faster on CPUs (bench.py train); the same values
        y, noise = (t.contiguous(memory_format=torch.channels_last) for t in (y, noise))
        return Round(y, labels.to(device) if self.net.num_classes > 0 else None, sigma, noise)

    def after_step(self, nimg: int) -> None:
        self.ema.update(self.net, nimg, self.cfg.batch)
        if self.session.rank == 0 and nimg % self.cfg.snapshot_nimg == 0:
            self._write_snapshots(nimg)

    def _write_snapshots(self, nimg: int) -> None:
        files = {}
        for sigma_rel in self.ema.sigma_rels:
            name = snapshot_name(sigma_rel, nimg)
            with self.args.artifact.open(name, "wb") as f:
                f.write(weights_bytes(self.ema.ema_state(sigma_rel)))
            files[f"{sigma_rel:.4f}"] = name
        self.args.artifact.commit_piece(f"snapshot-{nimg:012d}", {"nimg": nimg, "files": files},
                                        files=list(files.values()))

    def guard_losses(self, step: Step) -> dict[str, float]:
        mean = self.session.all_reduce(step["per_sample"].mean().reshape(1))
        return {"loss": float(mean) / self.session.world_size}

    def reduce(self, steps: list[Step], nimg: int, img_per_s: float) -> dict[str, Any]:
        """The metrics row, reduced over the workers; `img_per_s` is already global (nimg counts every
        worker's images)."""
        sums = torch.zeros(2 * len(SIGMA_BUCKETS) + 2, device=self.session.device)
        for s in steps:
            sums += _bucket_sums(s["per_sample"], s["sigma"])
        nonfinite = torch.tensor([sum(s["nonfinite_steps"] for s in steps)], device=sums.device)
        totals = self.session.all_reduce(torch.cat([sums, nonfinite]))
        n = len(SIGMA_BUCKETS) + 1
        loss_sums, counts = totals[:n].tolist(), totals[n:2 * n].tolist()
        return {
            "nimg": nimg,
            "loss": sum(loss_sums) / max(sum(counts), 1.0),
            "loss_by_sigma": {k: s / c for k, s, c in zip(bucket_names(), loss_sums, counts) if c},
            "lr": steps[-1]["lr"],
            "img_per_s": img_per_s,
            "nonfinite_steps": int(totals[-1].item()),
        }

    def save(self, weights: dict[str, torch.Tensor] | None) -> None:
        save_network(self.args.artifact, "network", self.net, weights)  # the raw (non-EMA) weights at the end


def train_worker(session: TrainSession, args: TeacherArgs) -> None:
    """Runs on every DDP worker: the loop over the teacher, from its last checkpoint to duration_nimg."""
    cfg = args.cfg
    loop = Loop("teacher", args.artifact, args.seed, cfg.batch, cfg.duration_nimg, cfg.checkpoint_nimg, cfg.log_nimg,
                cfg.divergence_ratio, cfg.divergence_patience,
                f"Lower teacher.lr (now {cfg.lr:g}) or raise teacher.batch (now {cfg.batch}).", args.tracking)
    train(session, Teacher(session, args), loop)

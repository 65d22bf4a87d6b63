"""What a run will cost, before paying for it: `onestep run --dry-run` prints, per stage, the work
(images, pairs, network evaluations), the storage it writes and its GPU-hours at the preset's stated
per-GPU rates (`estimate:` in the preset, with where they come from).

Work is counted in forward-equivalents: a backward pass costs two forwards, so a training image is
three. Denoiser evaluations go at `denoiser_img_per_s`, teacher training at `train_img_per_s`, the
VAE at `encode_img_per_s` / `decode_img_per_s`. Not counted: the feature networks (Inception,
DINOv2, the probe, LPIPS's backbone), data loading and storage traffic, and startup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline import config as C

IMAGENET_TRAIN = 1_281_167  # images in ILSVRC2012's training set
SD_VAE_DOWNSAMPLE = 8
FLOAT16, FLOAT32 = 2, 4


@dataclass(frozen=True)
class Cost:
    stage: str
    work: str
    storage_bytes: float
    gpu_s: float | None  # None: a rate it needs is not stated
    denoiser_evals: float = 0.0  # forward-equivalents of the denoiser (for tests and the table)


def dataset_images(cfg: C.Config) -> int | None:
    """Images the encode stage will take (None: all of a folder, unknown before listing it)."""
    e = cfg.encode
    if e.source == "synthetic" or e.num_images:
        return e.num_images
    return IMAGENET_TRAIN if e.source == "imagenet" else None


def model_shape(cfg: C.Config) -> tuple[int, int]:
    """(channels, resolution) of the model space."""
    latent = cfg.encode.encoder == "vae"
    return (4, cfg.encode.resolution // SD_VAE_DOWNSAMPLE) if latent else (3, cfg.encode.resolution)


def num_parameters(cfg: C.Config) -> int:
    """The teacher's parameter count, from shapes only (the meta device: no memory)."""
    import torch

    from pipeline.models.edm2 import build_denoiser

    channels, resolution = model_shape(cfg)
    classes = 1000 if cfg.encode.source == "imagenet" else cfg.encode.num_classes
    with torch.device("meta"):
        net = build_denoiser(cfg.teacher.preset, resolution, channels, classes if cfg.teacher.conditional else 0,
                             **cfg.teacher.network_overrides())
    return sum(p.numel() for p in net.parameters())


class _Rates:
    """Seconds of GPU time for counts of work; None once a needed rate is not stated."""

    def __init__(self, est: C.EstimateConfig, latent: bool) -> None:
        self.est, self.latent = est, latent

    def seconds(self, train: float = 0.0, denoiser: float = 0.0, encode: float = 0.0, decode: float = 0.0) -> float | None:
        encode, decode = (encode, decode) if self.latent else (0.0, 0.0)  # pixels need no VAE
        total = 0.0
        for count, rate in ((train, self.est.train_img_per_s), (denoiser, self.est.denoiser_img_per_s),
                            (encode, self.est.encode_img_per_s), (decode, self.est.decode_img_per_s)):
            if count:
                if not rate:
                    return None
                total += count / rate
        return total


def _n(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def costs(cfg: C.Config) -> list[Cost]:
    """Every stage's cost under `cfg`, in DAG order."""
    rates = _Rates(cfg.estimate, cfg.encode.encoder == "vae")
    n = dataset_images(cfg)
    known = n if n is not None else 0
    channels, res = model_shape(cfg)
    image_bytes = channels * res * res
    params = num_parameters(cfg)
    net_bytes = params * FLOAT32
    t, ph, pa, d, ev = cfg.teacher, cfg.phema, cfg.pairs, cfg.distill, cfg.eval
    dataset = f"{n:,} images" if n is not None else "every image of the folder (count it: encode.num_images)"
    out = []

    stored = 2 * image_bytes if cfg.encode.encoder == "vae" else image_bytes  # latents: mean and std
    out.append(Cost("encode", f"{dataset} -> {cfg.encode.encoder} shards", known * stored * FLOAT16,
                    rates.seconds(encode=known)))
    probe, seen = cfg.probe.num_images or known, "decoded" if rates.latent else "read"
    out.append(Cost("probe", f"{_n(probe)} images {seen}, {cfg.probe.epochs} epochs of a small classifier",
                    cfg.probe.ref_images * cfg.probe.feature_dim * FLOAT32, rates.seconds(decode=probe)))
    ref = cfg.refstats.num_images or known
    out.append(Cost("refstats", "published statistics, read" if cfg.refstats.stats else
                    f"{_n(ref)} images {seen} and featurised", 0.0, rates.seconds(decode=0 if cfg.refstats.stats else ref)))

    if t.source == "train":
        snapshots = t.duration_nimg // t.snapshot_nimg * len(t.ema_sigma_rels)
        state = net_bytes * (3 + len(t.ema_sigma_rels))  # weights, Adam's two moments, the EMAs
        out.append(Cost("teacher", f"{_n(t.duration_nimg)} training images, {params / 1e6:.1f}M parameters, "
                        f"{snapshots} snapshots", snapshots * net_bytes + 2 * state + net_bytes,
                        rates.seconds(train=t.duration_nimg), 3.0 * t.duration_nimg))
        out.append(Cost("phema", f"{len(ph.sigma_rels)} variants, CPU tasks each streaming {snapshots} snapshots",
                        len(ph.sigma_rels) * net_bytes, 0.0))
    else:
        out.append(Cost("teacher", f"{t.source}: read, not trained", net_bytes if t.source == "edm2-release" else 0.0, 0.0))
        variants = 1 if t.source == "edm2-release" else len(ph.sigma_rels)
        out.append(Cost("phema", f"{variants} variant(s)", variants * net_bytes, 0.0))

    guided = 2 if pa.guidance != 1.0 else 1
    variants = 1 if t.source == "edm2-release" else len(ph.sigma_rels)
    chosen = variants * pa.select_images if pa.select == "best" and variants > 1 else 0  # the teacher's choice
    pair_evals = (pa.num_pairs + chosen) * (2 * pa.num_steps - 1) * guided
    out.append(Cost("pairs", f"{_n(pa.num_pairs)} pairs x {2 * pa.num_steps - 1} evaluations"
                    + (" x 2 (guided)" if guided == 2 else "")
                    + (f", and {variants} variants x {_n(pa.select_images)} to choose the teacher" if chosen else ""),
                    pa.num_pairs * 2 * image_bytes * FLOAT32, rates.seconds(denoiser=pair_evals, decode=chosen), pair_evals))

    steps = d.duration_nimg // d.batch
    real = 2 if d.guidance != 1.0 else 1
    # per step (pipeline/distill/dmd.py: DMD.step): G forward+backward on both batches, the fake score's update on
    # G's DM batch, the real (x2 guided) and fake scores' forwards for the DM gradient, and each extra
    # fake-score update of DMD2's rule on a fresh G forward
    per_step = (3 * (d.batch + d.reg_batch) + 3 * d.batch + (real + 1) * d.batch
                + (d.fake_updates_per_gen - 1) * 4 * d.batch)
    decode = steps * 4 * d.reg_batch if not d.lpips_decoder and d.lambda_reg else 0  # LPIPS: targets, and G's with backward
    out.append(Cost("distill", f"{steps:,} steps of {d.batch} (+{d.reg_batch} regression) images",
                    2 * net_bytes * 6 + net_bytes, rates.seconds(denoiser=steps * per_step, decode=decode),
                    steps * per_step))

    evals = variants * ev.num_images * (2 * ev.num_steps - 1) + ev.num_images
    out.append(Cost("evaluate", f"{variants} teacher variant(s) x {_n(ev.num_images)} images x "
                    f"{2 * ev.num_steps - 1} evaluations, and the student's", 0.0,
                    rates.seconds(denoiser=evals, decode=(variants + 2) * ev.num_images), evals))
    return out


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:,.1f}"


def table(cfg: C.Config, stages: list[str] | None = None) -> str:
    """The cost table of `stages` (default: all), with the rates and their basis above it."""
    est = cfg.estimate
    rows = [c for c in costs(cfg) if stages is None or c.stage in stages]
    rates = (est.train_img_per_s, est.denoiser_img_per_s, est.encode_img_per_s, est.decode_img_per_s)
    header = ("estimate: work and storage; no per-GPU rates stated (estimate.* in the preset), so no GPU-hours"
              if not any(rates) else
              f"estimate at per-GPU rates for {est.gpu or 'an unnamed GPU'} ({est.basis}): training {rates[0]:g} img/s, "
              f"denoiser {rates[1]:g} img/s, VAE encoder {rates[2]:g} / decoder {rates[3]:g} img/s")
    lines = [header,
             f"{'stage':<10} {'storage':>10} {'GPU-hours':>10}  work"]
    for c in rows:
        lines.append(f"{c.stage:<10} {_size(c.storage_bytes):>10} {_hours(c.gpu_s):>10}  {c.work}")
    stated = [c.gpu_s for c in rows if c.gpu_s is not None]
    total = None if len(stated) < len(rows) else math.fsum(stated)
    lines.append(f"{'total':<10} {_size(sum(c.storage_bytes for c in rows)):>10} {_hours(total):>10}"
                 + ("" if total is not None else "  (rates not stated: set estimate.* in the preset)"))
    return "\n".join(lines)


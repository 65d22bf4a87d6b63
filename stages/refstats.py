"""refstats: FID reference statistics (mu, sigma of Inception pool features) of the dataset.

    onestep run --config ci --until refstats --storage /tmp/onestep

One task per encode shard decodes its samples back to uint8 images (VAE latents: a posterior
sample drawn from each sample's own generator, so the result depends on neither the batch size
nor the task layout) and returns float64 feature sums; the driver merges them into `stats.npz`
(mu, unbiased sigma, count). With `refstats.stats` set, that published npz (clean-fid, ADM,
EDM: keys mu [2048], sigma [2048, 2048]) is checked and used instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import store
from pipeline.config import RefstatsConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import Encoder, encoder_from_info
from pipeline.data.shards import reader
from pipeline.executor import Resources
from pipeline.metrics.fid import FEATURE_DIM, FeatureStats, InceptionFeatures, load_inception, worker_inception
from pipeline.store import Artifact
from pipeline.training import mix_seed

VERSION = "1"
UPSTREAM = ("encode",)


@dataclass(frozen=True)
class ShardJob:
    """What every task shares (picklable, small)."""

    encoder: dict[str, Any]  # the encode manifest's encoder info
    inception_weights: str
    batch: int
    device: str
    seed: int


def decode_images(encoder: Encoder, stored: torch.Tensor, seeds: list[int]) -> np.ndarray:
    """Stored arrays [B, C, h, w] -> uint8 images [B, H, W, 3]; sample i draws from seeds[i]."""
    x = torch.cat([encoder.to_model(stored[i : i + 1], torch.Generator().manual_seed(seed))
                   for i, seed in enumerate(seeds)])
    return encoder.decode(x)


def shard_stats(job: ShardJob, item: tuple[str, int, int, int]) -> dict[str, np.ndarray]:
    """Feature sums (FeatureStats.to_dict) of samples [start, stop) of one shard."""
    url, shard, start, stop = item
    encoder = encoder_from_info(job.encoder, job.device)
    inception = worker_inception(job.inception_weights, job.device)
    stats = FeatureStats(inception.dim)
    seen = 0  # samples of the shard read so far
    for stored, _ in reader([url], job.batch):
        lo, hi = max(start - seen, 0), min(stop - seen, len(stored))
        if lo < hi:
            seeds = [mix_seed(job.seed, shard, seen + i) for i in range(lo, hi)]
            stats.add(inception.features(decode_images(encoder, stored[lo:hi], seeds)))
        seen += len(stored)
        if seen >= stop:
            break
    return stats.to_dict()


def shard_limits(counts: list[int], num_images: int) -> list[int]:
    """Samples to use from each shard: the first `num_images` in shard order (0 = all)."""
    left = num_images or sum(counts)
    limits = []
    for count in counts:
        limits.append(min(count, left))
        left -= limits[-1]
    return limits


def _shard_counts(encode: Artifact, num_shards: int) -> list[int]:
    with encode.open("index.parquet") as f:
        shards = pq.read_table(io.BytesIO(f.read()), columns=["shard"]).column("shard").to_numpy()
    return np.bincount(shards, minlength=num_shards).tolist()


def _shard_items(ctx: StageContext, cfg: RefstatsConfig, encode: Artifact) -> list[tuple[str, int, int, int]]:
    """(shard URL, shard index, start, stop): ranges of at most `images_per_task` samples."""
    shards = encode.manifest()["outputs"]["shards"]
    counts = _shard_counts(encode, len(shards))
    limits = shard_limits(counts, cfg.num_images)
    if sum(limits) < 2:
        raise ValueError(f"refstats needs at least 2 images, the encode artifact gives {sum(limits)}: "
                         "raise refstats.num_images (0 = all) or encode more images")
    if cfg.num_images > sum(counts):
        ctx.log.warning("refstats: num_images=%d but the dataset has %d: using all", cfg.num_images, sum(counts))
    step = cfg.images_per_task
    return [(encode.path(name), s, lo, min(lo + step, n))
            for s, (name, n) in enumerate(zip(shards, limits)) for lo in range(0, n, step)]


def dataset_stats(ctx: StageContext, cfg: RefstatsConfig, encode: Artifact) -> FeatureStats:
    """Merged feature statistics of the first `cfg.num_images` samples, in tasks of shard ranges."""
    items = _shard_items(ctx, cfg, encode)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    job = ShardJob(encode.manifest()["outputs"]["encoder"], cfg.inception_weights, cfg.batch, device, ctx.seed)
    ctx.log.info("refstats: %d images in %d tasks", sum(stop - start for _, _, start, stop in items), len(items))
    results = ctx.map(partial(shard_stats, job), items, Resources(cfg.num_cpus, cfg.num_gpus), desc="refstats")
    return sum((FeatureStats.from_dict(r) for r in results), FeatureStats(FEATURE_DIM))


def read_stats(url: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) in float64 from a published npz at any fsspec URL."""
    def bad(reason: str) -> ValueError:
        return ValueError(f"refstats.stats={store.redact(url)!r}: {reason}. Expected an .npz with "
                          f"mu [{FEATURE_DIM}] and sigma [{FEATURE_DIM}, {FEATURE_DIM}] (clean-fid, ADM, EDM "
                          "reference statistics), or leave refstats.stats empty to compute them from the dataset")

    try:
        with store.open_url(url) as f, np.load(f, allow_pickle=False) as npz:
            names = sorted(npz.files)
            arrays = {k: np.asarray(npz[k], np.float64) for k in ("mu", "sigma") if k in names}
    except Exception as e:  # missing file, not an npz, truncated, pickled objects, no credentials
        raise bad(f"cannot read it ({type(e).__name__}: {e})") from e
    if len(arrays) < 2:
        raise bad(f"no mu and sigma arrays (it holds {names})")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise bad(f"mu has shape {mu.shape}, sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise bad("mu or sigma holds NaN or infinite values")
    return mu, sigma


def _write_npz(artifact: Artifact, name: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with artifact.open(name, "wb") as f:
        f.write(buf.getvalue())


def _checked_inception(cfg: RefstatsConfig) -> InceptionFeatures:
    inception = load_inception(cfg.inception_weights, "cpu")  # a bad file fails here, before any task
    if cfg.stats and inception.random:
        raise ValueError("refstats.stats holds statistics of the real Inception, which cannot be compared with "
                         "refstats.inception_weights='random': set refstats.inception_weights=clean-fid "
                         "(or a path of inception-2015-12-05.pt), or leave refstats.stats empty")
    return inception


def run(ctx: StageContext, cfg: RefstatsConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    ctx.executor.check(Resources(cfg.num_cpus, cfg.num_gpus), "refstats")
    inception = _checked_inception(cfg)
    if cfg.stats:
        mu, sigma = read_stats(cfg.stats)
        _write_npz(ctx.artifact, "stats.npz", mu=mu, sigma=sigma)
        count, source = None, store.redact(cfg.stats)
    else:
        stats = dataset_stats(ctx, cfg, inputs["encode"])
        _write_npz(ctx.artifact, "stats.npz", mu=stats.mean(), sigma=stats.cov(), count=np.int64(stats.count))
        count, source = stats.count, "dataset"
    if inception.random:
        ctx.log.warning("refstats: random-weight Inception: statistics for %s, not FID", inception.metric_name)
    return {"count": count, "feature_dim": FEATURE_DIM, "inception_weights": store.redact(cfg.inception_weights),
            "metric_name": inception.metric_name, "random": inception.random, "source": source}

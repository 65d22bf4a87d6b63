"""refstats: reference statistics (mu, sigma) of the dataset in pretrained feature networks.

    onestep run --config ci --until refstats --storage /tmp/onestep

The networks are Inception (FID) and DINOv2 ViT-L/14 (FD_DINOv2), each where its weights are
configured or can be downloaded (`auto`), and neither where the setting is empty (the demo: the
probe stage gives the offline metrics). Each task decodes a range of one shard back to uint8 images
(VAE latents: a posterior sample drawn from each sample's own generator, so the result depends on
neither the batch size nor the task layout) and returns float64 feature sums per network; the
driver merges them into `{network}.npz` (mu, unbiased sigma, count). With `refstats.stats` set,
that published Inception npz (clean-fid, ADM, EDM: mu [2048], sigma [2048, 2048]) is checked and
used instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import store
from pipeline.config import RefstatsConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import decode_images, encoder_from_info
from pipeline.data.shards import reader
from pipeline.executor import Resources
from pipeline.outputs import EncodeOutputs, RefstatsOutputs
from pipeline.metrics.features import (DOWNLOAD, NETWORKS, SETTING, load_feature_network, metric_name,
                                       worker_feature_network)
from pipeline.metrics.dinov2 import DINOV2_DIM
from pipeline.metrics.fid import FEATURE_DIM, FeatureStats
from pipeline.models import unpickle
from pipeline.store import Artifact
from pipeline.seeds import mix_seed



@dataclass(frozen=True)
class ShardJob:
    """What every task shares (picklable, small)."""

    encoder: dict[str, Any]  # the encode manifest's encoder info
    networks: dict[str, str]  # network name -> weights
    batch: int
    device: str
    seed: int


def shard_stats(job: ShardJob, item: tuple[str, int, int, int]) -> dict[str, dict[str, np.ndarray]]:
    """Per network, feature sums (FeatureStats.to_dict) of samples [start, stop) of one shard."""
    url, shard, start, stop = item
    encoder = encoder_from_info(job.encoder, job.device)
    nets = {name: worker_feature_network(name, weights, job.device) for name, weights in job.networks.items()}
    stats = {name: FeatureStats(net.dim) for name, net in nets.items()}
    seen = 0  # samples of the shard read so far
    for stored, _ in reader([url], job.batch):
        lo, hi = max(start - seen, 0), min(stop - seen, len(stored))
        if lo < hi:
            seeds = [mix_seed(job.seed, shard, seen + i) for i in range(lo, hi)]
            images = decode_images(encoder, stored[lo:hi], seeds)
            for name, net in nets.items():
                stats[name].add(net.features(images))
        seen += len(stored)
        if seen >= stop:
            break
    return {name: s.to_dict() for name, s in stats.items()}


def shard_limits(counts: list[int], num_images: int) -> list[int]:
    """Samples to use from each shard: the first `num_images` in shard order (0 = all)."""
    left = num_images or sum(counts)
    limits = []
    for count in counts:
        limits.append(min(count, left))
        left -= limits[-1]
    return limits


def _shard_counts(encode: Artifact, num_shards: int) -> list[int]:
    index = encode.read_bytes(EncodeOutputs.file("index"))
    shards = pq.read_table(io.BytesIO(index), columns=["shard"]).column("shard").to_numpy()
    return np.bincount(shards, minlength=num_shards).tolist()


def _shard_items(ctx: StageContext, cfg: RefstatsConfig, encode: Artifact) -> list[tuple[str, int, int, int]]:
    """(shard URL, shard index, start, stop): ranges of at most `images_per_task` samples."""
    urls = EncodeOutputs.read(encode).shard_urls(encode)
    counts = _shard_counts(encode, len(urls))
    limits = shard_limits(counts, cfg.num_images)
    if sum(limits) < 2:
        raise ValueError(f"refstats needs at least 2 images, the encode artifact gives {sum(limits)}: "
                         "raise refstats.num_images (0 = all) or encode more images")
    if cfg.num_images > sum(counts):
        ctx.log.warning("refstats: num_images=%d but the dataset has %d: using all", cfg.num_images, sum(counts))
    step = cfg.images_per_task
    return [(url, s, lo, min(lo + step, n)) for s, (url, n) in enumerate(zip(urls, limits)) for lo in range(0, n, step)]


def dataset_stats(ctx: StageContext, cfg: RefstatsConfig, encode: Artifact,
                  networks: dict[str, str]) -> dict[str, FeatureStats]:
    """Per network, merged feature statistics of the first `cfg.num_images` samples, in tasks of shard ranges."""
    items = _shard_items(ctx, cfg, encode)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    job = ShardJob(EncodeOutputs.read(encode).encoder, networks, cfg.batch, device, ctx.seed)
    ctx.log.info("refstats: %d images in %d tasks (%s)", sum(stop - start for _, _, start, stop in items), len(items),
                 ", ".join(networks))
    results = ctx.map(partial(shard_stats, job), items, Resources(cfg.num_cpus, cfg.num_gpus), desc="refstats")
    return {name: sum((FeatureStats.from_dict(r[name]) for r in results[1:]), FeatureStats.from_dict(results[0][name]))
            for name in networks}


EDM2_REFS = {"inception": "fid", "dinov2": "fd_dinov2"}  # network -> its entry in EDM2's dataset-refs pickle
DIMS = {"inception": FEATURE_DIM, "dinov2": DINOV2_DIM}


def read_stats(url: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Published reference statistics, network -> (mu, sigma) in float64: an .npz of Inception's
    (clean-fid, ADM, EDM), or EDM2's dataset-refs .pkl (FID and FD_DINOv2), read without running
    anything in it."""
    def bad(reason: str) -> ValueError:
        return ValueError(f"refstats.stats={store.redact(url)!r}: {reason}. Expected an .npz with mu [{FEATURE_DIM}] "
                          f"and sigma [{FEATURE_DIM}, {FEATURE_DIM}] (clean-fid, ADM, EDM reference statistics) or "
                          "EDM2's dataset-refs .pkl, or leave refstats.stats empty to compute them from the dataset")

    try:
        if url.lower().endswith(".pkl"):
            refs = unpickle.load(url)
            found = {name: refs[key] for name, key in EDM2_REFS.items() if isinstance(refs, dict) and key in refs}
            names = sorted(refs) if isinstance(refs, dict) else type(refs).__name__
        else:
            with store.open_url(url) as f, np.load(f, allow_pickle=False) as npz:
                names = sorted(npz.files)
                found = {"inception": {k: npz[k] for k in ("mu", "sigma") if k in names}}
    except Exception as e:  # missing file, not an npz / pickle, truncated, refused globals, no credentials
        raise bad(f"cannot read it ({type(e).__name__}: {e})") from e
    out = {}
    for name, arrays in found.items():
        if not isinstance(arrays, dict) or not {"mu", "sigma"} <= set(arrays):
            raise bad(f"no mu and sigma arrays (it holds {names})")
        mu, sigma, dim = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64), DIMS[name]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise bad(f"{name}: mu has shape {mu.shape}, sigma {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise bad(f"{name}: mu or sigma holds NaN or infinite values")
        out[name] = mu, sigma
    if not out:
        raise bad(f"no statistics of Inception (fid) or DINOv2 (fd_dinov2) (it holds {names})")
    return out


def _write_npz(artifact: Artifact, name: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with artifact.open(name, "wb") as f:
        f.write(buf.getvalue())


def choose_networks(cfg: RefstatsConfig, log: Any, published: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> (weights, network) of each network to use, name -> why another is not), loaded here on
    the driver: bad weights fail before any task; under "auto" a network that cannot be had is skipped,
    unless published statistics of it were given."""
    chosen, skipped = {}, {}
    for name in NETWORKS:
        weights = getattr(cfg, SETTING[name].split(".", 1)[1])
        strict = weights != "auto" or name in published  # published statistics need their network
        weights = DOWNLOAD[name] if weights == "auto" else weights
        if not weights:
            skipped[name] = f"{SETTING[name]} is empty"
            continue
        try:
            chosen[name] = (weights, load_feature_network(name, weights, "cpu"))
        except ValueError as e:
            if strict:
                raise
            log.warning("refstats: %s skipped: %s", name, e)
            skipped[name] = str(e)
    return chosen, skipped


def run(ctx: StageContext, cfg: RefstatsConfig, inputs: dict[str, Artifact]) -> RefstatsOutputs:
    ctx.executor.check(Resources(cfg.num_cpus, cfg.num_gpus), "refstats")
    published = read_stats(cfg.stats) if cfg.stats else {}
    chosen, skipped = choose_networks(cfg, ctx.log, frozenset(published))
    to_compute = {name: weights for name, (weights, _) in chosen.items() if name not in published}
    computed = dataset_stats(ctx, cfg, inputs["encode"], to_compute) if to_compute else {}
    networks = {}
    for name, (weights, net) in chosen.items():
        if name in published:
            (mu, sigma), count, source = published[name], None, store.redact(cfg.stats)
        else:
            stats = computed[name]
            mu, sigma, count, source = stats.mean(), stats.cov(), stats.count, "dataset"
        _write_npz(ctx.artifact, f"{name}.npz", mu=mu, sigma=sigma, count=np.int64(count or 0))
        networks[name] = {"weights": store.redact(weights), "file": f"{name}.npz", "dim": net.dim, "count": count,
                          "source": source, "metric_name": metric_name(name, net),
                          "random": bool(getattr(net, "random", False))}
        if networks[name]["random"]:
            ctx.log.warning("refstats: random-weight Inception: statistics for %s, not FID", networks[name]["metric_name"])
    return RefstatsOutputs(networks=networks, skipped=skipped)

"""probe: a small classifier trained on the dataset, the feature network of the offline metrics.

    onestep run --config ci --until probe --storage /tmp/onestep

The encode shards are decoded to pixels (one task per shard; VAE latents through the VAE, each
sample's posterior draw from its own seed) and resized to the probe's input. A split keyed to the
dataset index holds out `probe.holdout` of the images; one task trains the classifier
(pipeline/metrics/probe.py) on the rest. Written: `probe.safetensors` + `probe.json`,
`split.parquet` (every sample used: index, shard, position, label, holdout), and `reference.npz`:
mean and covariance of the training images' penultimate features (fd_probe's reference) and up to
`probe.ref_images` of those features (precision/recall's real manifold).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ProbeConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import decode_images, encoder_from_info
from pipeline.data.shards import read_samples
from pipeline.data.split import write_split
from pipeline.executor import Resources
from pipeline.metrics.fid import FeatureStats
from pipeline.metrics.probe import ProbeNet, ProbeTraining, embed, holdout_mask, to_input, train_probe
from pipeline.outputs import EncodeOutputs, ProbeOutputs
from pipeline.store import Artifact
from pipeline.seeds import mix_seed
from pipeline.weights import weights_bytes



@dataclass(frozen=True)
class DecodeJob:
    """What every decoding task shares (picklable, small)."""

    encoder: dict[str, Any]  # the encode manifest's encoder info
    resolution: int  # the probe's input size
    seed: int
    device: str


def decode_shard(job: DecodeJob, item: tuple[str, int, frozenset[int]]) -> dict[str, np.ndarray]:
    """The wanted samples of one shard as probe inputs: index [n], label [n], x float16 [n, 3, r, r]."""
    url, shard, wanted = item
    indices, positions, stored, labels = read_samples(url, set(wanted))
    encoder = encoder_from_info(job.encoder, job.device)
    seeds = [mix_seed(job.seed, shard, int(p)) for p in positions]  # as refstats draws VAE posteriors
    images = decode_images(encoder, torch.from_numpy(stored).to(job.device), seeds)
    x = to_input(images, job.resolution, job.device).half().cpu().numpy()
    return {"index": indices, "position": positions, "label": labels, "x": x}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Intra-op threads for this task (a Ray worker process outlives the task: restore them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainJob:
    artifact: Artifact
    cfg: ProbeConfig
    num_classes: int
    resolution: int
    seed: int
    device: str


def _accuracy(predicted: np.ndarray, labels: torch.Tensor) -> float:
    return float((predicted == labels.cpu().numpy()).mean())


def train_task(job: TrainJob, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Train the probe on the non-held-out samples; write its weights and the reference features."""
    cfg = job.cfg
    with torch_threads(int(cfg.num_cpus)):
        # torch.tensor copies: the arrays come read-only from Ray's object store
        x = torch.tensor(data["x"], device=job.device).float().contiguous(memory_format=torch.channels_last)
        y = torch.tensor(data["label"], device=job.device)
        hold = torch.tensor(data["holdout"], device=job.device)
        torch.manual_seed(job.seed)
        net = ProbeNet(job.num_classes, job.resolution, cfg.channels, cfg.feature_dim).to(
            job.device, memory_format=torch.channels_last)
        how = ProbeTraining(cfg.epochs, cfg.batch, cfg.lr, cfg.weight_decay)
        losses = train_probe(net, x[~hold], y[~hold], how, job.seed)
        train_features, train_predicted = embed(net, x[~hold])
        _, held_predicted = embed(net, x[hold])
    stats = FeatureStats(cfg.feature_dim)
    stats.add(train_features)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mean(), sigma=stats.cov(), count=np.int64(stats.count),
             features=train_features[:cfg.ref_images].astype(np.float32))
    with job.artifact.open("reference.npz", "wb") as f:
        f.write(buf.getvalue())
    with job.artifact.open("probe.safetensors", "wb") as f:
        f.write(weights_bytes(net.state_dict()))
    job.artifact.write_json("probe.json", net.config)
    return {"train_accuracy": _accuracy(train_predicted, y[~hold]), "holdout_accuracy": _accuracy(held_predicted, y[hold]),
            "epoch_losses": [round(v, 5) for v in losses]}


def _selected(encode: Artifact, num_images: int) -> pa.Table:
    table = pq.read_table(io.BytesIO(encode.read_bytes(EncodeOutputs.file("index"))), columns=["key", "shard", "label"])
    return table.slice(0, num_images or len(table))


def _check_labels(encode: EncodeOutputs) -> None:
    present = [c for c, n in encode.class_counts.items() if n > 0]
    if encode.num_classes < 2 or len(present) < 2:
        raise ValueError(
            f"probe: the dataset has {len(present)} class(es) with images, but the probe is a classifier: it "
            "needs labels of at least 2 classes. Encode a labelled dataset (encode.source=imagefolder with "
            "one sub-folder per class), or set probe.enabled=false to evaluate without the probe's metrics")


def _decode(ctx: StageContext, cfg: ProbeConfig, encode: Artifact, resolution: int) -> dict[str, np.ndarray]:
    """Every selected sample decoded to probe inputs, in dataset-index order, with its holdout flag."""
    table = _selected(encode, cfg.num_images)
    indices, shards = np.array(table.column("key").to_pylist(), np.int64), table.column("shard").to_numpy()
    outputs = EncodeOutputs.read(encode)
    urls = outputs.shard_urls(encode)
    items = [(urls[s], int(s), frozenset(indices[shards == s].tolist())) for s in np.unique(shards)]
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    job = DecodeJob(outputs.encoder, resolution, ctx.seed, device)
    parts = ctx.map(partial(decode_shard, job), items, Resources(cfg.num_cpus, cfg.num_gpus), desc="probe data")
    shard_of = [np.full(len(p["index"]), s, np.int64) for p, (_, s, _) in zip(parts, items)]
    data = {k: np.concatenate([p[k] for p in parts]) for k in ("index", "position", "label", "x")}
    data["shard"] = np.concatenate(shard_of)
    order = np.argsort(data["index"], kind="stable")
    data = {k: v[order] for k, v in data.items()}
    data["holdout"] = holdout_mask(data["index"], cfg.holdout, ctx.seed)
    return data


def run(ctx: StageContext, cfg: ProbeConfig, inputs: dict[str, Artifact]) -> ProbeOutputs:
    if not cfg.enabled:
        ctx.log.warning("probe: disabled (probe.enabled=false): evaluate reports no probe metrics")
        return ProbeOutputs(enabled=False)
    resources = Resources(cfg.num_cpus, cfg.num_gpus)
    ctx.executor.check(resources, "probe")
    encode = EncodeOutputs.read(inputs["encode"])
    _check_labels(encode)
    resolution = cfg.resolution or encode.shape[-1] * encode.encoder["downsample"]
    data = _decode(ctx, cfg, inputs["encode"], resolution)
    held, train = int(data["holdout"].sum()), int((~data["holdout"]).sum())
    if held < 1 or train < 2:
        raise ValueError(f"probe: {train} training and {held} held-out images: encode more images or change "
                         f"probe.holdout ({cfg.holdout}) or probe.num_images ({cfg.num_images})")
    ctx.log.info("probe: %d training and %d held-out images at %d px, %d classes", train, held, resolution,
                 encode.num_classes)
    write_split(ctx.artifact, data)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    job = TrainJob(ctx.artifact, cfg, encode.num_classes, resolution, ctx.seed, device)
    [result] = ctx.map(partial(train_task, job), [{k: data[k] for k in ("x", "label", "holdout")}], resources,
                       desc="probe")
    ctx.log.info("probe: held-out accuracy %.4f (training %.4f)", result["holdout_accuracy"], result["train_accuracy"])
    return ProbeOutputs(enabled=True, num_classes=encode.num_classes, resolution=resolution, train_images=train,
                        holdout_images=held, feature_dim=cfg.feature_dim, chance_accuracy=1 / encode.num_classes, **result)

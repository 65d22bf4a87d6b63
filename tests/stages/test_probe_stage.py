"""The probe stage on synthetic shapes, and the offline metrics in its features: they must tell
held-out real images from noise and from wrongly labelled images."""

import io

import numpy as np
import pytest
import torch
from helpers import CountingExecutor

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.encoders import RgbEncoder
from pipeline.data.shards import reader
from pipeline.executor import InlineExecutor
from pipeline.metrics.probe import embed, holdout_mask, to_input
from pipeline.evaluation import EvalJob, Model, References, Tally, score
from pipeline.data.split import read_split
from pipeline.weights import load_probe

pytestmark = pytest.mark.slow  # its fixture trains the probe through the stage until it tells the shapes apart

# 2000 16-px shapes (10 classes), 400 held out; a probe small enough to train in seconds.
PROBE = ["encode.num_images=2000", "encode.shard_size=700", "probe.holdout=0.2", "probe.epochs=20", "probe.batch=32",
         "probe.channels=[16,32,64]", "probe.feature_dim=64", "probe.num_cpus=2"]


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


def _images(cfg: C.Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset index, uint8 images, labels) of every encoded sample, in index order, without the stage."""
    encode = _artifact(cfg, "encode")
    urls = [encode.path(name) for name in encode.manifest()["outputs"]["shards"]]
    stored, labels = (torch.cat(t) for t in zip(*reader(urls, 1000)))
    return np.arange(len(stored)), RgbEncoder().decode(stored.float()), labels.numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> C.Config:
    cfg = C.load_config("ci", PROBE, storage=str(tmp_path_factory.mktemp("probe")))
    dag.run(cfg, until="probe", executor=InlineExecutor())
    return cfg


def test_the_probe_learns_the_shapes_and_records_its_split(trained):
    art = _artifact(trained, "probe")
    out = art.manifest()["outputs"]
    assert out["enabled"] and out["num_classes"] == 10 and out["resolution"] == 16 and out["chance_accuracy"] == 0.1
    assert out["holdout_accuracy"] > 0.9 and out["train_accuracy"] > 0.9
    split = read_split(art).to_pydict()
    index, images, labels = _images(trained)
    assert split["index"] == index.tolist() and split["label"] == labels.tolist()
    assert split["holdout"] == holdout_mask(index, 0.2, trained.seed).tolist()
    assert out["holdout_images"] == sum(split["holdout"]) and 300 < out["holdout_images"] < 500
    # The manifest's accuracy and the reference statistics are those of the saved network.
    net = load_probe(art)
    hold = np.array(split["holdout"])
    features, predicted = embed(net, to_input(images, 16, "cpu").half().float())  # stored as float16 between tasks
    assert np.isclose((predicted[hold] == labels[hold]).mean(), out["holdout_accuracy"])
    with art.open("reference.npz") as f:
        ref = np.load(io.BytesIO(f.read()))
    np.testing.assert_allclose(ref["mu"], features[~hold].mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(features[~hold], rowvar=False), rtol=1e-4, atol=1e-6)
    assert ref["features"].shape == (int((~hold).sum()), 64)


def _metrics(cfg: C.Config, images: np.ndarray, labels: np.ndarray) -> dict:
    """A model row of evaluate computed on these images, through evaluate's own code."""
    probe = _artifact(cfg, "probe")
    job = EvalJob([], {}, {}, probe, {}, [], [0], 1, 64, 0, "cpu")
    tally = Tally(job)
    tally.add(images, labels)
    result = {"model": 0, **tally.result(), "seconds": 0.0}
    with probe.open("reference.npz") as f:
        ref = dict(np.load(io.BytesIO(f.read())))
    refs = References(ref["mu"], ref["sigma"], ref["features"], {})
    return score(Model("real", None, "", None, 0), [result], refs)


def test_the_metrics_tell_real_images_from_noise_and_from_wrong_labels(trained):
    _, images, labels = _images(trained)
    hold = np.array(read_split(_artifact(trained, "probe")).column("holdout").to_pylist())
    real, real_labels = images[hold], labels[hold]
    accuracy = _artifact(trained, "probe").manifest()["outputs"]["holdout_accuracy"]
    good = _metrics(trained, real, real_labels)
    noise = _metrics(trained, np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8), real_labels)
    shuffled = _metrics(trained, real, np.random.default_rng(1).permutation(real_labels))
    assert good["class_accuracy"] == pytest.approx(accuracy)
    assert good["precision"] > 0.85 and good["recall"] > 0.85
    assert noise["fd_probe"] > 20 * good["fd_probe"]
    assert noise["precision"] < 0.2 and noise["recall"] < 0.2 and noise["class_accuracy"] < 0.3
    # Wrong labels move class accuracy to chance and nothing else: the images are the same.
    assert shuffled["class_accuracy"] < 0.2
    assert (shuffled["fd_probe"], shuffled["precision"], shuffled["recall"]) == (
        good["fd_probe"], good["precision"], good["recall"])


def test_a_dataset_of_one_class_is_refused_before_any_task(tmp_path):
    cfg = C.load_config("ci", ["encode.num_classes=1", "encode.num_images=50"], storage=str(tmp_path))
    executor = CountingExecutor()
    dag.run(cfg, until="encode", executor=executor)
    before = executor.calls
    with pytest.raises(ValueError, match="1 class.*needs labels of at least 2 classes.*probe.enabled=false"):
        dag.run(cfg, until="probe", executor=executor)
    assert executor.calls == before and _artifact(cfg, "probe").state() == "missing"
    off = C.load_config("ci", ["encode.num_classes=1", "encode.num_images=50", "probe.enabled=false", "pairs.select=fixed",
                                 "distill.val_every_nimg=0", "distill.keep=last"], storage=str(tmp_path))
    dag.run(off, until="probe", executor=executor)
    assert _artifact(off, "probe").manifest()["outputs"] == {"enabled": False}

"""The pairs stage on a tiny ci teacher: determinism across task counts, resume, bad input, the teacher
variant chosen on validation."""

from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import InlineExecutor, RayExecutor
from pipeline.metrics.fid import frechet_distance
from pipeline.metrics.probe import ProbeFeatures
from pipeline.pairs import read_pairs
from pipeline.seeds import counts_per_class, scored_labels, validation_seeds
from pipeline.weights import load_denoiser, load_probe, load_reference
import stages.pairs

from helpers import PAIRS_TINY


def _cfg(storage: str, *extra: str) -> C.Config:
    return C.load_config("ci", [*PAIRS_TINY, *extra], storage=storage)


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


@pytest.fixture(scope="module")
def phema_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs") / "store"
    dag.run(_cfg(str(root)), until="phema", executor=InlineExecutor())
    dag.run(_cfg(str(root)), until="probe", executor=InlineExecutor())
    return root


@pytest.fixture
def storage(phema_store, tmp_path) -> str:
    shutil.copytree(phema_store, tmp_path / "store")
    return str(tmp_path / "store")


def _all_pairs(cfg: C.Config):
    art = _artifact(cfg, "pairs")
    parts = [read_pairs(art.path(name)) for name in art.manifest()["outputs"]["shards"]]
    return [np.concatenate([p[i] for p in parts]) for i in range(4)]


def test_pairs_are_the_same_with_1_or_3_tasks_and_match_the_sampler(ray_session, storage):
    one = _cfg(storage, "pairs.pairs_per_shard=12", "pairs.batch=4")  # the same batches in both layouts
    three = _cfg(storage, "pairs.pairs_per_shard=4", "pairs.batch=4")
    dag.run(one, until="pairs", executor=InlineExecutor())
    dag.run(three, until="pairs", executor=RayExecutor())
    a, b = _all_pairs(one), _all_pairs(three)
    assert _artifact(three, "pairs").manifest()["outputs"]["num_shards"] == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    noise, target, labels, seeds = a
    assert list(seeds) == list(range(100, 112)) and noise.shape == (12, 3, 16, 16)
    # Pair 7 is what the sampler makes from seed 107 with the sigma_rel 0.1 variant.
    phema = _artifact(one, "phema")
    net = load_denoiser(phema, "network", "phema-0.1000.safetensors")
    z, label = seeded_noise([107], (3, 16, 16), net.num_classes, "cpu")
    np.testing.assert_array_equal(noise[7], z[0].numpy())
    assert labels[7] == int(label[0])
    np.testing.assert_allclose(target[7], edm_sampler(net, z, label, num_steps=4)[0].numpy(), rtol=1e-4, atol=1e-4)


def test_kill_and_rerun_makes_only_the_missing_shards(storage):
    cfg = _cfg(storage, "pairs.pairs_per_shard=4")
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    art = _artifact(cfg, "pairs")
    before = [store.read_bytes(art.path(n)) for n in art.manifest()["outputs"]["shards"]]
    store.remove(art.path("manifest.json"))
    store.remove(art.path("_pieces/shard-000001.json"))
    store.write_bytes(art.path("shards/pairs-000001.tar"), before[1][:100])  # half-written
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    out = art.manifest()["outputs"]
    assert out["pairs_made_this_run"] == 4
    assert [store.read_bytes(art.path(n)) for n in out["shards"]] == before


def test_bad_input_is_a_clear_error(storage):
    with pytest.raises(ValueError, match=r"pairs.sigma_rel = 0.2 is not among the phema variants"):
        dag.run(_cfg(storage, "pairs.sigma_rel=0.2"), only=["pairs"], executor=InlineExecutor())
    with pytest.raises(ValueError, match="needs pairs.guide"):
        _cfg(storage, "pairs.guidance=2")
    with pytest.raises(ValueError, match=r"pairs.guide: .*nowhere does not exist"):
        dag.run(_cfg(storage, "pairs.guidance=2", f"pairs.guide={storage}/nowhere"), only=["pairs"],
                executor=InlineExecutor())


def test_guided_pairs_use_the_guide_network(storage):
    teacher = _artifact(_cfg(storage), "teacher")  # its network.json + network.safetensors: a guide
    cfg = _cfg(storage, "pairs.guidance=1.5", f"pairs.guide={teacher.url}", "pairs.num_pairs=3")
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    plain = _cfg(storage, "pairs.num_pairs=3")
    dag.run(plain, until="pairs", executor=InlineExecutor())
    g, p = _all_pairs(cfg), _all_pairs(plain)
    np.testing.assert_array_equal(g[0], p[0])  # same noise
    assert not np.allclose(g[1], p[1])  # different targets


def _variant_figures(cfg: C.Config, sigma_rel: float) -> tuple[float, float]:
    """fd_probe and class accuracy of a variant's samples of the validation seeds, computed here."""
    net = load_denoiser(_artifact(cfg, "phema"), "network", f"phema-{sigma_rel:.4f}.safetensors")
    seeds, encode = validation_seeds(cfg.pairs.select_images), _artifact(cfg, "encode").manifest()["outputs"]
    z, _ = seeded_noise(seeds, (3, 16, 16), net.num_classes, "cpu")
    labels = torch.tensor(scored_labels(seeds, counts_per_class(encode["class_counts"], net.num_classes)))  # the data's proportions
    decode = encoder_from_info(encode["encoder"]).decode
    features, predicted = ProbeFeatures(load_probe(_artifact(cfg, "probe")), "cpu").embed(
        decode(edm_sampler(net, z, labels, num_steps=cfg.pairs.num_steps)))
    ref = load_reference(_artifact(cfg, "probe"))
    fd = frechet_distance(features.mean(0), np.cov(features.astype(np.float64), rowvar=False), ref.mu, ref.sigma)
    return fd, float((predicted == labels.numpy()).mean())


def test_select_best_scores_every_variant_on_validation_seeds_and_distils_the_lowest(storage):
    cfg = _cfg(storage, "pairs.select=best", "pairs.select_images=20")
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    out = _artifact(cfg, "pairs").manifest()["outputs"]
    assert [s["sigma_rel"] for s in out["selection"]] == [0.05, 0.1]
    for s in out["selection"]:
        fd, accuracy = _variant_figures(cfg, s["sigma_rel"])
        assert s["count"] == 20 and s["class_accuracy"] == pytest.approx(accuracy)
        assert s["fd_probe"] == pytest.approx(fd, rel=1e-3)
    best = min(out["selection"], key=lambda s: s["fd_probe"])["sigma_rel"]
    assert out["teacher"]["sigma_rel"] == best
    fixed = _cfg(storage, f"pairs.sigma_rel={best}")  # the pairs are the chosen variant's
    dag.run(fixed, until="pairs", executor=InlineExecutor())
    for x, y in zip(_all_pairs(cfg), _all_pairs(fixed)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fd, chosen", [({0.05: 3.0, 0.1: 1.0}, 0.1), ({0.05: 1.0, 0.1: 3.0}, 0.05)])
def test_select_best_takes_the_lowest_fd_probe_whatever_sigma_rel_says(storage, monkeypatch, fd, chosen):
    def scored(job, probe, encoder, variant):
        return {"sigma_rel": variant.sigma_rel, "fd_probe": fd[variant.sigma_rel], "class_accuracy": 0.5,
                "count": 1}

    monkeypatch.setattr(stages.pairs, "score_variant", scored)
    cfg = _cfg(storage, "pairs.select=best", "pairs.sigma_rel=0.05", "pairs.num_pairs=2")
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    teacher = _artifact(cfg, "pairs").manifest()["outputs"]["teacher"]
    assert teacher == {"sigma_rel": chosen, "file": f"phema-{chosen:.4f}.safetensors",
                       "chosen_by": "the lowest validation fd_probe of the variants"}

"""The refstats stage on the ci data with a tiny TorchScript Inception loaded like the real one."""

import io
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from edm2_files import dataset_refs
from helpers import CountingExecutor, save_random_inception, save_tiny_vae

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.encoders import RgbEncoder, decode_images, make_encoder
from pipeline.data.shards import reader
from pipeline.executor import InlineExecutor, RayExecutor
from pipeline.metrics.fid import frechet_distance, load_inception
from stages import refstats as R


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt")


def _cfg(storage: Path, inception: str, *overrides: str) -> C.Config:
    return C.load_config("ci", ["encode.num_images=60", "encode.shard_size=25", "refstats.batch=16",
                                f"refstats.inception_weights={inception}", *overrides], storage=str(storage))


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


def _refstats(cfg: C.Config, executor=None, force: list[str] = ()) -> tuple[dict, dict]:
    dag.run(cfg, until="refstats", executor=executor or InlineExecutor(), force=force)
    art = _artifact(cfg, "refstats")
    if not art.exists("inception.npz"):
        return art.manifest()["outputs"], {}
    with art.open("inception.npz") as f:
        stats = dict(np.load(io.BytesIO(f.read())))
    return art.manifest()["outputs"], stats


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of the features (batch composition changes conv arithmetic)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def _direct(cfg: C.Config, inception: str, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """mu and unbiased sigma of the first images, in one process, without the stage's code."""
    encode = _artifact(cfg, "encode")
    urls = [encode.path(name) for name in encode.manifest()["outputs"]["shards"]]
    stored = torch.cat([x for x, _ in reader(urls, 1000)])[:num_images]
    images = RgbEncoder().decode(RgbEncoder().to_model(stored))
    feats = load_inception(inception).features(images)
    return feats.mean(0), np.cov(feats, rowvar=False)


@pytest.mark.parametrize("num_images, per_task", [(0, 1000), (30, 1000), (30, 7)])  # 7: ranges across batches
def test_stats_equal_a_direct_computation(tmp_path, inception, num_images, per_task):
    cfg = _cfg(tmp_path, inception, f"refstats.num_images={num_images}", f"refstats.images_per_task={per_task}")
    outputs, stats = _refstats(cfg)
    count = num_images or 60
    mu, sigma = _direct(cfg, inception, count)
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["count"] == count
    _close(stats["mu"], mu)
    _close(stats["sigma"], sigma)
    assert outputs == {"networks": {"inception": {"count": count, "dim": 2048, "weights": inception, "file": "inception.npz",
                                                  "metric_name": "FID", "random": False, "source": "dataset"}},
                       "skipped": {"dinov2": "refstats.dinov2_weights is empty"}}


def test_one_or_several_ray_tasks_give_the_same_stats(ray_session, tmp_path, inception):
    _, one = _refstats(_cfg(tmp_path / "one", inception, "encode.shard_size=60"), RayExecutor())
    _, three = _refstats(_cfg(tmp_path / "three", inception, "encode.shard_size=20"), RayExecutor())
    assert one["count"] == three["count"] == 60
    _close(one["mu"], three["mu"])
    _close(one["sigma"], three["sigma"])


@pytest.mark.slow  # one scipy sqrtm of 2048 x 2048 inside frechet_distance: ~40 s on 2 CPUs
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 60 features in 2048-d: singular sigma
def test_fd_of_the_dataset_stats_with_themselves_is_zero(tmp_path, inception):
    _, stats = _refstats(_cfg(tmp_path, inception))
    fd = frechet_distance(stats["mu"], stats["sigma"], stats["mu"], stats["sigma"])
    assert abs(fd) < 1e-5 * np.trace(stats["sigma"])


def test_vae_samples_do_not_depend_on_the_batch(tmp_path, inception):
    vae = save_tiny_vae(tmp_path / "vae")
    cfg = _cfg(tmp_path, inception, "encode.encoder=vae", f"encode.vae={vae}", "encode.num_images=12",
               "encode.shard_size=6", "refstats.batch=4")
    _, a = _refstats(cfg)
    _, b = _refstats(replace(cfg, refstats=replace(cfg.refstats, batch=5)), force=["refstats"])
    assert a["count"] == b["count"] == 12
    _close(a["mu"], b["mu"])  # each sample's posterior draw comes from its own generator
    encode = _artifact(cfg, "encode")
    stored, _ = next(iter(reader([encode.path(encode.manifest()["outputs"]["shards"][0])], 2)))
    encoder = make_encoder("vae", vae)
    same, other = decode_images(encoder, stored, [1, 2]), decode_images(encoder, stored, [3, 4])
    assert np.array_equal(same, decode_images(encoder, stored, [1, 2])) and not np.array_equal(same, other)


@pytest.mark.parametrize("kind", ["npz", "pkl"])  # clean-fid/ADM/EDM's npz, EDM2's dataset-refs pickle
def test_published_statistics_are_used_as_is(tmp_path, inception, kind):
    refs = dataset_refs(0)  # its fd_dinov2 statistics are not used: the ci preset has no DINOv2
    mu, sigma = refs["fid"]["mu"], refs["fid"]["sigma"]
    url = f"memory://refs/imagenet64.{kind}"
    buf = io.BytesIO()
    if kind == "npz":
        mu = mu.astype(np.float32)
        np.savez(buf, mu=mu, sigma=sigma)
    else:
        pickle.dump(refs, buf)
    store.write_bytes(url, buf.getvalue())
    executor = CountingExecutor()
    cfg = _cfg(tmp_path, inception, f"refstats.stats={url}")
    dag.run(cfg, until="encode", executor=executor)
    before = executor.calls
    outputs, stats = _refstats(cfg, executor)
    assert executor.calls == before  # no task: nothing is computed
    assert stats["mu"].dtype == np.float64 and np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
    assert outputs["networks"]["inception"]["source"] == url and outputs["networks"]["inception"]["count"] is None


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (_npz(mu=np.zeros(2048), sigma=np.eye(2048))[:5000], "cannot read it"),
    (b"not an npz at all", "cannot read it"),
    (_npz(mean=np.zeros(2048), cov=np.eye(2048)), r"no mu and sigma arrays \(it holds \['cov', 'mean'\]\)"),
    (_npz(mu=np.zeros(64), sigma=np.eye(64)), r"inception: mu has shape \(64,\)"),
    (_npz(mu=np.full(2048, np.nan), sigma=np.eye(2048)), "inception: mu or sigma holds NaN"),
])
def test_a_bad_npz_is_a_clear_error(tmp_path, data, message):
    (tmp_path / "ref.npz").write_bytes(data)
    with pytest.raises(ValueError, match=f"refstats.stats=.*ref.npz.*: {message}"):
        R.read_stats(str(tmp_path / "ref.npz"))
    with pytest.raises(ValueError, match="refstats.stats=.*FileNotFoundError"):
        R.read_stats(str(tmp_path / "missing.npz"))


def test_bad_weights_or_stats_fail_before_any_task(tmp_path, inception):
    (tmp_path / "ref.npz").write_bytes(b"garbage")
    (tmp_path / "not-torchscript.pt").write_bytes(b"garbage")
    cases = {
        f"refstats.inception_weights={tmp_path / 'nope.pt'}":
            "refstats.inception_weights=.*no file .*nope.pt.*set refstats.inception_weights=/path/or/url",
        f"refstats.inception_weights={tmp_path / 'not-torchscript.pt'}": "not a TorchScript file",
        f"refstats.stats={tmp_path / 'ref.npz'}": "refstats.stats=.*cannot read it",
    }
    cfg = _cfg(tmp_path / "art", inception)
    dag.run(cfg, until="encode", executor=InlineExecutor())
    for override, message in cases.items():
        executor = CountingExecutor()
        bad = _cfg(tmp_path / "art", inception, override)
        with pytest.raises(ValueError, match=message):
            dag.run(bad, only=["refstats"], executor=executor)
        assert executor.calls == 0 and _artifact(bad, "refstats").state() == "missing"


def test_published_stats_with_a_random_or_no_inception_is_an_error(tmp_path, inception):
    for weights in ("random", ""):
        with pytest.raises(ValueError, match=f"cannot be compared with refstats.inception_weights='{weights}'"):
            _cfg(tmp_path, inception, "refstats.stats=/refs/imagenet64.npz", f"refstats.inception_weights={weights}")


def test_auto_skips_a_network_that_cannot_be_had_and_says_why(tmp_path, inception, monkeypatch):
    def offline(name, weights, device):
        if name == "dinov2":
            raise ValueError(f"cannot load the DINOv2 network refstats.dinov2_weights={weights!r}: no internet")
        return load_inception(weights, device)

    monkeypatch.setattr(R, "load_feature_network", offline)
    outputs, stats = _refstats(_cfg(tmp_path, inception, "refstats.dinov2_weights=auto"))
    assert list(outputs["networks"]) == ["inception"] and "no internet" in outputs["skipped"]["dinov2"]
    with pytest.raises(ValueError, match="no internet"):  # asked for by name: an error, not a skip
        _refstats(_cfg(tmp_path / "hub", inception, "refstats.dinov2_weights=hub"))
    off = _refstats(_cfg(tmp_path / "off", inception, "refstats.inception_weights=", "refstats.dinov2_weights="))[0]
    assert off == {"networks": {}, "skipped": {"inception": "refstats.inception_weights is empty",
                                               "dinov2": "refstats.dinov2_weights is empty"}}


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


@pytest.mark.parametrize("protocol", [4, 5])  # as calculate_metrics.py pickles them under Python <= 3.13, >= 3.14
def test_edm2_dataset_refs_give_fid_and_fd_dinov2_statistics(protocol, tmp_path, monkeypatch):
    refs = dataset_refs(1)
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps(refs, protocol))
    stats = R.read_stats(str(path))
    assert set(stats) == {"inception", "dinov2"} and all(a.dtype == np.float64 for pair in stats.values() for a in pair)
    for name, metric in R.EDM2_REFS.items():
        assert all(np.array_equal(a, refs[metric][k]) for a, k in zip(stats[name], ("mu", "sigma")))
    monkeypatch.chdir(tmp_path)
    for content, message in (({**refs, "extra": RunsCode()}, "cannot read it.*refused posix.system|cannot read it.*refused os.system"),
                             ({"num_images": 3}, r"no statistics of Inception \(fid\) or DINOv2"),
                             ({"fd_dinov2": {"mu": np.zeros(768), "sigma": np.eye(768)}}, r"dinov2: mu has shape \(768,\)")):
        path.write_bytes(pickle.dumps(content))
        with pytest.raises(ValueError, match=f"refstats.stats=.*img512.pkl.*{message}"):
            R.read_stats(str(path))
    assert not (tmp_path / "PWNED").exists()

"""The encode stage through the real DAG: synthetic, image folders, ImageNet, VAE, S3, resume."""

import io
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import CountingExecutor, make_image_folder, make_imagenet, save_tiny_vae

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.shards import reader
from pipeline.executor import InlineExecutor, RayExecutor


def _cfg(storage: str, *overrides: str) -> C.Config:
    return C.load_config("ci", ["encode.num_images=120", "encode.shard_size=50", "encode.batch=16",
                                *overrides], storage=storage)


def _encode(cfg: C.Config, executor=None, **kw) -> dict:
    dag.run(cfg, until="encode", executor=executor or InlineExecutor(), **kw)
    key = dag.cache_keys(dag.graph(), cfg)["encode"]
    return store.Store(cfg.storage).artifact("encode", key).manifest()


def _shard_bytes(cfg: C.Config, manifest: dict) -> list[bytes]:
    art = store.Store(cfg.storage).artifact("encode", manifest["key"])
    return [store.read_bytes(art.path(name)) for name in manifest["outputs"]["shards"]]


def _index(cfg: C.Config, manifest: dict):
    art = store.Store(cfg.storage).artifact("encode", manifest["key"])
    return pq.read_table(io.BytesIO(store.read_bytes(art.path("index.parquet")))).to_pydict()


def test_synthetic_shards_identical_with_1_or_3_ray_tasks(ray_session, tmp_path):
    one = _cfg(str(tmp_path / "one"), "encode.num_tasks=1")
    three = _cfg(str(tmp_path / "three"), "encode.num_tasks=3")
    m1 = _encode(one, RayExecutor())
    m3 = _encode(three, RayExecutor())
    assert m1["key"] == m3["key"]  # num_tasks is throughput-only
    assert _shard_bytes(one, m1) == _shard_bytes(three, m3)
    out = m1["outputs"]
    assert out["num_samples"] == 120 and out["num_shards"] == 3 and out["shape"] == [3, 16, 16]
    assert sum(out["class_counts"].values()) == 120 and len(out["class_counts"]) == 10
    index = _index(one, m1)
    assert index["key"] == [f"{i:08d}" for i in range(120)] and index["shard"][-1] == 2
    assert index["label"] == [i % 10 for i in range(120)]


def test_rerun_is_a_cache_hit_and_force_recomputes(tmp_path):
    cfg = _cfg(str(tmp_path / "a"))
    executor = CountingExecutor()
    first = _encode(cfg, executor)
    assert executor.calls == 3
    assert _encode(cfg, executor) == first and executor.calls == 3  # no task ran
    forced = _encode(cfg, executor, force=["encode"])
    assert executor.calls == 6 and forced["outputs"]["shards_made_this_run"] == 3
    assert forced["created"] >= first["created"]


def test_kill_and_rerun_makes_only_missing_shards(tmp_path):
    cfg = _cfg(str(tmp_path / "a"))
    whole = _encode(cfg)
    before = _shard_bytes(cfg, whole)
    art = store.Store(cfg.storage).artifact("encode", whole["key"])
    # The state a crash leaves: no manifest, shard 1 half written without its marker, shard 2 not begun.
    store.remove(art.path("manifest.json"))
    store.remove(art.path("_pieces/shard-000001.json"))
    store.remove(art.path("_pieces/shard-000002.json"))
    store.remove(art.path("shards/data-000002.tar"))
    store.write_bytes(art.path("shards/data-000001.tar"), before[1][: len(before[1]) // 2])
    assert art.state() == "partial"
    resumed = _encode(cfg)
    assert resumed["outputs"]["shards_made_this_run"] == 2
    assert _shard_bytes(cfg, resumed) == before


def test_rgb_shards_decode_back_to_the_source_images(tmp_path):
    from pipeline.data.encoders import RgbEncoder
    from pipeline.data.sources import SyntheticSource

    cfg = _cfg(str(tmp_path / "a"))
    manifest = _encode(cfg)
    art = store.Store(cfg.storage).artifact("encode", manifest["key"])
    urls = [art.path(name) for name in manifest["outputs"]["shards"]]
    stored, labels = next(iter(reader(urls, batch_size=8)))
    images = RgbEncoder().decode(RgbEncoder().to_model(stored))
    source = SyntheticSource(120, 16, 10, seed=0)
    for i in range(8):
        assert np.array_equal(images[i], source.load(i)[0]) and labels[i] == i % 10


def test_imagefolder_skips_and_counts_a_corrupt_image(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cats": 7, "dogs": 5}, corrupt=["dogs/broken.jpg"])
    cfg = _cfg(str(tmp_path / "art"), "encode.source=imagefolder", f"encode.path={root}",
               "encode.max_corrupt_fraction=0.1")
    out = _encode(cfg)["outputs"]
    assert out["num_samples"] == 12 and out["skipped"]["count"] == 1
    assert "dogs/broken.jpg" in out["skipped"]["first"][0]
    assert out["class_names"] == ["cats", "dogs"] and out["class_counts"] == {"0": 7, "1": 5}
    strict = _cfg(str(tmp_path / "strict"), "encode.source=imagefolder", f"encode.path={root}",
                  "encode.max_corrupt_fraction=0")
    with pytest.raises(ValueError, match="unreadable images .*max_corrupt_fraction"):
        _encode(strict)


def test_missing_or_empty_dataset_fails_before_any_task(tmp_path):
    executor = CountingExecutor()
    cfg = _cfg(str(tmp_path / "art"), "encode.source=imagefolder", f"encode.path={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="nope"):
        _encode(cfg, executor)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    cfg = _cfg(str(tmp_path / "art"), "encode.source=imagefolder", f"encode.path={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="cls"):
        _encode(cfg, executor)
    assert executor.calls == 0


@pytest.mark.parametrize("as_tars", [False, True])
def test_imagenet_layouts(tmp_path, as_tars):
    root = make_imagenet(tmp_path / "in", ["n01440764", "n01443537"], per_class=3, as_tars=as_tars)
    cfg = _cfg(str(tmp_path / "art"), "encode.source=imagenet", f"encode.path={root}")
    manifest = _encode(cfg)
    assert manifest["outputs"]["class_names"] == ["n01440764", "n01443537"]
    assert _index(cfg, manifest)["source"][0].startswith("n01440764/")


def test_vae_encoder_from_a_local_folder(tmp_path):
    vae_dir = save_tiny_vae(tmp_path / "vae")
    cfg = _cfg(str(tmp_path / "art"), "encode.encoder=vae", f"encode.vae={vae_dir}", "encode.num_images=20")
    out = _encode(cfg)["outputs"]
    assert out["shape"] == [8, 8, 8]  # mean and std of 4 channels; the tiny VAE downsamples by 2
    assert out["encoder"]["name"] == "vae" and len(out["encoder"]["scale"]) == 4


def test_bad_vae_fails_before_any_task(tmp_path):
    executor = CountingExecutor()
    cfg = _cfg(str(tmp_path / "art"), "encode.encoder=vae", f"encode.vae={tmp_path / 'no-vae'}")
    with pytest.raises(ValueError, match="cannot load the VAE .*encode.vae="):
        _encode(cfg, executor)
    assert executor.calls == 0


def test_encode_on_s3_with_ray_workers(ray_session, s3_bucket, tmp_path):
    cfg = _cfg(f"{s3_bucket}/run-{uuid.uuid4().hex}")
    manifest = _encode(cfg, RayExecutor())
    local = _cfg(str(tmp_path / "local"))
    assert _shard_bytes(cfg, manifest) == _shard_bytes(local, _encode(local))
    assert dag.run(cfg, until="encode", executor=RayExecutor()).to_run == []


def test_reader_gives_every_rank_the_same_number_of_batches(tmp_path):
    cfg = _cfg(str(tmp_path / "a"))
    manifest = _encode(cfg)
    art = store.Store(cfg.storage).artifact("encode", manifest["key"])
    urls = [art.path(name) for name in manifest["outputs"]["shards"]]  # 3 shards, 2 ranks
    plain = [list(reader(urls, 16, rank=r, world_size=2)) for r in range(2)]
    seen = sorted(int(l) for rank in plain for _, labels in rank for l in labels)
    assert len(seen) == 120  # plain mode: every sample once over the ranks, but uneven batch counts
    assert len(plain[0]) != len(plain[1])
    resampled = [list(reader(urls, 16, rank=r, world_size=2, seed=5, shuffle_buffer=32, resampled=True,
                             num_batches=7)) for r in range(2)]
    assert [len(b) for b in resampled] == [7, 7]
    assert all(x.shape == (16, 3, 16, 16) for rank in resampled for x, _ in rank)
    again = list(reader(urls, 16, rank=1, world_size=2, seed=5, shuffle_buffer=32, resampled=True, num_batches=7))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again, resampled[1]))  # seeded: reproducible
    assert not np.array_equal(resampled[0][0][0], resampled[1][0][0])  # ranks differ

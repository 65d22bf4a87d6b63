"""Integrity: every committed file's checksum in its manifest; damaged files caught before or while
they are read, with an error naming the file and the fix; `onestep verify` and `onestep run --repair`."""

import os
import tarfile

import pytest
import torch

from pipeline import cli, dag, integrity, store
from pipeline import config as C
from pipeline.data.shards import _VERIFIED, reader
from pipeline.executor import InlineExecutor, RayExecutor
from pipeline.training import STATE_CHECKSUM, STATE_FILE, load_state, save_state
from pipeline.weights import read_weights
from stages import encode as E

SMALL = ["encode.num_images=200", "encode.shard_size=100", "teacher.batch=16", "teacher.checkpoint_nimg=32",
         "teacher.snapshot_nimg=32", "teacher.duration_nimg=64", "teacher.log_nimg=16", "teacher.lr_rampup_nimg=0",
         "phema.sigma_rels=[0.1]", "executor=inline"]


def _cfg(storage) -> C.Config:
    return C.load_config("ci", SMALL, storage=str(storage))


def _cli(storage, *args: str) -> int:
    return cli.main([*args, "--config", "ci", "--storage", str(storage), *(a for s in SMALL for a in ("--set", s))])


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


def _damage(path: str, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.fixture(autouse=True)
def _fresh_reads():
    _VERIFIED.clear()  # each test's reads are a new run's
    yield


def test_every_manifest_checksum_is_the_stored_bytes_and_verify_finds_them_intact(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="phema", executor=InlineExecutor())
    for stage in ("encode", "teacher", "phema"):
        manifest = _artifact(cfg, stage).manifest()
        assert manifest["checksum"] == "xxh3_64" and set(manifest["checksums"]) == set(manifest["files"]), stage
        for rel, digest in manifest["checksums"].items():
            assert store.checksum(_artifact(cfg, stage).path(rel)) == (manifest["files"][rel], digest), (stage, rel)
    states, damage = integrity.verify(cfg, executor=InlineExecutor())
    assert damage == [] and [s for s, state in states.items() if state == "done"] == ["encode", "teacher", "phema"]
    assert _cli(tmp_path, "verify") == 0
    assert "encode     done     intact" in capsys.readouterr().out


def test_a_cut_shard_stops_the_next_stage_before_it_starts_and_repair_remakes_only_it(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="encode", executor=InlineExecutor())
    encode = _artifact(cfg, "encode")
    shard = encode.path("shards/data-000001.tar")
    original, size = store.read_bytes(shard), os.path.getsize(shard)
    os.truncate(shard, size // 2)
    assert _cli(tmp_path, "run", "--until", "teacher") == 2
    err = capsys.readouterr().err
    assert f"the encode artifact {encode.url} is damaged: shards/data-000001.tar ({size // 2} bytes, the manifest " \
           f"says {size})" in err and "onestep verify encode" in err and "onestep run --repair encode" in err
    assert "Traceback" not in err and _artifact(cfg, "teacher").state() == "missing"  # nothing trained
    assert _cli(tmp_path, "verify", "encode") == 1
    out = capsys.readouterr().out
    assert f"damaged: encode: shards/data-000001.tar: {size // 2} bytes, the manifest says {size}" in out
    assert "onestep run --repair encode" in out
    untouched = os.path.getmtime(encode.path("shards/data-000000.tar"))
    assert _cli(tmp_path, "run", "--repair", "encode", "--until", "encode") == 0
    assert store.read_bytes(shard) == original  # remade, the same bytes
    assert os.path.getmtime(encode.path("shards/data-000000.tar")) == untouched  # the intact piece was kept
    assert encode.manifest()["outputs"]["shards_made_this_run"] == 1
    assert _cli(tmp_path, "verify", "encode") == 0


def test_overwritten_bytes_in_a_shard_stop_the_reader_and_the_stage_before_commit(tmp_path):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="encode", executor=InlineExecutor())
    encode = _artifact(cfg, "encode")
    shard = encode.path("shards/data-000001.tar")
    members = tarfile.open(shard).getmembers()
    npy = next(m for m in members[len(members) // 2:] if m.name.endswith(".npy"))
    _damage(shard, npy.offset_data + 128, bytes(range(100)))  # in an array's values: they still decode
    urls = [encode.path(f"shards/data-{s:06d}.tar") for s in range(2)]
    with pytest.raises(store.ChecksumMismatch, match=f"{shard} is damaged: its bytes are not those its artifact's "
                       "manifest recorded .*onestep verify encode.*--repair encode"):
        for _ in reader(urls, 16):
            pass
    _VERIFIED.clear()
    with pytest.raises(store.ChecksumMismatch, match="data-000001.tar is damaged"):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    assert _artifact(cfg, "teacher").manifest() is None  # never committed on damaged data
    _, damage = integrity.verify(cfg, ["encode"], InlineExecutor())
    assert [(d.file, d.problem.split(":")[0]) for d in damage] == [("shards/data-000001.tar", "altered")]
    cls = next(m for m in members if m.name.endswith(".cls"))
    _damage(shard, cls.offset_data, b"\xff")  # a field that no longer decodes, in a shard read unchecked
    _VERIFIED.update(urls)  # (as one made before onestep kept checksums): the decoder's error names it
    with pytest.raises(store.ChecksumMismatch, match=f"sample '{cls.name.split('.')[0]}' of shard {shard} cannot be "
                       "decoded .*the shard is damaged; run `onestep verify encode`"):
        for _ in reader(urls, 16):
            pass


def test_damaged_weights_checkpoints_and_json_get_errors_naming_them(tmp_path):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="phema", executor=InlineExecutor())
    teacher, phema = _artifact(cfg, "teacher"), _artifact(cfg, "phema")
    network = teacher.path("network.safetensors")
    _damage(network, os.path.getsize(network) - 50, b"\x7f" * 8)  # a flip inside a tensor still loads: the checksum tells
    with pytest.raises(store.ChecksumMismatch, match=f"{network} is damaged.*onestep verify teacher"):
        read_weights(network)
    variant = phema.path(phema.manifest()["outputs"]["variants"][0]["file"])
    os.truncate(variant, 100)
    with pytest.raises(store.ChecksumMismatch, match="the phema artifact .* is damaged: phema-0.1000.safetensors \\(100 bytes"):
        dag.run(cfg, until="pairs", executor=InlineExecutor())  # the size check, before pairs starts
    with pytest.raises(store.ChecksumMismatch, match="is damaged.*onestep verify phema"):
        read_weights(variant)  # as phema's readers would, were the check skipped
    _damage(teacher.path("network.json"), 0, b"#")
    with pytest.raises(store.ChecksumMismatch, match="network.json is damaged"):
        teacher.read_json("network.json")
    state_dir = save_state(str(tmp_path / "ckpt"), {"step": torch.tensor(3)})
    os.truncate(os.path.join(state_dir, STATE_FILE), 40)
    with pytest.raises(store.ChecksumMismatch, match=f"checkpoint {state_dir}/{STATE_FILE} does not match its checksum"):
        load_state(state_dir)
    os.remove(os.path.join(state_dir, STATE_CHECKSUM))  # an older checkpoint, without one: torch's own checks
    with pytest.raises(store.ChecksumMismatch, match=f"checkpoint {state_dir}/{STATE_FILE} cannot be read"):
        load_state(state_dir)
    _damage(phema.path(store.MANIFEST), 0, b"\x00")
    with pytest.raises(store.ChecksumMismatch, match="manifest .* is damaged .*--force phema"):
        dag.run(cfg, until="pairs", executor=InlineExecutor())


def test_repair_of_a_whole_stage_remakes_it_and_keeps_downstream_when_the_bytes_are_the_same(tmp_path):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="phema", executor=InlineExecutor())
    teacher, phema = _artifact(cfg, "teacher"), _artifact(cfg, "phema")
    before = teacher.manifest()["checksums"]
    phema_made = phema.manifest()["created"]
    _damage(teacher.path("network.safetensors"), 200, b"\x00" * 16)
    assert integrity.repair(cfg, ["teacher", "encode"], InlineExecutor()) == []  # CPU runs are bitwise deterministic
    after = teacher.manifest()["checksums"]
    assert {r for r in after if after[r] != before[r]} <= {"metrics.jsonl", *(r for r in after if r.startswith("metrics/"))}
    assert phema.manifest()["created"] == phema_made  # phema's input is the same: it is kept
    assert integrity.verify(cfg, executor=InlineExecutor())[1] == []


def test_a_repaired_piece_with_other_bytes_remakes_the_stages_downstream(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    dag.run(cfg, until="teacher", executor=InlineExecutor())
    shard = _artifact(cfg, "encode").path("shards/data-000001.tar")
    os.truncate(shard, 512)
    encoded = E._encoded_samples

    def other_bytes(*args):  # as a GPU's encoder might give: not bitwise the same as before
        for sample in encoded(*args):
            yield {**sample, "npy": sample["npy"] + 1e-3}

    monkeypatch.setattr(E, "_encoded_samples", other_bytes)
    stale = integrity.repair(cfg, ["encode"], InlineExecutor())
    assert stale == ["probe", "refstats", "teacher", "phema", "pairs", "distill", "evaluate"]
    assert _artifact(cfg, "encode").state() == "done" and _artifact(cfg, "teacher").state() == "missing"
    assert integrity.verify(cfg, ["encode"], InlineExecutor())[1] == []


@pytest.mark.slow
def test_under_ray_a_damaged_shard_is_the_same_one_line_error_from_a_task_and_from_ray_train(ray_session, tmp_path):
    cfg = C.load_config("ci", [s for s in SMALL if s != "executor=inline"] + ["teacher.max_failures=0"],
                        storage=str(tmp_path))
    dag.run(cfg, until="encode", executor=InlineExecutor())
    shard = _artifact(cfg, "encode").path("shards/data-000000.tar")
    npy = next(m for m in tarfile.open(shard).getmembers() if m.name.endswith(".npy"))
    _damage(shard, npy.offset_data + 128, b"\x00" * 4)
    for stage in ("probe", "teacher"):  # map tasks; a Ray Train worker
        with pytest.raises(store.ChecksumMismatch) as error:
            dag.run(cfg, only=[stage], executor=RayExecutor())
        assert str(error.value).startswith(f"{shard} is damaged: its bytes are not those") and "\n" not in str(error.value)

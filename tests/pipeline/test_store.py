import json
import logging
import uuid

import pytest
import xxhash

from pipeline import store


def _lifecycle(root: str) -> None:
    art = store.Store(root).artifact("encode", "0123456789abcdef")
    assert art.state() == "missing" and art.manifest() is None
    with art.open("shards/data-000000.tar", "wb") as f:
        f.write(b"x" * 100)
    art.commit_piece("shard-000000", {"count": 3}, files=["shards/data-000000.tar"])
    assert art.state() == "partial" and art.piece_done("shard-000000") and not art.piece_done("shard-000001")
    assert art.read_piece("shard-000000") == {"count": 3}
    digest = xxhash.xxh3_64(b"x" * 100).hexdigest()
    assert art.read_json("_pieces/shard-000000.json")["checksums"] == {"shards/data-000000.tar": digest}
    manifest = art.commit({"stage": "encode", "metrics": {"a": 1}})
    assert art.state() == "done"
    assert manifest["files"]["shards/data-000000.tar"] == 100
    assert manifest["checksums"]["shards/data-000000.tar"] == digest and set(manifest["checksums"]) == set(manifest["files"])
    assert "manifest.json" not in manifest["files"]
    assert manifest["size_bytes"] == 100 + manifest["files"]["_pieces/shard-000000.json"]
    assert set(manifest["versions"]) >= {"onestep", "torch", "ray", "python"}
    assert art.manifest() == manifest
    art.delete()
    assert art.state() == "missing"


def test_artifact_lifecycle_on_memory():
    _lifecycle(f"memory://store-{uuid.uuid4().hex}")


def test_artifact_lifecycle_on_local_disk(tmp_path):
    _lifecycle(str(tmp_path / "artifacts"))
    _lifecycle(f"file://{tmp_path}/other")


def test_artifact_lifecycle_on_s3(s3_bucket):
    _lifecycle(f"{s3_bucket}/store-{uuid.uuid4().hex}")


def test_listing_and_ranges_on_s3(s3_bucket):
    root = f"{s3_bucket}/list-{uuid.uuid4().hex}"
    for name in ("b/2.png", "a/1.png", "a/sub/3.jpg"):
        store.write_bytes(f"{root}/{name}", b"0123456789")
    dirs, files = store.list_dir(root)
    assert dirs == [f"{root}/a", f"{root}/b"] and files == []
    assert store.walk_files(root) == [f"{root}/a/1.png", f"{root}/a/sub/3.jpg", f"{root}/b/2.png"]
    assert store.read_range(f"{root}/a/1.png", 3, 4) == b"3456"


def test_unwritable_storage_is_a_clear_error(s3_bucket):
    with pytest.raises(ValueError, match="cannot write to storage s3://no-such-bucket-here.*bucket exists"):
        store.check_writable("s3://no-such-bucket-here/run")
    store.check_writable(f"{s3_bucket}/run")


def test_urls_are_normalised_and_redacted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store.Store("./artifacts").root == str(tmp_path / "artifacts")
    assert store.Store("s3://bucket/run/").root == "s3://bucket/run"
    assert store.redact("s3://KEY:SECRET@bucket/x") == "s3://bucket/x"


def test_an_orphaned_requests_dropped_connection_is_logged_at_debug_and_other_loop_errors_are_not_hidden(caplog):
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        store._quiet_orphaned_requests(loop)
        caplog.set_level(logging.DEBUG)
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": ConnectionResetError("Cannot write to closing transport")})
        dropped = [r for r in caplog.records if "Cannot write to closing transport" in r.getMessage()]
        assert [(r.name, r.levelno) for r in dropped] == [("onestep", logging.DEBUG)]
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": ValueError("a bug")})
        assert any(r.name == "asyncio" and r.levelno == logging.ERROR and "never retrieved" in r.getMessage()
                   for r in caplog.records)
    finally:
        loop.close()

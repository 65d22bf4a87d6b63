"""The resampled reader keeps shards it has parsed: the same batches as parsing every draw, each shard
parsed once while it fits, the least recently used dropped when it does not."""

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.shards import ParsedShards, reader, shard_name, write_shard

PER_SHARD, NUM_SHARDS = 10, 3


@pytest.fixture
def urls(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(NUM_SHARDS):
        url = str(tmp_path / shard_name("data", s))
        write_shard(url, ({"key": f"{s * PER_SHARD + i:08d}", "npy": rng.standard_normal((3, 4, 4)).astype(np.float16),
                           "cls": i % 5, "src": "test"} for i in range(PER_SHARD)))
        out.append(url)
    return out


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The URL of every shard the reader parses from its tar."""
    seen, expand = [], shards.tar_file_expander

    def counting(data, **kwargs):
        for source in data:
            seen.append(source["url"])
            yield from expand([source], **kwargs)

    monkeypatch.setattr(shards, "tar_file_expander", counting)
    return seen


def _batches(urls: list[str], keep: int, monkeypatch) -> list[tuple[bytes, list[int]]]:
    monkeypatch.setattr(shards, "RESAMPLED_KEEP_BYTES", keep)
    read = reader(urls, 8, seed=3, shuffle_buffer=12, resampled=True, num_batches=40)
    return [(x.numpy().tobytes(), y.tolist()) for x, y in read]


def test_kept_shards_give_the_batches_of_a_parse_per_draw_and_are_parsed_once(urls, parses, monkeypatch):
    fresh = _batches(urls, 0, monkeypatch)
    draws = len(parses)
    assert draws > 3 * NUM_SHARDS  # 320 samples from shards of 10: every shard drawn many times
    parses.clear()
    kept = _batches(urls, 1 << 20, monkeypatch)
    assert kept == fresh
    assert sorted(parses) == sorted(urls)  # each shard's tar read once


def test_a_budget_of_one_shard_keeps_the_last_drawn_and_still_gives_the_same_batches(urls, parses, monkeypatch):
    fresh = _batches(urls, 0, monkeypatch)
    draws = len(parses)
    parses.clear()
    one_shard = 2 * PER_SHARD * 200  # more than one shard's bytes (10 arrays of 3x4x4 float16 and fields), under two
    assert _batches(urls, one_shard, monkeypatch) == fresh
    assert NUM_SHARDS < len(parses) < draws  # a shard drawn twice in a row is not parsed again


def test_the_budget_drops_the_least_recently_used_shard():
    kept = ParsedShards(budget=25)
    kept.keep("a", [{"npy": b"x" * 10}])
    kept.keep("b", [{"npy": b"x" * 10}])
    assert list(kept.samples("a")) == [{"npy": b"x" * 10}]  # a is now the most recently used
    kept.keep("c", [{"npy": b"x" * 10}])
    assert "a" in kept and "c" in kept and "b" not in kept and kept.size == 20
    kept.keep("d", [{"npy": b"x" * 30}])  # larger than the whole budget: not kept, nothing dropped
    assert "d" not in kept and kept.size == 20

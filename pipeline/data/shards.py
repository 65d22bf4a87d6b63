"""WebDataset shard I/O: deterministic writing, and the reader every training stage uses.

A sample is keyed by its dataset index and holds `npy` (the array), `cls` (class index)
and `src` (source id). Shards are named `{prefix}-{shard:06d}.tar`.
"""

from __future__ import annotations

import functools
import io
import random
from concurrent.futures import Future, ThreadPoolExecutor
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline import store


def shard_name(prefix: str, shard: int) -> str:
    return f"{prefix}-{shard:06d}.tar"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(url: str, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples ({'key', 'npy', 'cls', 'src', ...}) to one tar; byte-identical for equal input.

    Extra array fields (e.g. 'noise', 'target') are written as `{name}.npy`. Returns the count.
    """
    count = 0
    with store.open_url(url, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)  # an int: a float mtime adds a pax header
        for sample in samples:
            writer.write(_encode_sample(sample))
            count += 1
        writer.close()
    return count


def _encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"__key__": sample["key"]}
    for name, value in sample.items():
        if name == "key":
            continue
        if isinstance(value, np.ndarray):
            out[name if name == "npy" else f"{name}.npy"] = _npy_bytes(value)
        else:
            out[name] = str(value).encode()
    return out


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of an .npy file from its first bytes (shards repeat a header)."""
    buf = io.BytesIO(header)
    if np.lib.format.read_magic(buf) != (1, 0):
        raise ValueError("unsupported .npy version in shard (expected 1.0, as np.save writes)")
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    assert not fortran and not dtype.hasobject, "shards hold C-ordered plain arrays"
    return dtype, shape, buf.tell()


def load_npy(data: bytes) -> np.ndarray:
    """np.load for our shards' arrays without re-parsing the same header for every sample."""
    header_len = int.from_bytes(data[8:10], "little") + 10  # .npy format version 1.0
    dtype, shape, offset = _npy_header(bytes(data[:header_len]))
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def decode_sample(sample: dict[str, Any], fields: tuple[str, ...] = ("npy",)) -> tuple[Any, ...]:
    """(array of each field..., class index); a sample that does not decode is a damaged shard."""
    try:
        return (*(load_npy(sample[f]) for f in fields), int(sample["cls"]))
    except (KeyError, ValueError, TypeError) as e:
        url = sample.get("__url__", "")
        raise store.ChecksumMismatch(f"sample {sample.get('__key__')!r} of shard {store.redact(url) or '?'} cannot be "
                                     f"decoded ({type(e).__name__}: {e}): the shard is damaged; "
                                     f"{store.damage_hint(url)}") from e


def _collate(batch: list[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
    *arrays, labels = zip(*batch)
    return (*(torch.from_numpy(np.stack(a)) for a in arrays), torch.tensor(labels, dtype=torch.int64))


RESAMPLED_KEEP_BYTES = 512 << 20  # a resampled reader keeps up to this much of its shards parsed
_VERIFIED: set[str] = set()  # shards whose checksum this process has checked


def _missing(url: str) -> store.ChecksumMismatch:
    return store.ChecksumMismatch(f"shard {store.redact(url)} is missing; {store.damage_hint(url)}")


def _checked_bytes(url: str) -> bytes:
    """A shard of a committed artifact, whole, checked against the checksum its manifest records."""
    try:
        data = store.read_bytes(url)  # raises ChecksumMismatch naming the file and the fix
    except FileNotFoundError:
        raise _missing(url) from None
    _VERIFIED.add(url)
    return data


def _stream(source: dict[str, Any], fetched: Future | None) -> Iterator[dict[str, Any]]:
    url = source["url"]
    if fetched is not None:
        yield dict(source, stream=io.BytesIO(fetched.result()))
        return
    try:
        f = store.open_url(url)
    except FileNotFoundError:
        raise _missing(url) from None
    with f:
        yield dict(source, stream=f)


def _opened(sources: Iterable[dict[str, Any]], kept: Container[str] = ()) -> Iterator[dict[str, Any]]:
    """Each shard opened. The first time this process reads a shard of a committed artifact, it is read
    whole and checked against its manifest's checksum before any sample of it is used; a thread does
    that for the next shard while this one's samples are parsed (the hash and the read release the GIL).
    A shard whose URL is in `kept` (parsed already) comes through as its source, unopened."""
    with ThreadPoolExecutor(1, thread_name_prefix="shard-check") as pool:
        pending = None
        for source in sources:
            url = source["url"]
            check = url not in kept and url not in _VERIFIED and store.recorded_checksum(url) is not None
            current = (source, pool.submit(_checked_bytes, url) if check else None)
            if pending is not None:
                yield from _kept_or_stream(*pending, kept)
            pending = current
        if pending is not None:
            yield from _kept_or_stream(*pending, kept)


def _kept_or_stream(source: dict[str, Any], fetched: Future | None, kept: Container[str]) -> Iterator[dict[str, Any]]:
    if source["url"] in kept:  # decided now: the shard before may have just been kept
        yield source
    else:
        yield from _stream(source, fetched)


def _damaged(exn: Exception) -> bool:
    """WebDataset's handler: an unreadable shard is an error that names it and the fix."""
    if isinstance(exn, store.ChecksumMismatch):
        raise store.ChecksumMismatch(exn.args[0]) from None
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and "/" in a), "")
    message = exn.args[0] if exn.args else ""
    raise store.ChecksumMismatch(f"shard {store.redact(url) or '?'} cannot be read ({type(exn).__name__}: {message}): "
                                 f"it is damaged; {store.damage_hint(url)}") from exn


def _tar_samples(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """WebDataset's tarfile_to_samples, through `_opened` (checksums) and `_damaged` (clear errors)."""
    files = tar_file_expander(_opened(sources), handler=_damaged)
    return group_by_keys(files, handler=_damaged)


class ParsedShards:
    """Shards' samples as parsed, kept up to `budget` bytes (least recently used first out): a resampled
    reader opens each shard again and again, and WebDataset parses a tar in Python, member by member
    (docs/benchmarks.md). The samples come out as a fresh parse would give them."""

    def __init__(self, budget: int) -> None:
        self.budget, self.size = budget, 0
        self.shards: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()

    def __contains__(self, url: object) -> bool:
        return url in self.shards

    def samples(self, url: str) -> Iterator[dict[str, Any]]:
        self.shards.move_to_end(url)
        return (dict(sample) for sample in self.shards[url][0])

    def keep(self, url: str, samples: list[dict[str, Any]]) -> None:
        size = sum(len(v) for sample in samples for v in sample.values() if isinstance(v, bytes))
        if url in self.shards or size > self.budget:
            return
        while self.size + size > self.budget:
            self.size -= self.shards.popitem(last=False)[1][1]
        self.shards[url] = (samples, size)
        self.size += size

    def __call__(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`_tar_samples` with every shard parsed once while it stays kept."""
        for opened in _opened(sources, kept=self):
            url = opened["url"]
            if "stream" not in opened:
                yield from self.samples(url)
                continue
            parsed = []
            for sample in group_by_keys(tar_file_expander([opened], handler=_damaged), handler=_damaged):
                parsed.append(sample)
                yield dict(sample)
            self.keep(url, parsed)


def iterate_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in order: {'__key__', 'npy' | 'noise.npy' ..., 'cls', ...}."""
    return iter(wds.DataPipeline(wds.SimpleShardList([url]), _tar_samples))


def read_samples(url: str, wanted: set[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dataset indices [n], positions in the shard [n], stored arrays [n, ...], labels [n]) of the
    samples of one encode shard whose index (key) is in `wanted` (None: all), in shard order."""
    indices, positions, arrays, labels = [], [], [], []
    for position, sample in enumerate(iterate_samples(url)):
        index = int(sample["__key__"])
        if wanted is None or index in wanted:
            array, label = decode_sample(sample)
            indices.append(index)
            positions.append(position)
            arrays.append(array)
            labels.append(label)
    if not arrays:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0,)), np.zeros(0, np.int64)
    return np.array(indices), np.array(positions), np.stack(arrays), np.array(labels)


def _split_rank(urls: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    return islice(urls, rank, None, world_size)


def _loader_worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def reader(
    urls: list[str],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    num_batches: int | None = None,
    fields: tuple[str, ...] = ("npy",),
) -> wds.DataPipeline:
    """Batches of (stored array [B, C, H, W] float16, label [B] int64); with `fields`, one
    array per field (e.g. ("noise.npy", "target.npy") for regression pairs), then the labels.

    Plain mode: rank r reads shards r, r + world_size, ...; loader workers split those; every
    sample once. Resampled mode: every rank draws shards at random forever (seeded by seed and
    rank); `num_batches` then gives all ranks the same number of batches, as DDP needs; shards drawn
    again come from memory while they fit in RESAMPLED_KEEP_BYTES (`ParsedShards`).
    """
    if not urls:
        raise ValueError("no shards to read: the encode artifact lists no shards")
    if resampled:
        shards: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True,
                                                 worker_seed=partial(_loader_worker_seed, rank))]
    else:
        shards = [wds.SimpleShardList(urls), partial(_split_rank, rank=rank, world_size=world_size),
                  wds.split_by_worker]
    stages = [*shards, ParsedShards(RESAMPLED_KEEP_BYTES) if resampled else _tar_samples]
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer,
                                  rng=random.Random(seed * 7919 + rank)))
    stages += [wds.map(partial(decode_sample, fields=fields)), wds.batched(batch_size, collation_fn=_collate, partial=not resampled)]
    pipeline = wds.DataPipeline(*stages)
    return pipeline.with_epoch(num_batches) if num_batches is not None else pipeline

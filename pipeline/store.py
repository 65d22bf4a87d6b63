"""Artifact storage: the only module that talks to fsspec.

An artifact is a folder `{storage}/{stage}/{key}/`. Its files are written first and
`manifest.json` last; an artifact exists only if its manifest does. Long stages commit
pieces (a shard, a checkpoint) with a small marker under `_pieces/` written after the
piece itself, so a rerun after a crash redoes only the missing pieces. No step relies on
an atomic rename, which object stores do not have.

URLs are local paths, `file://`, `memory://`, `s3://`, `gs://` or any fsspec protocol.
Credentials come from the environment (AWS_*, GOOGLE_*, FSSPEC_S3_ENDPOINT_URL, ...),
never from config files, and never reach a manifest or a log.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import xxhash
from fsspec.core import url_to_fs

MANIFEST = "manifest.json"
PIECES = "_pieces"


def normalize_url(url: str) -> str:
    """Absolute local paths (workers may run elsewhere); other URLs unchanged, no trailing '/'."""
    if "://" not in url:
        return str(Path(url).expanduser().resolve())
    return url.rstrip("/")


def redact(url: str) -> str:
    """A URL fit for logs: any user:password@ part removed."""
    return re.sub(r"//[^/@]+@", "//", url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if protocol(url) in ("file", "memory"):
        return url_to_fs(url)
    # no listings cache: other processes write the same folders (Ray tasks, a second driver), and a
    # cached listing would hide their files (a manifest another run committed, a lease)
    fs, path = url_to_fs(url, use_listings_cache=False)
    if getattr(fs, "async_impl", False):
        _quiet_orphaned_requests(fs.loop)
    return fs, path


@functools.cache
def _quiet_orphaned_requests(loop: asyncio.AbstractEventLoop) -> None:
    """When the object store drops a connection mid-request, aiohttp leaves a task behind whose write
    failed; the request's own error reaches the caller (and the run says what to do), so the orphan's
    copy of it is logged at debug level instead of as a traceback on stderr."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if isinstance(context.get("exception"), ConnectionError):
            logging.getLogger("onestep").debug("dropped connection: %s", context.get("exception"))
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _to_url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def open_url(url: str, mode: str = "rb") -> BinaryIO:
    """Open one file for reading or writing; parent folders are created for local writes. What is
    written is checksummed on the way (see `ChecksumWriter`)."""
    fs, path = _fs(url)
    if "w" in mode and protocol(url) == "file":
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    f = fs.open(path, mode)
    return ChecksumWriter(f, url) if "w" in mode else f


# --- checksums ---------------------------------------------------------------------------------
# Every file written through this module is checksummed (xxh3-64, ~10 GB/s) as it is written; the
# (size, checksum) waits in `_WRITTEN` until a piece marker or the manifest of its artifact takes it.

CHECKSUM = "xxh3_64"
_WRITTEN: dict[str, tuple[int, str]] = {}  # URL -> (size, checksum) of files this process wrote


class ChecksumWriter:
    """A writable file that hashes what passes through it and records it in `_WRITTEN` on close."""

    def __init__(self, f: Any, url: str) -> None:
        self._f, self._url, self._hash, self._size = f, url, xxhash.xxh3_64(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += len(view)
        return self._f.write(data)

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            _WRITTEN[self._url] = (self._size, self._hash.hexdigest())

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self) -> ChecksumWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.close()
        else:  # a failed write is not recorded as written
            self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class ChecksumMismatch(ValueError):
    """A file's bytes are not those its artifact's manifest recorded."""


_ARTIFACT_FILE = re.compile(r"^(.*/[a-z]+/[0-9a-f]{16})/(.+)$")  # {storage}/{stage}/{key}/{file}
_STAGE_KEY = re.compile(r"/([a-z]+)/[0-9a-f]{16}(?=/|$)")


def _stage_of(url: str) -> str:
    """The stage of an artifact's URL, or of a file in it ("STAGE" when it is neither)."""
    stages = _STAGE_KEY.findall(url)
    return stages[-1] if stages else "STAGE"


_RECORDED: dict[str, dict[str, str]] = {}  # committed artifact URL -> its manifest's checksums


def _recorded_checksums(artifact_url: str, fresh: bool) -> dict[str, str]:
    if fresh or artifact_url not in _RECORDED:
        try:
            with open_url(join(artifact_url, MANIFEST)) as f:  # not read_bytes: that checks against this
                _RECORDED[artifact_url] = json.loads(f.read()).get("checksums", {})
        except (FileNotFoundError, ValueError):  # not committed (yet), or a damaged manifest: not remembered
            return {}
    return _RECORDED[artifact_url]


def recorded_checksum(url: str, fresh: bool = False) -> str | None:
    """The checksum that the manifest of a file's artifact records for it; None before the artifact is
    committed, and for files outside artifacts."""
    match = _ARTIFACT_FILE.match(url)
    if match is None:
        return None
    return _recorded_checksums(match[1], fresh).get(match[2])


def check_checksum(url: str, digest: str) -> None:
    """Raise a clear error when a committed file's bytes (hashed as it was read) are not those recorded."""
    if recorded_checksum(url) in (None, digest):
        return
    expected = recorded_checksum(url, fresh=True)  # the artifact may have been remade since it was cached
    if expected not in (None, digest):
        raise ChecksumMismatch(f"{redact(url)} is damaged: its bytes are not those its artifact's manifest recorded "
                               f"(checksum {digest}, recorded {expected}); {damage_hint(url)}")


def xxh3(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def checksum(url: str) -> tuple[int, str]:
    """(size, checksum) of a stored file, streamed."""
    digest, size = xxhash.xxh3_64(), 0
    with open_url(url) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _claim(prefix: str) -> dict[str, tuple[int, str]]:
    """(size, checksum) of the files this process wrote under `prefix` (relative names), taken out of `_WRITTEN`."""
    prefix = prefix.rstrip("/") + "/"
    return {url[len(prefix):]: _WRITTEN.pop(url) for url in [u for u in _WRITTEN if u.startswith(prefix)]}


def damage_hint(url: str) -> str:
    """The fix for a damaged file of an artifact `{storage}/{stage}/{key}/...`."""
    stage = _stage_of(url)
    return (f"run `onestep verify {stage}` (same config) to list the damaged files, then `onestep run --repair "
            f"{stage}` to remake them (or `--force {stage}`)")


def read_bytes(url: str) -> bytes:
    """A whole file; a committed artifact's file is checked against its manifest's checksum."""
    with open_url(url, "rb") as f:
        data = f.read()
    check_checksum(url, xxh3(data))
    return data


def write_bytes(url: str, data: bytes) -> None:
    with open_url(url, "wb") as f:
        f.write(data)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write a small file only if none is there; False when one is. Atomic on local paths and NFS
    (link(2)) and on S3 (If-None-Match: *); other stores use fsspec's check-then-create, which leaves a
    window of one round trip in which two writers can both succeed."""
    fs, path = _fs(url)
    if protocol(url) == "file":
        return _link_exclusive(path, data)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _link_exclusive(path: str, data: bytes) -> bool:
    """`create_exclusive` on a local path: the whole file is written under a name of this process and
    thread, then hard-linked to `path`, which fails if `path` exists. The folder is made again if another
    process removed it meanwhile (an empty lease folder, see `remove_empty_folder`)."""
    partial = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(partial, "wb") as f:
                f.write(data)
            break
        except FileNotFoundError:  # the folder was removed between makedirs and open
            continue
    try:
        os.link(partial, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(partial)
    return True


def read_range(url: str, offset: int, size: int) -> bytes:
    fs, path = _fs(url)
    return fs.read_block(path, offset, size)


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = _fs(url)
    return fs.isdir(path)


def list_dir(url: str) -> tuple[list[str], list[str]]:
    """(sub-folder URLs, file URLs) directly under `url`, each sorted."""
    fs, path = _fs(url)
    dirs, files = [], []
    for entry in fs.ls(path, detail=True):
        target = dirs if entry["type"] == "directory" else files
        target.append(_to_url(fs, entry["name"].rstrip("/"), url))
    return sorted(dirs), sorted(files)


def walk_files(url: str) -> list[str]:
    """Every file under `url`, recursively, sorted."""
    fs, path = _fs(url)
    return sorted(_to_url(fs, p, url) for p in fs.find(path))


def sizes(url: str) -> dict[str, int]:
    """Relative path -> size in bytes of every file under `url`."""
    fs, path = _fs(url)
    root = fs._strip_protocol(path).rstrip("/")
    found = fs.find(root, detail=True)
    return {name[len(root) + 1 :]: int(info["size"] or 0) for name, info in sorted(found.items())}


def remove(url: str) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_empty_folder(url: str) -> None:
    """Remove a local folder if it is empty, and leave it if another process put a file in it meanwhile
    (object stores have no folders: nothing to do there)."""
    if protocol(url) == "file":
        try:
            os.rmdir(_fs(url)[1])
        except OSError:  # not empty, or already gone
            pass


def copy_to_local(url: str, local_dir: str) -> str:
    """Copy a file or folder at `url` into `local_dir` (once); returns the local path."""
    fs, path = _fs(url)
    target = os.path.join(local_dir, os.path.basename(path.rstrip("/")))
    if not os.path.exists(target):
        partial = f"{target}.partial-{os.getpid()}"  # per process: tasks on one node may race here
        shutil.rmtree(partial, ignore_errors=True)
        fs.get(path, partial, recursive=fs.isdir(path))
        try:
            os.replace(partial, target)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def cached_copy(url: str, kind: str) -> str:
    """A local copy of the file or folder at `url` (weights for offline clusters), made once
    per URL under $XDG_CACHE_HOME/onestep/{kind}/."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = base / "onestep" / kind / hashlib.sha256(url.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    return copy_to_local(url, str(target))


def local_file(spec: str, kind: str) -> str:
    """A weights file as a local path: a path as is (it must exist), an fsspec URL through
    `cached_copy`. Raises OSError (FileNotFoundError for a missing path), credentials redacted."""
    if "://" in spec:
        try:
            return cached_copy(spec, kind)
        except Exception as e:  # no such object, no credentials, an unknown protocol
            raise OSError(f"cannot copy {redact(spec)} ({type(e).__name__}: {redact(str(e))})") from e
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    return path


# Probes: a filesystem of their own, short timeouts and one attempt, so that a wrong endpoint fails
# in seconds (botocore and s3fs retry for minutes); stages keep the patient default filesystem.
PROBE_TIMEOUT_S = 5
_CREDENTIALS = {
    "s3": "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
          "or run where an instance role provides them",
    "gs": "Set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
}


def _probe_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    options: dict[str, Any] = {}
    if protocol(url) in ("s3", "s3a"):
        user = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})  # e.g. addressing_style
        options["config_kwargs"] = {**user, "connect_timeout": PROBE_TIMEOUT_S,
                                    "read_timeout": PROBE_TIMEOUT_S, "retries": {"total_max_attempts": 1}}
    fs, path = url_to_fs(url, skip_instance_cache=True, **options)
    if hasattr(fs, "retries"):  # s3fs's and gcsfs's own retry loop, around the client's
        fs.retries = 1
    return fs, path


def _storage_error(url: str, doing: str, fs: fsspec.AbstractFileSystem, path: str, e: Exception) -> ValueError:
    """A failed probe of `url` as a one-line error: what is wrong, and the fix."""
    proto = protocol(url)
    what = f"cannot {doing} storage {redact(url)}"
    kinds = {c.__name__ for c in type(e).__mro__}  # botocore's classes, without importing it
    if kinds & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return ValueError(f"{what}: no credentials. {_CREDENTIALS.get(proto, 'Set them in the environment')}.")
    if isinstance(e, PermissionError):
        return ValueError(f"{what}: access denied ({e}). Grant these credentials read and write access "
                          "to it, or choose another --storage.")
    if proto == "file":
        return ValueError(f"{what}: {type(e).__name__}: {e}. Choose a folder you can write as --storage.")
    if isinstance(e, FileNotFoundError):
        bucket = path.split("/")[0]
        hint = ("; if the bucket exists, check that FSSPEC_S3_ENDPOINT_URL names its endpoint"
                if proto in ("s3", "s3a") else "")
        return ValueError(f"{what}: the bucket {bucket} does not exist. Create it, or fix --storage{hint}.")
    if kinds & {"ConnectionError", "TimeoutError", "HTTPClientError", "ClientConnectionError"}:
        endpoint = redact(getattr(fs, "endpoint_url", None) or f"the default {proto} endpoint")
        check = "the URL (--storage), FSSPEC_S3_ENDPOINT_URL" if proto in ("s3", "s3a") else "the URL (--storage)"
        return ValueError(f"{what}: no connection to {endpoint} ({type(e).__name__}). Check {check} and the network.")
    return ValueError(f"{what}: {type(e).__name__}: {e}. Check the URL (--storage), that the bucket exists, "
                      "and the credentials in the environment.")


_CONNECTION_ERRORS = {"ConnectionError", "EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                      "ReadTimeoutError", "ServerDisconnectedError", "ClientOSError", "TimeoutError"}


def connection_lost(e: BaseException, url: str, what: str) -> ValueError | None:
    """A store that stopped answering in the middle of `what`, as a one-line error with the fix; None
    for any other failure. Looks through the exception's chain (and Ray's wrappers, which subclass it)."""
    seen = e
    while seen is not None:
        names = {c.__name__ for c in type(seen).__mro__}
        if names & _CONNECTION_ERRORS:
            return ValueError(f"{what}: lost the connection to the storage {redact(url)} ({type(seen).__name__}: "
                              f"{redact(str(seen))[:200]}). Nothing of it was committed, and what it saved is kept: "
                              "rerun the same command once the storage answers, and it goes on from there")
        seen = seen.__cause__ or seen.__context__
    return None


def check_storage(url: str) -> None:
    """Fail within seconds, naming the URL and the fix, when the storage cannot be read: an
    unreachable endpoint, no credentials, no such bucket, access denied. Writes nothing."""
    fs, path = _probe_fs(url)
    try:
        try:
            fs.ls(path)
        except FileNotFoundError:  # no root folder yet, or no bucket: only the second fails this
            fs.find(path)
    except Exception as e:
        raise _storage_error(url, "read", fs, path, e) from e


def check_writable(url: str) -> None:
    """Fail within seconds, naming the URL and the fix, when the storage cannot be written:
    writes and removes a probe file, named for this call alone so that runs probing the same
    storage at once never remove each other's (folders are made for local paths only: on S3 it
    would create the bucket)."""
    fs, path = _probe_fs(url)
    probe = join(path, f"_onestep_write_probe-{uuid.uuid4().hex}")
    try:
        if protocol(url) == "file":
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:
        raise _storage_error(url, "write to", fs, path, e) from e


def pyarrow_filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for Ray Train's storage: native for local paths, fsspec otherwise."""
    import pyarrow.fs as pafs

    if protocol(url) == "file":
        return pafs.LocalFileSystem(), _fs(url)[1]
    fs, path = _fs(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for dist in ("onestep", "torch", "ray"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass(frozen=True)
class Artifact:
    """One stage's output folder. Picklable: it carries only its URL."""

    url: str

    def path(self, relpath: str) -> str:
        return join(self.url, relpath)

    def open(self, relpath: str, mode: str = "rb") -> BinaryIO:
        return open_url(self.path(relpath), mode)

    def exists(self, relpath: str) -> bool:
        return exists(self.path(relpath))

    def write_json(self, relpath: str, obj: Any) -> None:
        write_bytes(self.path(relpath), json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_bytes(self, relpath: str) -> bytes:
        return read_bytes(self.path(relpath))

    def read_json(self, relpath: str) -> Any:
        data = read_bytes(self.path(relpath))
        try:
            return json.loads(data)
        except ValueError as e:
            raise ChecksumMismatch(f"{redact(self.path(relpath))} is damaged ({e}); {damage_hint(self.path(relpath))}") from None

    # Pieces: a piece is complete only once its marker exists (written after the piece).
    def piece_done(self, name: str) -> bool:
        return self.exists(f"{PIECES}/{name}.json")

    def commit_piece(self, name: str, info: dict[str, Any], files: tuple[str, ...] | list[str] = ()) -> None:
        """The piece's marker, written after its `files`, with their checksums (taken as they were written)."""
        sums = {}
        for rel in files:
            written = _WRITTEN.pop(self.path(rel), None)
            sums[rel] = written[1] if written else checksum(self.path(rel))[1]
        self.write_json(f"{PIECES}/{name}.json", {**info, "checksums": sums})

    def read_piece(self, name: str) -> dict[str, Any]:
        """A piece's info (its checksums left out: those are the manifest's business)."""
        info = self.read_json(f"{PIECES}/{name}.json")
        info.pop("checksums", None)
        return info

    def manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(read_bytes(self.path(MANIFEST)))
            if manifest.get("manifest_checksum", _manifest_checksum(manifest)) != _manifest_checksum(manifest):
                raise ValueError("its content does not match its manifest_checksum")
            return manifest
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError) as e:  # cut or altered JSON
            raise ChecksumMismatch(f"the manifest {redact(self.path(MANIFEST))} is damaged ({e}): rerun with "
                                   f"--force {_stage_of(self.url)} to remake the artifact") from None

    def state(self) -> str:
        """'done' (manifest present), 'partial' (some files, no manifest) or 'missing'."""
        if self.exists(MANIFEST):
            return "done"
        return "partial" if exists(self.url) and sizes(self.url) else "missing"

    def checksums(self, files: dict[str, int]) -> dict[str, str]:
        """Each file's checksum: from the piece markers and what this process wrote (both taken as the files
        were written), else read back once (files written outside this module or by other processes:
        Ray Train's checkpoints, a training worker's network)."""
        known: dict[str, str] = {}
        for rel in files:
            if rel.startswith(PIECES + "/") and rel.endswith(".json"):
                known.update(self.read_json(rel).get("checksums", {}))
        known.update({rel: digest for rel, (size, digest) in _claim(self.url).items() if files.get(rel) == size})
        return {rel: known[rel] if rel in known else checksum(self.path(rel))[1] for rel in files}

    def check_sizes(self) -> None:
        """Before a stage uses this artifact: its files are there with the sizes its manifest lists (one
        listing; contents are checked as they are read)."""
        manifest = self.manifest() or {}
        listed = manifest.get("files", {})
        found = sizes(self.url)
        bad = [f"{rel} ({'missing' if rel not in found else f'{found[rel]} bytes, the manifest says {size}'})"
               for rel, size in listed.items() if found.get(rel) != size]
        if bad:
            raise ChecksumMismatch(f"the {manifest.get('stage', 'upstream')} artifact {redact(self.url)} is damaged: "
                                   f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: {damage_hint(self.url + '/')}")

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write `manifest.json` last, listing every file already written with its size and checksum."""
        files = {p: s for p, s in sizes(self.url).items() if p != MANIFEST}
        full = {
            **manifest,
            "files": files,
            "checksums": self.checksums(files),
            "checksum": CHECKSUM,
            "size_bytes": sum(files.values()),
            "versions": library_versions(),
            "git_commit": git_commit(),
        }
        full["manifest_checksum"] = _manifest_checksum(full)
        self.write_json(MANIFEST, full)
        return full

    def delete(self) -> None:
        remove(self.url)


@dataclass(frozen=True)
class Store:
    """The storage root: `{root}/{stage}/{key}/` artifact folders."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", normalize_url(self.root))

    def artifact(self, stage: str, key: str) -> Artifact:
        return Artifact(join(self.root, stage, key))

    def content_id(self, url: str) -> str:
        """What a URL points to, for cache keys: a file's sha256 (streamed once, then remembered in
        `{root}/_sha256/` by URL, size and the store's ETag or modification time), or for a folder the
        sha256 of its listing (relative names and sizes: its files are not read)."""
        fs, path = _fs(normalize_url(url))
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise ValueError(f"{redact(url)} does not exist") from None
        if info["type"] == "directory":
            return "listing:" + _sha256_json(sizes(url))
        stamp = {k: str(info[k]) for k in _STAMPS if info.get(k) is not None}
        memo = join(self.root, "_sha256", _sha256_json({"url": redact(url), "size": info.get("size"), **stamp})[:32] + ".json")
        try:
            return json.loads(read_bytes(memo))["sha256"]
        except (FileNotFoundError, KeyError, ValueError):
            pass
        logging.getLogger("onestep").info("hashing %s for its cache key (once: remembered in the storage)", redact(url))
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                digest.update(block)
        try:  # runs hashing the same file at once: the first to finish writes the memo, whole
            create_exclusive(memo, json.dumps({"url": redact(url), "sha256": digest.hexdigest()}).encode())
        except OSError:  # a read-only storage: hashed again next time
            pass
        return digest.hexdigest()


_STAMPS = ("ETag", "etag", "ETAG", "mtime", "LastModified", "last_modified", "Last-Modified", "updated", "generation")


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    """The manifest's own checksum: of its canonical JSON, this field left out."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    return xxh3(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

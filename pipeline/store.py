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

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
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
    return url_to_fs(url)


def _to_url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def open_url(url: str, mode: str = "rb") -> BinaryIO:
    """Open one file for reading or writing; parent folders are created for local writes."""
    fs, path = _fs(url)
    if "w" in mode and protocol(url) == "file":
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with open_url(url, "wb") as f:
        f.write(data)


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
    writes and removes a probe file (folders are made for local paths only: on S3 it would
    create the bucket)."""
    fs, path = _probe_fs(url)
    probe = join(path, "_onestep_write_probe")
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


def register_webdataset_schemes() -> None:
    """Let WebDataset (which does not use fsspec) read and write every fsspec URL.

    Must run in every process that opens shards: the driver, Ray workers, loader workers.
    """
    gopen = sys.modules.get("webdataset.gopen")
    if gopen is None:
        import webdataset.gopen as gopen
    for scheme in ("memory", "s3", "gs", "gcs", "file", "az", "abfs", "http", "https"):
        gopen.gopen_schemes[scheme] = _gopen_fsspec


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    return open_url(url, mode)


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

    def read_json(self, relpath: str) -> Any:
        return json.loads(read_bytes(self.path(relpath)))

    # Pieces: a piece is complete only once its marker exists (written after the piece).
    def piece_done(self, name: str) -> bool:
        return self.exists(f"{PIECES}/{name}.json")

    def commit_piece(self, name: str, info: dict[str, Any]) -> None:
        self.write_json(f"{PIECES}/{name}.json", info)

    def read_piece(self, name: str) -> dict[str, Any]:
        return self.read_json(f"{PIECES}/{name}.json")

    def manifest(self) -> dict[str, Any] | None:
        try:
            return self.read_json(MANIFEST)
        except FileNotFoundError:
            return None

    def state(self) -> str:
        """'done' (manifest present), 'partial' (some files, no manifest) or 'missing'."""
        if self.exists(MANIFEST):
            return "done"
        return "partial" if exists(self.url) and sizes(self.url) else "missing"

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write `manifest.json` last, listing every file already written with its size."""
        files = {p: s for p, s in sizes(self.url).items() if p != MANIFEST}
        full = {
            **manifest,
            "files": files,
            "size_bytes": sum(files.values()),
            "versions": library_versions(),
            "git_commit": git_commit(),
        }
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
        try:
            write_bytes(memo, json.dumps({"url": redact(url), "sha256": digest.hexdigest()}).encode())
        except OSError:  # a read-only storage: hashed again next time
            pass
        return digest.hexdigest()


_STAMPS = ("ETag", "etag", "ETAG", "mtime", "LastModified", "last_modified", "Last-Modified", "updated", "generation")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

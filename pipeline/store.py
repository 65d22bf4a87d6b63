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


def check_writable(url: str) -> None:
    """Fail fast, naming the URL and the fix, when the storage cannot be written."""
    probe = join(url, "_onestep_write_probe")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:  # any backend error: permissions, unknown bucket, no credentials
        raise ValueError(
            f"cannot write to storage {redact(url)}: {type(e).__name__}: {e}. "
            "Check the URL (--storage), that the bucket exists, and that credentials "
            "are set in the environment (e.g. AWS_ACCESS_KEY_ID / GOOGLE_APPLICATION_CREDENTIALS)."
        ) from e


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

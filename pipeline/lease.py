"""One writer per artifact: a run holds a lease on each artifact while it writes it.

The lease of `{storage}/{stage}/{key}` is the highest generation `{key}.lease/{n:06d}.json` beside it:
{owner (a random id), host, pid, Ray job id, started, heartbeat}. Its holder rewrites it every
`lease_timeout_s / 4` while the stage runs. A run that finds a live lease waits until it is gone
(then it uses the artifact if the other run committed it, or makes it itself) or, with `wait=False`,
stops with an error naming the owner. A lease whose heartbeat is older than `lease_timeout_s`, or
whose owner ran on this host and has exited, is taken over by creating the next generation with the
store's conditional create (`store.create_exclusive`): of two runs taking it over at once, one wins,
and removes the generations it superseded. Staleness compares the heartbeat with this machine's clock:
machines' clocks must agree to well within the timeout (NTP does). A holder whose generation is no
longer the highest, or no longer there, has lost the lease (it was stalled past the timeout) and
refuses to commit. A run removes only its own generation when done: one that acquired the lease
meanwhile keeps its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import store

log = logging.getLogger("onestep")


class Busy(ValueError):
    """Another live run holds the lease (and this run was asked not to wait)."""


class LeaseLost(ValueError):
    """This run's lease was taken over while it ran: its result is not committed."""


def _ray_job_id() -> str | None:
    """The Ray job's submission id, under `ray job submit`."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return None


def describe(record: dict[str, Any]) -> str:
    job = f", Ray job {record['ray_job']}" if record.get("ray_job") else ""
    return f"owner {record.get('owner', '?')} on {record.get('host', '?')} (pid {record.get('pid', '?')}{job})"


def _exited(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError):  # another user's process, or no pid recorded
        return False
    return False


def stale(record: dict[str, Any], timeout_s: float) -> str | None:
    """Why a lease may be taken over, or None while it is live."""
    age = time.time() - float(record.get("heartbeat", time.time()))
    if age > timeout_s:
        return f"its last heartbeat is {age:.0f} s old (lease_timeout_s {timeout_s:g})"
    if record.get("host") == socket.gethostname() and _exited(record.get("pid")):
        return f"its process (pid {record['pid']}) on this host has exited"
    return None


class Lease:
    """The lease of one artifact, for one run."""

    def __init__(self, artifact_url: str, timeout_s: float) -> None:
        self.folder = artifact_url.rstrip("/") + ".lease"
        self.timeout_s = timeout_s
        self.generation = -1
        self.record = {"owner": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                       "ray_job": _ray_job_id(), "started": time.time()}
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()

    def _url(self, generation: int) -> str:
        return store.join(self.folder, f"{generation:06d}.json")

    def _generations(self) -> list[int]:
        try:
            _, files = store.list_dir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(m[1]) for f in files if (m := re.search(r"/(\d{6})\.json$", f)))

    def current(self) -> tuple[int, dict[str, Any] | None]:
        """(highest generation, its record); (-1, None) when there is no lease."""
        while True:
            generations = self._generations()
            if not generations:
                return -1, None
            try:
                return generations[-1], json.loads(store.read_bytes(self._url(generations[-1])))
            except FileNotFoundError:  # released while we looked: a lower generation may still stand
                continue
            except ValueError:  # being written: as live as a new lease
                return generations[-1], {"heartbeat": time.time()}

    def _write(self, create: bool) -> bool:
        data = json.dumps({**self.record, "heartbeat": time.time()}).encode()
        if create:
            return store.create_exclusive(self._url(self.generation), data)
        store.write_bytes(self._url(self.generation), data)
        return True

    def acquire(self, what: str, wait: bool = True) -> bool:
        """Take the lease, waiting for a live holder to let it go; returns whether it waited."""
        waited, poll = False, min(5.0, self.timeout_s / 4)
        while True:
            generation, record = self.current()
            if record is not None:
                reason = stale(record, self.timeout_s)
                if reason is None:
                    if not wait:
                        raise Busy(f"{what}: another run is writing {store.redact(self.folder[:-6])} ({describe(record)}): "
                                   "wait for it (run without --no-wait), or stop it first")
                    if not waited:
                        log.info("%s: another run is writing it (%s): waiting for it to finish", what, describe(record))
                    waited = True
                    time.sleep(poll)
                    continue
                log.warning("%s: taking over the lease of %s: %s", what, describe(record), reason)
            self.generation = generation + 1
            if self._write(create=True):
                break  # else another run created that generation first: look again
        for superseded in (g for g in self._generations() if g < self.generation):  # taken over: no longer anyone's
            store.remove(self._url(superseded))
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {what}", daemon=True)
        self._beat.start()
        return waited

    def _holder(self) -> dict[str, Any] | None:
        """None while this run holds the lease (its generation is the highest and its own), else the holder's
        record ({} when there is none)."""
        generation, record = self.current()
        if generation == self.generation and (record or {}).get("owner") == self.record["owner"]:
            return None
        return record or {}

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                with self._lock:  # never rewriting the record while check() reads it
                    if self._holder() is not None:
                        self.lost = True
                        log.error("lost the lease of %s to another run", store.redact(self.folder))
                        return
                    self._write(create=False)
            except Exception as e:  # a store hiccup: the next beat tries again
                log.warning("lease heartbeat of %s failed (%s): retrying", store.redact(self.folder), e)

    def check(self) -> None:
        """Before committing: this run still holds the lease."""
        with self._lock:
            holder = self._holder()
        if self.lost or holder is not None:
            self.lost = True
            holder = f" ({describe(holder)})" if holder else ""
            raise LeaseLost(f"the lease of {store.redact(self.folder[:-6])} was taken over by another run{holder} while "
                            "this one was stalled past lease_timeout_s: its result is not committed; rerun to use "
                            "the other run's, or raise lease_timeout_s")

    def _owns(self, generation: int) -> bool:
        try:
            return json.loads(store.read_bytes(self._url(generation))).get("owner") == self.record["owner"]
        except (FileNotFoundError, ValueError):  # removed by a run that took it over, or another's being written
            return False

    def release(self) -> None:
        """Remove this run's own generation, never another's: a run that acquired the lease meanwhile (after
        a takeover, maybe under the same generation number) keeps its own."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            if self._owns(self.generation):
                store.remove(self._url(self.generation))
            store.remove_empty_folder(self.folder)
        except Exception as e:  # the store is down (the error that brought us here, most likely)
            log.warning("could not remove the lease %s (%s): it goes stale after lease_timeout_s, or at once for a "
                        "rerun on this host", store.redact(self.folder), e)


@contextmanager
def held(artifact_url: str, timeout_s: float, what: str, wait: bool = True) -> Iterator[Lease]:
    """The artifact's lease for the duration of the block."""
    lease = Lease(artifact_url, timeout_s)
    lease.acquire(what, wait)
    try:
        yield lease
    finally:
        lease.release()

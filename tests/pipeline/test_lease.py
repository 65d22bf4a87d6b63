"""Leases: one writer per artifact, waiting, stale takeover, a lost lease refuses to commit; the store's
conditional create lets exactly one of many racing writers win (local files and the moto S3 server)."""

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from pipeline import lease, store


def _race(url: str, writers: int = 8) -> list[bool]:
    won, start = [], threading.Barrier(writers)

    def write(i: int) -> None:
        start.wait()
        won.append(store.create_exclusive(url, f"writer {i}".encode()))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_creators_wins(where, tmp_path, s3_bucket):
    root = str(tmp_path) if where == "local" else f"{s3_bucket}/race-{time.time_ns()}"
    won = _race(store.join(root, "lease", "000000.json"))
    assert sorted(won) == [False] * 7 + [True]
    assert store.read_bytes(store.join(root, "lease", "000000.json")).startswith(b"writer ")


def test_a_live_lease_makes_others_wait_or_stop(tmp_path, caplog):
    url = str(tmp_path / "teacher" / "0123456789abcdef")
    first = lease.Lease(url, timeout_s=4)  # a heartbeat every second
    assert first.acquire("teacher") is False
    with pytest.raises(lease.Busy, match=f"teacher: another run is writing {url} \\(owner {first.record['owner']} on "):
        lease.Lease(url, timeout_s=60).acquire("teacher", wait=False)
    second, waited = lease.Lease(url, timeout_s=4), []
    caplog.set_level(logging.INFO, "onestep")
    waiter = threading.Thread(target=lambda: waited.append(second.acquire("teacher")), daemon=True)
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and "waiting for it to finish" in caplog.text  # first's heartbeat keeps it live
    first.check()
    first.release()
    waiter.join(5)
    assert waited == [True] and second.current() == (0, {**second.record, "heartbeat": pytest.approx(time.time(), abs=2)})
    second.release()
    assert not store.exists(second.folder)


def test_a_stale_lease_is_taken_over_and_its_old_holder_cannot_commit(tmp_path, caplog):
    url = str(tmp_path / "pairs" / "0123456789abcdef")
    stalled = lease.Lease(url, timeout_s=0.3)
    stalled.acquire("pairs")
    stalled._stop.set()  # its heartbeat stops, as in a process frozen past the timeout
    stalled._beat.join()
    time.sleep(0.5)
    taker = lease.Lease(url, timeout_s=0.3)
    taker.acquire("pairs")
    assert taker.generation == 1 and "taking over the lease of owner" in caplog.text and "old (lease_timeout_s 0.3)" in caplog.text
    with pytest.raises(lease.LeaseLost, match="was taken over by another run .*not committed"):
        stalled.check()
    stalled.release()  # removes only its own generation
    taker.check()
    taker.release()


def test_the_lease_of_an_exited_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    url = str(tmp_path / "encode" / "0123456789abcdef")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"owner": "gone", "host": lease.socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time()}
    store.write_bytes(store.join(url + ".lease", "000000.json"), json.dumps(record).encode())
    taker = lease.Lease(url, timeout_s=3600)
    start = time.time()
    assert taker.acquire("encode", wait=False) is False and time.time() - start < 2
    assert f"its process (pid {record['pid']}) on this host has exited" in caplog.text
    taker.release()


def test_a_superseded_holder_removes_nothing_of_the_runs_after_it(tmp_path):
    """A stalled holder's generation is removed by the run that takes it over; when that run is done, the next
    one starts again at generation 0, the stalled holder's number: the stalled one, released at last, leaves
    it alone and cannot commit."""
    url = str(tmp_path / "teacher" / "0123456789abcdef")
    stalled = lease.Lease(url, timeout_s=0.3)
    stalled.acquire("teacher")
    stalled._stop.set()  # frozen past the timeout
    stalled._beat.join()
    time.sleep(0.5)
    taker = lease.Lease(url, timeout_s=0.3)
    taker.acquire("teacher")
    assert taker.generation == 1 and taker._generations() == [1]  # the superseded generation is gone
    taker.release()
    newcomer = lease.Lease(url, timeout_s=60)
    newcomer.acquire("teacher", wait=False)
    assert newcomer.generation == stalled.generation == 0
    with pytest.raises(lease.LeaseLost):
        stalled.check()
    stalled.release()
    newcomer.check()  # still its own
    newcomer.release()
    assert not store.exists(newcomer.folder)

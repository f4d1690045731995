"""The idle path of ``BlockBackend.aio_*``: a thread with nothing else to do (the vCPU while its
guest halts) runs waiting requests itself (``run_idle_request``); a request nobody claims within
``IDLE_GRACE`` goes to the workers.  Each request runs exactly once, is accounted once and
counts in flight until its completion; backends that may block (throttled, blkdebug) never
take the idle path."""

from __future__ import annotations

import threading

import pytest

from emu.block import api
from emu.block.api import BlockBackend, idle_hook
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2


@pytest.fixture
def qimg(tmp_path):
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 4 << 20)
    return p


@pytest.fixture
def backend(qimg):
    g = BlockGraph()
    blk = BlockBackend(g.open_image(qimg), "idle0")
    yield blk
    blk.close()
    g.close_all()


def test_idle_thread_runs_the_request_it_waits_for(backend, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 30.0)     # the workers must not get there first
    hook = idle_hook()
    seen = []
    backend.aio_write(8192, b"\xa5" * 4096, lambda r: seen.append((r, threading.current_thread())))
    assert backend.in_flight == 1 and seen == []
    assert hook() is True
    assert seen == [(None, threading.current_thread())]
    assert backend.in_flight == 0
    assert hook() is False                      # nothing left
    got = []
    backend.aio_read(8192, 4096, got.append)
    assert hook() is True and got == [b"\xa5" * 4096]
    stats = backend.stats
    assert stats["wr_operations"] == 1 and stats["rd_operations"] == 1 and stats["wr_bytes"] == 4096


def test_unclaimed_request_goes_to_a_worker(backend, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 0.0)
    idle_hook()
    done = threading.Event()
    threads = []
    backend.aio_write(0, b"\x11" * 512, lambda r: (threads.append(threading.current_thread()), done.set()))
    assert done.wait(30), "no worker took the request"
    assert threads[0] is not threading.current_thread()
    assert backend.read(0, 512) == b"\x11" * 512


def test_each_request_runs_once_when_idle_thread_and_workers_race(backend, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 0.0)
    hook = idle_hook()
    n = 200
    counts = [0] * n
    lock = threading.Lock()
    all_done = threading.Event()
    left = [n]

    def cb(i):
        def done(r):
            assert r is None
            with lock:
                counts[i] += 1
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()
        return done

    by_idle = 0
    for i in range(n):
        backend.aio_write(i * 512, bytes([i & 0xFF]) * 512, cb(i))
        by_idle += hook()
    while not all_done.wait(0.001):
        by_idle += hook()
    backend.drain()
    backend.resume()
    assert counts == [1] * n
    assert backend.in_flight == 0 and backend.stats["wr_operations"] == n
    assert 0 <= by_idle <= n
    assert all(backend.read(i * 512, 512) == bytes([i & 0xFF]) * 512 for i in range(n))


def test_blocking_backends_stay_off_the_idle_path(qimg, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 30.0)
    hook = idle_hook()
    other = str(tmp_path / "e.qcow2")
    create_qcow2(other, 1 << 20)
    g = BlockGraph()
    throttled = BlockBackend(g.open_image(qimg), "thr")
    throttled.set_io_limits({"iops": 1000})
    debug = BlockBackend(g.blockdev_add({"driver": "raw", "node-name": "dbg", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": other}}}), "dbg")
    assert throttled.idle_safe() is False and debug.idle_safe() is False
    try:
        for blk in (throttled, debug):
            done = threading.Event()
            blk.aio_read(0, 512, lambda r: done.set())
            assert hook() is False          # not offered to the idle thread...
            assert done.wait(30)            # ...the workers ran it at once, grace or not
    finally:
        throttled.close()
        debug.close()
        g.close_all()


def test_drain_completes_idle_path_requests(backend, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 0.0)
    idle_hook()
    results = []
    for i in range(8):
        backend.aio_write(i * 4096, b"\x5a" * 4096, results.append)
    backend.drain()             # nobody calls the hook: the workers finish them
    try:
        assert results == [None] * 8 and backend.in_flight == 0
    finally:
        backend.resume()


def test_a_polling_guest_goes_straight_to_the_workers_until_a_probe_is_claimed(backend, monkeypatch):
    """Requests no vCPU claims (a BIOS polling the used ring) make the backend skip the idle
    path; one request in IDLE_PROBE still tries it, and a claim brings the idle path back."""
    monkeypatch.setattr(api, "IDLE_PROBE", 4)
    hook = idle_hook()

    def write_and_wait(i):
        done = threading.Event()
        backend.aio_write(i * 512, bytes([i]) * 512, lambda r: done.set())
        return done

    monkeypatch.setattr(api, "IDLE_GRACE", 0.0)
    for i in range(api.IDLE_MISSES):        # unclaimed: the dispatcher hands them over
        assert write_and_wait(i).wait(30)
    assert backend._idle_misses >= api.IDLE_MISSES
    monkeypatch.setattr(api, "IDLE_GRACE", 3600.0)
    for i in range(3):                      # straight to the workers: no grace to wait out
        assert write_and_wait(10 + i).wait(30)
    probe = write_and_wait(20)              # the 4th: offered to an idle vCPU again
    assert not probe.is_set()
    assert hook() is True and probe.is_set()
    assert backend._idle_misses == 0
    again = write_and_wait(21)              # the idle path is back
    assert hook() is True and again.is_set()
    assert all(backend.read(i * 512, 512) == bytes([i]) * 512 for i in (0, 1, 10, 11, 12, 20, 21))

"""Flush skips the host fdatasync when nothing was written since the last one (QEMU's
bdrv_co_flush compares bs->write_gen with bs->flushed_gen), per file node and thread-safe.

fdatasync calls are counted through a wrapper around the real os.fdatasync (the sync still
happens); each call records which fd it synced and a global sequence number at its start."""

from __future__ import annotations

import itertools
import os
import threading

import pytest

from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2


class SyncCounter:
    def __init__(self) -> None:
        self.seq = itertools.count(1)
        self.calls: list[tuple[int, int]] = []   # (fd, sequence number at start)
        self.lock = threading.Lock()
        self.real = os.fdatasync
        self.real_pwritev = os.pwritev
        self.local = threading.local()

    def pwritev(self, fd, bufs, offset):
        n = self.real_pwritev(fd, bufs, offset)
        self.local.last_write = next(self.seq)   # this thread's last completed pwritev
        return n

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.calls.append((fd, next(self.seq)))
        self.real(fd)

    def count(self, fd: int) -> int:
        with self.lock:
            return sum(1 for f, _ in self.calls if f == fd)


@pytest.fixture
def syncs(monkeypatch):
    c = SyncCounter()
    monkeypatch.setattr(os, "fdatasync", c)
    monkeypatch.setattr(os, "pwritev", c.pwritev)
    return c


@pytest.fixture
def graph():
    g = BlockGraph()
    yield g
    g.close_all()


def _raw(path, size=1 << 20):
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def test_raw_flush_only_after_changes(tmp_path, graph, syncs):
    bs = graph.open_image(_raw(tmp_path / "a.raw"), "raw")
    fd = bs.file.impl.fd
    bs.flush()
    assert syncs.count(fd) == 0            # freshly opened: nothing to make durable
    bs.write(0, b"x" * 512)
    bs.flush()
    assert syncs.count(fd) == 1
    bs.flush()
    bs.flush()
    assert syncs.count(fd) == 1            # no write in between
    bs.read(0, 512)
    bs.flush()
    assert syncs.count(fd) == 1            # reads do not count
    for op in (lambda: bs.write_zeroes(4096, 4096), lambda: bs.discard(8192, 4096),
               lambda: bs.truncate(2 << 20), lambda: bs.write(100, b"y")):
        before = syncs.count(fd)
        op()
        bs.flush()
        bs.flush()
        assert syncs.count(fd) == before + 1
    assert bs.file.impl.syncs == syncs.count(fd)
    with open(tmp_path / "a.raw", "rb") as fh:
        assert fh.read(512) == b"x" * 100 + b"y" + b"x" * 411


def test_qcow2_flush_syncs_once_per_change(tmp_path, graph, syncs):
    q = str(tmp_path / "a.qcow2")
    create_qcow2(q, 8 << 20)
    bs = graph.open_image(q)
    fd = bs.file.impl.fd
    bs.write(0, b"a" * 65536)          # allocates: metadata + data
    bs.flush()
    n = syncs.count(fd)
    assert n >= 1
    bs.flush()
    bs.flush()
    assert syncs.count(fd) == n        # caches clean, file unchanged: no sync
    bs.write(0, b"b" * 4096)           # in-place rewrite of an allocated cluster
    bs.flush()
    assert syncs.count(fd) == n + 1
    graph.close_all()
    g2 = BlockGraph()
    try:
        assert g2.open_image(q, read_only=True).read(0, 8192) == b"b" * 4096 + b"a" * 4096
    finally:
        g2.close_all()


def test_writethrough_and_no_flush(tmp_path, graph, syncs):
    wt = graph.open_image(_raw(tmp_path / "wt.raw"), "raw", cache="writethrough")
    wt.cache_writeback = False
    fd = wt.file.impl.fd
    for i in range(3):
        wt.write(i * 512, b"z" * 512)
    assert syncs.count(fd) == 3            # one per write, none skipped
    wt.flush()
    assert syncs.count(fd) == 3
    un = graph.open_image(_raw(tmp_path / "un.raw"), "raw", cache="unsafe")
    un.write(0, b"q" * 512)
    un.flush()
    assert syncs.count(un.file.impl.fd) == 0


def test_nodes_are_independent(tmp_path, graph, syncs):
    a = graph.open_image(_raw(tmp_path / "a.raw"), "raw")
    b = graph.open_image(_raw(tmp_path / "b.raw"), "raw")
    a.write(0, b"1")
    b.flush()
    assert syncs.count(b.file.impl.fd) == 0
    a.flush()
    assert syncs.count(a.file.impl.fd) == 1


def test_concurrent_writers_and_flushers(tmp_path, graph, syncs):
    """Every flush that returns after a write returned made that write durable: some
    fdatasync of the file started after the write's last pwritev completed."""
    q = str(tmp_path / "c.qcow2")
    create_qcow2(q, 16 << 20)
    bs = graph.open_image(q)
    fd = bs.file.impl.fd
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(40):
            off = ((k * 40 + i) % 200) * 4096
            bs.write(off, bytes([k + 1]) * 4096)
            mark = syncs.local.last_write
            bs.flush()
            with syncs.lock:
                later = [s for f, s in syncs.calls if f == fd and s > mark]
            if not later:
                errors.append(f"worker {k} write {i}: no fdatasync after it")

    def idle_flusher() -> None:
        for _ in range(200):
            bs.flush()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=idle_flusher))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    n = syncs.count(fd)
    assert n <= 4 * 40 * 3          # bounded: idle flushes add nothing per se
    bs.flush()
    assert syncs.count(fd) == n     # everything already synced

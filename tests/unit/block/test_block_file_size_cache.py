"""The file driver caches the file's size (QEMU's total_sectors): requests on a raw image
make no fstat; writes past the end, truncates, zero writes past the end and reopen keep
the cached size right.  fstat calls are counted through a wrapper around the real one."""

from __future__ import annotations

import os

import pytest

from emu.block.node import BlockGraph


@pytest.fixture
def graph():
    g = BlockGraph()
    yield g
    g.close_all()


class FstatCounter:
    def __init__(self) -> None:
        self.real = os.fstat
        self.n = 0

    def __call__(self, fd, *a, **k):
        self.n += 1
        return self.real(fd, *a, **k)


def test_raw_requests_make_no_fstat(tmp_path, graph, monkeypatch):
    p = tmp_path / "a.raw"
    p.write_bytes(bytes(1 << 20))
    bs = graph.open_image(str(p), "raw")
    assert bs.size == 1 << 20
    counter = FstatCounter()
    monkeypatch.setattr(os, "fstat", counter)
    for i in range(50):
        bs.write(i * 4096, b"x" * 4096)
        assert bs.read(i * 4096, 4096) == b"x" * 4096
    assert counter.n == 0


def test_cached_size_follows_changes(tmp_path, graph):
    p = tmp_path / "a.raw"
    p.write_bytes(bytes(8192))
    bs = graph.open_image(str(p), "raw")
    f = bs.file
    f.write(10000, b"abc")                 # past the end: the file grows
    assert f.size == 10003 == os.path.getsize(p)
    f.write_zeroes(20000, 100)
    assert f.size == 20100 == os.path.getsize(p)
    bs.truncate(4096)
    assert bs.size == 4096 == os.path.getsize(p)
    bs.truncate(1 << 20)
    assert bs.size == 1 << 20 == os.path.getsize(p)
    bs.reopen(True)
    assert bs.size == 1 << 20
    with open(p, "r+b") as fh:             # changed behind the node: refresh_size asks again
        fh.truncate(3 << 20)
    f.impl.refresh_size()
    assert bs.size == 3 << 20


def test_qcow2_allocation_grows_cached_size(tmp_path, graph):
    from emu.block.qcow2.create import create_qcow2
    q = str(tmp_path / "a.qcow2")
    create_qcow2(q, 16 << 20)
    bs = graph.open_image(q)
    before = bs.file.size
    bs.write(0, b"d" * (1 << 20))
    bs.flush()
    assert bs.file.size == os.path.getsize(q) > before

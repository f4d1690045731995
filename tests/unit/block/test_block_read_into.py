"""read_into (reads into the caller's buffer) and writes of memoryview slices, through file,
raw and qcow2 nodes, cached and O_DIRECT; qcow2 allocation runs and their refcounts."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from conftest import requires_qemu_img
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError

MiB = 1 << 20


@pytest.fixture
def graph():
    g = BlockGraph()
    yield g
    g.close_all()


def _direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_raw_read_into_and_view_writes(tmp_path, graph, cache):
    path = tmp_path / "d.raw"
    data = random.Random(1).randbytes(MiB + 777)
    path.write_bytes(data)
    if cache == "none" and not _direct_supported(path):
        pytest.skip("no O_DIRECT on this file system")
    bs = graph.open_image(str(path), "raw", cache=cache)
    buf = bytearray(300_001)
    for off in (0, 5, 4096, len(data) - 300_001):
        view = memoryview(buf)[:300_001]
        bs.read_into(off, view)
        assert bytes(view) == data[off:off + 300_001]
    # Past the end of the file reads as zeroes (raw grows with the file: read from the protocol).
    tail = memoryview(bytearray(b"\xff" * 2000))
    bs.file.read_into(len(data) - 1000, tail)
    assert bytes(tail) == data[-1000:] + bytes(1000)
    # A memoryview slice is written as given (no copy needed, nothing kept).
    src = bytearray(b"abcdefgh" * 1000)
    bs.write(123, memoryview(src)[8:4008])
    src[:] = bytes(len(src))  # changing the caller's buffer afterwards changes nothing
    assert bs.read(123, 4000) == (b"abcdefgh" * 500)
    with pytest.raises(BlockError):
        bs.read_into(bs.size - 10, memoryview(bytearray(20)))


@requires_qemu_img
def test_qcow2_view_writes_runs_and_refcounts(tmp_path, graph):
    path = tmp_path / "d.qcow2"
    create_qcow2(str(path), 64 * MiB, cluster_size=4096)
    bs = graph.open_image(str(path), "qcow2")
    rnd = random.Random(3)
    model = bytearray(64 * MiB)
    buf = bytearray(3 * MiB)
    for _ in range(60):
        off = rnd.randrange(0, 64 * MiB - 3 * MiB)
        n = rnd.randrange(1, 3 * MiB)
        buf[:n] = rnd.randbytes(n)
        bs.write(off, memoryview(buf)[:n])  # allocation runs, partial clusters, rewrites
        model[off:off + n] = buf[:n]
    out = bytearray(5 * MiB)
    for off in range(0, 64 * MiB, 5 * MiB):
        n = min(5 * MiB, 64 * MiB - off)
        view = memoryview(out)[:n]
        bs.read_into(off, view)
        assert view == memoryview(model)[off:off + n]
    graph.close_all()
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(path)], check=True)

"""BlockBackend discard=ignore / detect-zeroes: an ignored discard is checked, accounted and
succeeds without touching the image; a refused one (out of range) is still refused; detect-zeroes
turns an all-zero write into a write-zeroes (a qcow2 image then allocates no data cluster)."""

from __future__ import annotations

import threading

import pytest

from emu.block.api import BlockBackend, BlockRangeError
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2


@pytest.fixture
def blk(tmp_path):
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 4 << 20)
    g = BlockGraph()
    b = BlockBackend(g.open_image(p), "d0")
    yield b
    b.close()
    g.close_all()


def _aio(fn, *args):
    done, out = threading.Event(), []
    fn(*args, lambda r: (out.append(r), done.set()))
    assert done.wait(30)
    return out[0]


def test_ignored_discard_succeeds_and_keeps_the_data(blk):
    blk.write(0, b"\x5a" * 131072)
    blk.discard_unmap = False
    blk.discard(0, 65536)
    assert _aio(blk.aio_discard, 65536, 65536) is None
    assert blk.read(0, 131072) == b"\x5a" * 131072
    st = blk.stats
    assert st["unmap_operations"] == 2 and st["unmap_bytes"] == 131072
    with pytest.raises(BlockRangeError):
        blk.discard(4 << 20, 512)
    assert isinstance(_aio(blk.aio_discard, 4 << 20, 512), BlockRangeError)
    assert blk.stats["invalid_unmap_operations"] == 2
    blk.discard_unmap = True
    blk.discard(0, 65536)
    assert blk.read(0, 65536) == bytes(65536)


def test_detect_zeroes_writes_zeroes(blk, tmp_path):
    import os
    path = str(tmp_path / "d.qcow2")
    blk.write(0, bytes(65536))                  # detect-zeroes off: a data cluster (+ its L2 table)
    blk.flush()
    grown = os.path.getsize(path)
    blk.write(65536, bytes(65536))              # ...and one more data cluster
    blk.flush()
    assert os.path.getsize(path) == grown + 65536
    blk.detect_zeroes = "on"
    size = os.path.getsize(path)
    blk.write(1 << 20, bytes(65536))
    assert _aio(blk.aio_write, 2 << 20, bytes(65536)) is None
    blk.write(3 << 20, b"\x01" + bytes(65535))  # not all zeroes: written as data
    blk.flush()
    assert os.path.getsize(path) == size + 65536   # only the last one took a cluster
    assert blk.read(1 << 20, 65536) == bytes(65536) and blk.read(2 << 20, 65536) == bytes(65536)
    assert blk.read(3 << 20, 2) == b"\x01\x00"
    st = blk.stats
    assert st["wr_operations"] == 5 and st["wr_bytes"] == 5 * 65536

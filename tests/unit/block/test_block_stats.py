"""Per-BlockBackend accounting (QEMU's BlockAcctStats) and per-node statistics."""

from __future__ import annotations

import threading

import pytest

from emu.block.api import BlockBackend, BlockRangeError
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError


@pytest.fixture
def blk(tmp_path):
    p = str(tmp_path / "s.qcow2")
    create_qcow2(p, 4 << 20)
    g = BlockGraph()
    bs = g.open_image(p)
    b = BlockBackend(bs, "drive0", workers=1)
    yield b
    b.close()
    g.close_all()


def _wait(fn, *args):
    ev = threading.Event()
    out = []
    fn(*args, lambda r: (out.append(r), ev.set()))
    assert ev.wait(10)
    return out[0]


def test_counters_follow_qemu_accounting(blk):
    s0 = blk.stats
    assert "idle_time_ns" not in s0  # nothing accounted yet, as QEMU
    assert s0["rd_operations"] == s0["wr_operations"] == 0
    blk.write(0, b"a" * 65536)
    blk.write_zeroes(1 << 20, 65536)          # a write, as virtio-blk's WRITE_ZEROES
    blk.read(0, 4096)
    blk.flush()
    blk.discard(0, 4096)
    _wait(blk.aio_write, 128 << 10, b"b" * 4096)
    assert isinstance(_wait(blk.aio_read, 0, 512), bytes)
    _wait(blk.aio_flush)
    with pytest.raises(BlockRangeError):
        blk.read(8 << 20, 512)                  # out of range: invalid, not failed
    assert isinstance(_wait(blk.aio_write, 8 << 20, b"x" * 512), BlockError)
    blk.write(2 << 20, b"n" * 512, account=False)  # not accounted (jobs, sync qemu-io)
    s = blk.stats
    assert (s["wr_operations"], s["wr_bytes"]) == (3, 65536 + 65536 + 4096)
    assert (s["rd_operations"], s["rd_bytes"]) == (2, 4096 + 512)
    assert (s["flush_operations"], s["unmap_operations"], s["unmap_bytes"]) == (2, 1, 4096)
    assert (s["invalid_rd_operations"], s["invalid_wr_operations"]) == (1, 1)
    assert s["failed_rd_operations"] == s["failed_wr_operations"] == 0
    # Highest guest offset written on the root node, unaccounted writes included (QEMU:
    # node-level, every write request).
    assert s["wr_highest_offset"] == (2 << 20) + 512
    assert s["rd_total_time_ns"] > 0 and s["wr_total_time_ns"] > 0
    assert 0 <= s["idle_time_ns"] < 10 ** 10
    assert s["rd_merged"] == s["wr_merged"] == s["unmap_merged"] == 0
    assert s["account_invalid"] is True and s["account_failed"] is True
    # The protocol node: host offsets (metadata included), file-specific counters.
    fs = blk.root.file.stats
    assert fs["wr_highest_offset"] == blk.root.file.size
    assert set(fs) == {"wr_highest_offset", "discard-nb-ok", "discard-nb-failed", "discard-bytes-ok"}


def test_failed_requests_and_explicit_cookies(tmp_path):
    p = str(tmp_path / "e.img")
    with open(p, "wb") as fh:
        fh.truncate(1 << 20)
    g = BlockGraph()
    # A host failure injected by blkdebug: admitted, then failed with EIO.
    bs = g.blockdev_add({"driver": "raw", "node-name": "r", "file": {
        "driver": "blkdebug", "inject-error": [{"event": "read_aio", "errno": 5}],
        "image": {"driver": "file", "filename": p}}})
    blk = BlockBackend(bs, "d")
    with pytest.raises(BlockError):
        blk.read(0, 512)
    s = blk.stats
    assert s["failed_rd_operations"] == 1 and s["rd_operations"] == 0 and s["rd_bytes"] == 0
    assert s["rd_total_time_ns"] > 0  # account_failed: latency of failed requests counts
    # Callers that account themselves (QEMU's qemu-io aio_* -i, devices splitting requests).
    blk.acct.invalid("flush")
    c = blk.acct.start("unmap", 1024)
    blk.acct.done(c)
    s = blk.stats
    assert s["invalid_flush_operations"] == 1 and (s["unmap_operations"], s["unmap_bytes"]) == (1, 1024)
    with pytest.raises(ValueError):
        blk.acct.start("bogus")
    blk.close()
    g.close_all()

"""BlockBackend: sync/async I/O, errors as results, in-flight count, drain/resume; blkdebug."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from emu.block.api import BlockBackend, BlockRangeError, BlockReadOnlyError
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError


@pytest.fixture
def qimg(tmp_path):
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 4 << 20)
    return p


def _debug_disk(g: BlockGraph, path: str, **dbg):
    opts = {"driver": "blkdebug", "image": {"driver": "file", "filename": path}}
    opts.update(dbg)
    return g.blockdev_add({"driver": "qcow2", "node-name": "disk", "file": opts})


def test_sync_io_and_guest_errors(qimg):
    g = BlockGraph()
    blk = BlockBackend(g.open_image(qimg), "drive0")
    blk.write(512, b"abc")
    assert blk.read(510, 6) == b"\0\0abc\0" and blk.size == 4 << 20
    with pytest.raises(BlockRangeError):
        blk.read((4 << 20) - 1, 2)
    with pytest.raises(BlockRangeError):
        blk.write(-1, b"x")
    blk.write_zeroes(0, 4096)
    blk.discard(0, 65536)
    blk.flush()
    assert blk.in_flight == 0
    blk.close()
    g.close_all()
    g = BlockGraph()
    ro = BlockBackend(g.open_image(qimg, read_only=True), "ro")
    with pytest.raises(BlockReadOnlyError):
        ro.write(0, b"x")
    g.close_all()


def test_aio_completions_and_errors(qimg):
    g = BlockGraph()
    blk = BlockBackend(g.open_image(qimg), "d")
    done = threading.Event()
    results = []

    def cb(r):
        results.append(r)
        if len(results) == 3:
            done.set()
    blk.aio_write(0, b"z" * 4096, cb)
    blk.aio_flush(cb)
    blk.aio_read(1 << 30, 10, cb)  # past the end: the error comes back as the result
    assert done.wait(5)
    assert any(isinstance(r, BlockRangeError) for r in results)
    got = []
    ev = threading.Event()
    blk.aio_read(0, 4096, lambda r: (got.append(r), ev.set()))
    assert ev.wait(5) and got == [b"z" * 4096]
    blk.close()
    g.close_all()


def test_drain_waits_for_held_request_and_writes_back_metadata(qimg):
    g = BlockGraph()
    bs = _debug_disk(g, qimg)
    dbg = bs.file.impl
    blk = BlockBackend(bs, "drive0")
    dbg.break_on("write_aio", "hold")
    res = []
    blk.aio_write(65536, b"q" * 65536, res.append)
    assert dbg.wait_break("hold", 5)
    assert blk.in_flight == 1
    t = threading.Thread(target=blk.drain)
    t.start()
    time.sleep(0.1)
    assert t.is_alive(), "drain must wait for the held request"
    # Requests issued while draining are queued, not run.
    later = []
    threading.Thread(target=lambda: blk.aio_write(0, b"L" * 512, later.append)).start()
    time.sleep(0.05)
    dbg.resume("hold")
    t.join(5)
    assert not t.is_alive() and res == [None] and blk.in_flight == 0 and later == []
    # Metadata was written back: a second, independent reader sees the data.
    g2 = BlockGraph()
    other = g2.open_image(qimg, read_only=True, force_share=True)
    assert other.read(65536, 65536) == b"q" * 65536
    g2.close_all()
    blk.resume()
    deadline = time.time() + 5
    while not later and time.time() < deadline:
        time.sleep(0.01)
    assert later == [None] and blk.read(0, 512) == b"L" * 512
    blk.close()
    g.close_all()


def test_drain_timeout_reports_in_flight(qimg):
    g = BlockGraph()
    bs = _debug_disk(g, qimg)
    blk = BlockBackend(bs, "d")
    blk.write(0, b"x")  # allocates; the next read of that cluster hits the file
    bs.file.impl.break_on("read_aio", "r")
    blk.aio_read(0, 512, lambda r: None)
    assert bs.file.impl.wait_break("r", 5)
    with pytest.raises(BlockError, match="1 request"):
        blk.drain(timeout=0.1)
    bs.file.impl.remove_break("r")
    blk.resume()
    blk.drain(5)
    blk.resume()
    blk.close()
    g.close_all()


def test_blkdebug_error_injection_and_config_file(qimg, tmp_path):
    cfg = tmp_path / "dbg.conf"
    cfg.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce = "on"\n')
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(65536))
    g = BlockGraph()
    bs = g.open_image(f"blkdebug:{cfg}:{raw}", "raw")
    assert bs.file.drv == "blkdebug" and bs.file.file.drv == "file"
    blk = BlockBackend(bs, "d")
    blk.write(0, b"data")
    with pytest.raises(BlockError) as ei:
        blk.read(0, 4)
    assert ei.value.errno == errno.EIO
    assert blk.read(0, 4) == b"data"  # once: only the first read fails
    blk.close()
    g.close_all()
    g = BlockGraph()
    bs = _debug_disk(g, qimg, **{"inject-error": [{"event": "write_aio", "errno": errno.ENOSPC}]})
    with pytest.raises(BlockError) as ei:
        bs.write(0, b"y")
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(BlockError):  # the final flush fails the same way, and is reported
        g.close_all()
    assert g.nodes() == []


def test_blkdebug_delay(qimg):
    g = BlockGraph()
    bs = _debug_disk(g, qimg, delay={"read_aio": 50_000_000})
    bs.write(0, b"x")
    t0 = time.monotonic()
    bs.read(0, 1)
    assert time.monotonic() - t0 >= 0.05
    g.close_all()


def test_throttling_limits_bandwidth(qimg):
    g = BlockGraph()
    blk = BlockBackend(g.open_image(qimg), "t")
    blk.set_io_limits({"bps_wr": 1 << 20})  # 1 MiB/s
    assert blk.io_limits["bps_wr"] == 1 << 20 and blk.io_limits["iops"] == 0
    t0 = time.monotonic()
    for i in range(4):
        blk.write(i * 65536, b"t" * 65536)  # 256 KiB -> about 0.19 s after the first
    assert time.monotonic() - t0 >= 0.15
    t0 = time.monotonic()
    blk.read(0, 1 << 20)  # reads are not limited
    assert time.monotonic() - t0 < 0.15
    with pytest.raises(BlockError, match="cannot be used at the same time"):
        blk.set_io_limits({"bps": 1, "bps_rd": 1})
    blk.set_io_limits(None)
    assert blk.io_limits["bps_wr"] == 0
    blk.close()
    g.close_all()


def test_blkdebug_state_machine(qimg, tmp_path):
    raw = tmp_path / "s.raw"
    raw.write_bytes(bytes(4096))
    g = BlockGraph()
    bs = g.blockdev_add({"driver": "raw", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(raw)},
        "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}],
        "inject-error": [{"event": "read_aio", "state": 2, "errno": errno.EIO}]}})
    assert bs.read(0, 4) == bytes(4)  # state 1: reads work
    bs.write(0, b"abcd")  # moves to state 2
    with pytest.raises(BlockError):
        bs.read(0, 4)
    g.close_all()

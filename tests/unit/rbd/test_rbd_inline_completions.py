"""rbd completions through librbd's event fd: reaped on the image's completion thread or, in
inline mode (emu-img bench), on the thread that polls; synchronous requests mixed in."""

from __future__ import annotations

import threading
import uuid

import pytest
import rbd_ceph_cluster

from emu.block.api import BlockBackend
from emu.block.drivers.rbd import create_image, open_image
from emu.block.node import BlockGraph
from emu.errors import BlockError

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()
MiB = 1 << 20


def _open(conf: str):
    name = "i" + uuid.uuid4().hex[:10]
    create_image(f"rbd:rbd/{name}:conf={conf}", 8 * MiB)
    g = BlockGraph()
    return g, open_image(g, f"rbd:rbd/{name}:conf={conf}")


def test_inline_completions_run_on_the_polling_thread(ceph_conf):
    g, bs = _open(ceph_conf)
    blk = BlockBackend(bs, "inl0")
    impl = bs.file.impl
    poll = impl.inline_completions()
    me = threading.current_thread().name
    got: dict[int, object] = {}
    threads: set[str] = set()

    def cb(i):
        def done(r):
            got[i] = r
            threads.add(threading.current_thread().name)
        return done
    try:
        for i in range(32):
            blk.aio_write(i * 65536, bytes([i + 1]) * 4096, cb(i))
        # a synchronous request in between completes by itself
        assert blk.read(31 * 65536, 4096) in (bytes(4096), bytes([32]) * 4096)
        while len(got) < 32:
            poll()
        assert got == {i: None for i in range(32)} and threads == {me}
        got.clear()
        for i in range(32):
            blk.aio_read(i * 65536, 4096, cb(i))
        while len(got) < 32:
            poll()
        assert all(got[i] == bytes([i + 1]) * 4096 for i in range(32)) and threads == {me}
        assert poll() == 0                     # nothing in flight: returns at once
        assert blk.in_flight == 0 and blk.stats["rd_operations"] == 33   # and the sync read
        # large reads take the uninitialised buffer; short reads past the data are zeroes
        big: list = []
        blk.aio_read(0, 2 * MiB, big.append)
        while not big:
            poll()
        assert big[0][:4096] == b"\x01" * 4096 and big[0][4096:65536] == bytes(65536 - 4096)
        assert len(big[0]) == 2 * MiB
        # the completion thread cannot start any more on this image
        impl.aio_submit("flush", callback=lambda r, d: got.__setitem__("f", r))
        while "f" not in got:
            poll()
        assert got["f"] == 0 and impl._comps._thread is None
    finally:
        blk.close()
        g.close_all()


def test_close_completes_inline_requests_in_flight(ceph_conf):
    g, bs = _open(ceph_conf)
    impl = bs.file.impl
    impl.inline_completions()
    done: list = []
    for i in range(16):
        impl.aio_submit("write", i * 4096, data=b"\x5a" * 4096, callback=lambda r, d: done.append(r))
    g.close_all()                          # nobody polled: close reaps them
    assert done == [0] * 16
    with pytest.raises(BlockError):
        impl.aio_submit("read", 0, 512)


def test_thread_mode_refuses_a_late_switch_to_inline(ceph_conf):
    g, bs = _open(ceph_conf)
    impl = bs.file.impl
    ev = threading.Event()
    impl.aio_submit("read", 0, 512, callback=lambda r, d: ev.set())
    assert ev.wait(30)
    with pytest.raises(BlockError, match="already run on their thread"):
        impl.inline_completions()
    g.close_all()

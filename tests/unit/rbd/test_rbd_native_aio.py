"""BlockBackend's native async path on rbd: ``aio_*`` requests go straight to librbd (no worker
thread), the whole queue depth in flight at once, and are accounted, counted in flight and
drained exactly as worker requests are."""

from __future__ import annotations

import threading
import uuid

import rbd_ceph_cluster

from emu.block.api import BlockBackend
from emu.block.drivers.rbd import RbdError, create_image
from emu.block.node import BlockGraph

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()
MiB = 1 << 20


def _open(conf: str, fmt: str | None):
    name = "n" + uuid.uuid4().hex[:10]
    create_image(f"rbd:rbd/{name}:conf={conf}", 8 * MiB)
    g = BlockGraph()
    fn = f"rbd:rbd/{name}:conf={conf}"
    node = g.open_image(fn, fmt) if fmt else g.open_protocol(fn, driver="rbd")
    return g, node


class _Collect:
    def __init__(self, n: int) -> None:
        self.results: dict[int, object] = {}
        self.threads: set[str] = set()
        self._left = n
        self._lock = threading.Lock()
        self.all_done = threading.Event()

    def cb(self, i: int):
        def done(r):
            with self._lock:
                self.results[i] = r
                self.threads.add(threading.current_thread().name)
                self._left -= 1
                if self._left == 0:
                    self.all_done.set()
        return done


def _run(blk: BlockBackend, root) -> None:
    n = 64
    assert blk._native_target(True) is not None
    writes = _Collect(n)
    for i in range(n):
        blk.aio_write(i * 8192, bytes([i + 1]) * 4096, writes.cb(i))
    blk.drain()                          # every completion delivered before drain returns
    try:
        assert writes.all_done.is_set() and blk.in_flight == 0
        assert writes.results == {i: None for i in range(n)}
    finally:
        blk.resume()
    assert blk._pool is None, "a worker pool was started: the requests did not go native"
    assert threading.current_thread().name not in writes.threads
    st = blk.stats
    assert st["wr_operations"] == n and st["wr_bytes"] == n * 4096 and st["failed_wr_operations"] == 0
    assert root.wr_highest_offset == (n - 1) * 8192 + 4096

    reads = _Collect(n)
    for i in range(n):
        blk.aio_read(i * 8192, 4096, reads.cb(i))
    assert reads.all_done.wait(60)
    assert blk.in_flight == 0
    assert all(reads.results[i] == bytes([i + 1]) * 4096 for i in range(n))
    assert blk.stats["rd_operations"] == n and blk.stats["rd_bytes"] == n * 4096

    more = _Collect(3)
    blk.aio_write_zeroes(0, 8192, more.cb(0))
    blk.aio_discard(8192, 8192, more.cb(1))
    blk.aio_flush(more.cb(2))
    assert more.all_done.wait(60) and more.results == {0: None, 1: None, 2: None}
    assert blk.read(0, 4096) == bytes(4096)
    st = blk.stats
    assert st["wr_operations"] == n + 1 and st["unmap_operations"] == 1 and st["flush_operations"] == 1
    assert blk._pool is None

    # a request the driver refuses (its image closed under it) completes as a failure, accounted
    impl = blk._native_target(False)[0].impl
    image, impl.image = impl.image, None
    try:
        bad = _Collect(1)
        blk.aio_read(0, 512, bad.cb(0))
        assert bad.all_done.wait(10) and isinstance(bad.results[0], Exception)
    finally:
        impl.image = image
    assert blk.stats["failed_rd_operations"] == 1 and blk.in_flight == 0


def test_native_aio_on_the_rbd_node(ceph_conf):
    g, node = _open(ceph_conf, None)
    assert node.drv == "rbd"
    blk = BlockBackend(node, "rbd0")
    try:
        _run(blk, node)
    finally:
        blk.close()
        g.close_all()


def test_native_aio_through_a_raw_node(ceph_conf):
    g, node = _open(ceph_conf, "raw")
    assert node.drv == "raw" and node.file.drv == "rbd"
    blk = BlockBackend(node, "rbd1")
    try:
        _run(blk, node)
        assert node.file.wr_highest_offset >= 63 * 8192 + 4096
    finally:
        blk.close()
        g.close_all()


def test_librbd_error_completes_the_request_with_its_errno(ceph_conf):
    g, node = _open(ceph_conf, None)
    err = node.impl.aio_error("read", 4096, -5)
    assert isinstance(err, RbdError) and err.errno == 5
    assert str(err) == "rbd read at 4096 failed: Input/output error"
    g.close_all()


def test_throttled_or_drained_backends_take_the_ordinary_path(ceph_conf):
    g, node = _open(ceph_conf, None)
    blk = BlockBackend(node, "rbd2")
    try:
        blk.set_io_limits({"iops": 100000})
        assert blk._native_target(False) is None
        blk.set_io_limits(None)
        blk.drain()                      # requests from other threads wait for resume
        got = []
        t = threading.Thread(target=lambda: blk.aio_write(0, b"\x77" * 512, got.append))
        t.start()
        t.join()
        assert got == [] and blk.in_flight == 0
        blk.resume()
        blk.drain()
        blk.resume()
        assert got == [None] and blk.read(0, 512) == b"\x77" * 512
    finally:
        blk.close()
        g.close_all()

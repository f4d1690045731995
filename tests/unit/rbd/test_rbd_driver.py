"""The rbd protocol driver against a real one-node Ceph cluster (scripts/ceph-test-cluster)."""

from __future__ import annotations

import subprocess
import threading
import uuid

import pytest

import rbd_ceph_cluster
from emu.block.api import BlockBackend
from emu.block.drivers.rbd import RbdError, create_image, parse_filename
from emu.block.node import BlockGraph
from emu.errors import BlockError, ImageOpenError

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()
MiB = 1 << 20


def _name() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _open(conf: str, spec: str, **kw):
    g = BlockGraph()
    return g, g.open_protocol(f"rbd:rbd/{spec}:conf={conf}", driver="rbd", **kw)


# --- filename parsing (no cluster) -------------------------------------------------------
def test_parse_legacy_filename():
    assert parse_filename("rbd:pool/img") == {"pool": "pool", "image": "img"}
    assert parse_filename("rbd:p/ns/img@s1:conf=/x/c.conf:id=admin:mon_host=127.0.0.1\\:6789:rbd_cache=false") == {
        "pool": "p", "namespace": "ns", "image": "img", "snapshot": "s1", "conf": "/x/c.conf",
        "user": "admin", "key-value-pairs": [("mon_host", "127.0.0.1:6789"), ("rbd_cache", "false")]}
    assert parse_filename("rbd:p/a\\@b")["image"] == "a@b"


@pytest.mark.parametrize("fn,text", [
    ("rbd:rbd/x:foo", "conf option foo has no value"),
    ("file:x", "File name must start with 'rbd:'"),
])
def test_parse_errors(fn, text):
    with pytest.raises(BlockError, match="^" + text + "$"):
        parse_filename(fn)


# --- errors with QEMU's texts ---------------------------------------------------------------
def test_missing_image_pool_conf(ceph_conf):
    with pytest.raises(ImageOpenError, match="^error reading header from nope: No such file or directory$"):
        _open(ceph_conf, "nope")
    g = BlockGraph()
    with pytest.raises(ImageOpenError, match="^error opening pool nopool: No such file or directory$"):
        g.open_protocol(f"rbd:nopool/x:conf={ceph_conf}", driver="rbd")
    with pytest.raises(ImageOpenError, match="^error reading conf file /nonexistent.conf: No such file or directory$"):
        g.open_protocol("rbd:rbd/x:conf=/nonexistent.conf", driver="rbd")
    assert g.nodes() == []


def test_no_cluster_is_a_clear_error():
    if rbd_ceph_cluster.missing_reason():
        pytest.skip(rbd_ceph_cluster.missing_reason())
    g = BlockGraph()
    with pytest.raises(ImageOpenError, match="^error connecting: "):
        g.open_protocol("rbd:rbd/x:conf=none:mon_host=127.0.0.1\\:1:client_mount_timeout=1",
                        driver="rbd")


# --- I/O -----------------------------------------------------------------------------------
def test_create_read_write_zero_discard_resize(ceph_conf):
    name = _name()
    create_image(f"rbd:rbd/{name}:conf={ceph_conf}", 8 * MiB)
    with pytest.raises(BlockError, match="^error rbd create: File exists$"):
        create_image(f"rbd:rbd/{name}:conf={ceph_conf}", 8 * MiB)
    g, bs = _open(ceph_conf, name)
    assert bs.size == 8 * MiB
    assert bs.read(0, 4096) == bytes(4096)
    bs.write(4096, b"\xab" * 8192)
    bs.write(5 * MiB - 3, b"xyz123")           # across an object boundary is fine for RBD
    bs.flush()
    assert bs.read(4096, 8192) == b"\xab" * 8192
    assert bs.read(5 * MiB - 3, 6) == b"xyz123"
    bs.write_zeroes(4096, 4096)
    assert bs.read(4096, 8192) == bytes(4096) + b"\xab" * 4096
    bs.discard(0, 4 * MiB)
    assert bs.read(4096, 8192) == bytes(8192)
    bs.impl.truncate(16 * MiB)
    assert bs.size == 16 * MiB
    g.remove(bs)
    # What we wrote is what the rbd CLI exports.
    out = subprocess.run(["rbd", "-c", ceph_conf, "export", f"rbd/{name}", "-"],
                         capture_output=True, check=True, timeout=60).stdout
    assert len(out) == 16 * MiB and out[5 * MiB - 3:5 * MiB + 3] == b"xyz123"
    assert out[:4 * MiB] == bytes(4 * MiB)


def test_aio_completes_on_librbd_thread(ceph_conf):
    name = _name()
    create_image(f"rbd:rbd/{name}:conf={ceph_conf}", 4 * MiB)
    g, bs = _open(ceph_conf, name)
    done: list = []
    ev = threading.Event()
    me = threading.get_ident()

    def cb(ret, data):
        done.append((ret, data, threading.get_ident() != me))
        if len(done) == 9:
            ev.set()
    for i in range(8):
        bs.impl.aio_submit("write", i * 65536, data=bytes([i + 1]) * 65536, callback=cb)
    bs.impl.aio_submit("flush", callback=cb)
    assert ev.wait(30)
    assert all(r == 0 or r == 65536 for r, _, _ in done) and all(t for _, _, t in done)
    got = threading.Event()
    res: list = []
    bs.impl.aio_submit("read", 65536 * 3, 16, callback=lambda r, d: (res.append((r, d)), got.set()))
    assert got.wait(30)
    assert res == [(16, b"\x04" * 16)]
    # Through a BlockBackend (its workers): the device-facing API.
    blk = BlockBackend(bs, "rbd0")
    ev2, out = threading.Event(), []
    blk.aio_read(0, 4, lambda r: (out.append(r), ev2.set()))
    assert ev2.wait(30) and out == [b"\x01" * 4]
    blk.close()
    g.close_all()


def test_io_error_is_blockerror_with_errno(ceph_conf):
    name = _name()
    create_image(f"rbd:rbd/{name}:conf={ceph_conf}", 1 * MiB)
    g, bs = _open(ceph_conf, name)
    with pytest.raises(RbdError) as ei:
        bs.impl.write(2 * MiB, b"x" * 512)     # librbd refuses I/O past the end
    assert ei.value.errno > 0
    g.close_all()


# --- snapshots -----------------------------------------------------------------------------
def test_snapshots_qemu_semantics(ceph_conf):
    name = _name()
    create_image(f"rbd:rbd/{name}:conf={ceph_conf}", 4 * MiB)
    g, bs = _open(ceph_conf, name)
    bs.write(0, b"A" * 4096)
    sn = bs.snapshot_create("s1")
    assert sn == {"icount": 0, "vm-clock-nsec": 0, "name": "s1", "date-sec": 0, "date-nsec": 0,
                  "vm-clock-sec": 0, "id": "s1", "vm-state-size": 4 * MiB}
    with pytest.raises(RbdError, match="^failed to create snap: File exists$"):
        bs.snapshot_create("s1")
    with pytest.raises(RbdError) as ei:
        bs.snapshot_create("")
    assert ei.value.errno == 22
    with pytest.raises(RbdError) as ei:
        bs.snapshot_create("s2", snapshot_id="7")
    assert ei.value.errno == 22
    with pytest.raises(RbdError) as ei:
        bs.snapshot_create("n" * 128)
    assert ei.value.errno == 34
    assert [s["name"] for s in bs.snapshot_list()] == ["s1"]
    bs.write(0, b"B" * 4096)
    # @snap: a writable open is refused (qemu-img), -drive's auto-read-only makes it read-only.
    g2 = BlockGraph()
    with pytest.raises(ImageOpenError, match="^rbd snapshots are read-only$"):
        g2.open_protocol(f"rbd:rbd/{name}@s1:conf={ceph_conf}", driver="rbd")
    snap = g2.open_protocol("", driver="rbd", extra={"pool": "rbd", "image": name, "snapshot": "s1",
                                                    "conf": ceph_conf, "auto-read-only": True})
    assert snap.read_only and snap.read(0, 4096) == b"A" * 4096
    with pytest.raises(BlockError):
        snap.write(0, b"x")
    g2.close_all()
    bs.snapshot_goto("s1")
    assert bs.read(0, 4096) == b"A" * 4096
    with pytest.raises(RbdError, match="rbd do not support snapshot id"):
        bs.snapshot_delete("1", "s1")
    assert bs.snapshot_delete(None, "s1")["name"] == "s1"
    assert bs.snapshot_list() == []
    with pytest.raises(RbdError) as ei:
        bs.snapshot_delete(None, "s1")
    assert ei.value.errno == 2
    g.close_all()


def test_default_mount_timeout_unless_configured(ceph_conf, tmp_path):
    # librados would wait 300 s for an unreachable cluster inside rados_connect; emu uses 30 s
    # unless the conf file (the test cluster's says 15) or an option chose a value.
    from emu.block.drivers.rbd import DEFAULT_MOUNT_TIMEOUT, Connection
    mon = next(ln.split("=", 1)[1].strip() for ln in open(ceph_conf) if ln.startswith("mon host"))
    bare = tmp_path / "bare.conf"
    bare.write_text(f"[global]\nmon host = {mon}\n")
    for opts, want in (({"conf": ceph_conf}, 15.0), ({"conf": str(bare)}, float(DEFAULT_MOUNT_TIMEOUT)),
                       ({"conf": str(bare), "key-value-pairs": [("client_mount_timeout", "7")]}, 7.0)):
        c = Connection({"pool": "rbd", **opts})
        try:
            assert float(c.conf_get("client_mount_timeout")) == want
        finally:
            c.close()

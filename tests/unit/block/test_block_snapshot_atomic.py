"""Internal snapshot create, delete and goto are atomic by one header write
(emu.block.qcow2.snapshot, shadow sessions).

Each test stops the operation after every single write to the image file (the file as a
kill -9 right after that write leaves it) and checks that copy: ``qemu-img check`` finds no
corruption and no check error (leaks only), and emu reads either the whole old state or the
whole new one -- the snapshot list, the active image and every snapshot's content.  Before
the header write the committed image is untouched; after it, the new one is complete.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess

import pytest
from conftest import requires_qemu_img

from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2

SIZE = 8 << 20


def _check(path: str) -> tuple[dict, str]:
    r = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    return json.loads(r.stdout), r.stderr


def _state(path: str) -> tuple[list[str], bytes, dict[str, bytes]]:
    """(snapshot names, active content, name -> snapshot content) of an image as emu reads it."""
    g = BlockGraph()
    bs = g.open_image(path, read_only=True, force_share=True)
    try:
        names = [s["name"] for s in bs.snapshot_list()]
        active = bs.read(0, bs.size)
    finally:
        g.close_all()
    snaps = {}
    for n in names:
        g = BlockGraph()
        bs = g.open_image(path, read_only=True, force_share=True)
        try:
            bs.impl.snapshot_load_tmp(None, n)
            snaps[n] = bs.read(0, bs.size)
        finally:
            g.close_all()
    return names, active, snaps


def _image(tmp_path, cs: int, compat: str, seed: int, refcount_bits: int = 16):
    p = str(tmp_path / f"a{cs}{compat}.qcow2")
    create_qcow2(p, SIZE, cluster_size=cs, compat=compat, refcount_bits=refcount_bits)
    g = BlockGraph()
    bs = g.open_image(p, cache="unsafe", options={"discard": "unmap"})
    rnd = random.Random(seed)
    for _ in range(24):
        off = rnd.randrange(0, SIZE - 70000)
        bs.write(off, rnd.randbytes(rnd.randrange(1, 70000)))
    return p, g, bs, rnd


class Recorder:
    """Copies the image after every write of the file driver while armed."""

    def __init__(self, bs, path: str, tmp_path) -> None:
        self.impl = bs.file.impl
        self.orig = self.impl.write
        self.path = path
        self.dir = tmp_path
        self.copies: list[tuple[int, int, str]] = []   # (offset, length, copy path)
        self.impl.write = self._write

    def _write(self, off: int, data) -> None:
        self.orig(off, data)
        cp = str(self.dir / f"crash{len(self.copies):03d}.qcow2")
        shutil.copyfile(self.path, cp)
        self.copies.append((off, len(data), cp))

    def stop(self) -> None:
        self.impl.write = self.orig


def _verify(rec: Recorder, old, new) -> dict:
    """Every copy: check clean or leaking, and emu reads exactly ``old`` or ``new``.
    Returns counts per state; the header write is the only one that changes the state."""
    seen = {"old": 0, "new": 0, "leaking": 0}
    switch = [i for i, (off, n, _) in enumerate(rec.copies) if off < 72 and off + n > 36]
    assert len(switch) == 1, [(o, n) for o, n, _ in rec.copies]
    off, n, _ = rec.copies[switch[0]]
    assert off in (24, 36) and off + n == 72        # one write of the header fields
    for i, (off, n, cp) in enumerate(rec.copies):
        res, err = _check(cp)
        assert not res.get("corruptions") and not res.get("check-errors"), (i, off, n, res, err)
        seen["leaking"] += bool(res.get("leaks"))
        st = _state(cp)
        want = old if i < switch[0] else new
        assert st[0] == want[0], (i, off, st[0], want[0])
        assert st[1] == want[1], (i, off)
        assert st[2] == want[2], (i, off)
        seen["old" if i < switch[0] else "new"] += 1
    return seen


@requires_qemu_img
@pytest.mark.parametrize("cs,compat,bits", [(4096, "1.1", 16), (65536, "0.10", 16), (4096, "1.1", 8)])
def test_every_write_of_create_delete_goto(tmp_path, cs, compat, bits):
    p, g, bs, rnd = _image(tmp_path, cs, compat, seed=cs + bits, refcount_bits=bits)
    bs.snapshot_create("a")
    for _ in range(8):
        bs.write(rnd.randrange(0, SIZE - 70000), rnd.randbytes(rnd.randrange(1, 70000)))
    bs.flush()
    ops = [("create b", lambda: bs.snapshot_create("b")),
           ("delete a", lambda: bs.snapshot_delete(None, "a")),
           ("goto b", lambda: bs.snapshot_goto("b")),
           ("create c", lambda: bs.snapshot_create("c")),
           ("goto b again", lambda: bs.snapshot_goto("b")),
           ("delete c", lambda: bs.snapshot_delete(None, "c"))]
    for k, (what, fn) in enumerate(ops):
        # a few guest writes between the operations, so tables change between them
        bs.write(rnd.randrange(0, SIZE - 70000), rnd.randbytes(rnd.randrange(1, 70000)))
        bs.flush()
        old = _state(p)
        d = tmp_path / f"op{k}"
        d.mkdir()
        rec = Recorder(bs, p, d)
        try:
            fn()
        finally:
            rec.stop()
        new = _state(p)
        assert new != old, what
        seen = _verify(rec, old, new)
        assert seen["old"] and seen["new"], (what, seen)
    g.close_all()
    res, err = _check(p)
    assert not res.get("corruptions") and not res.get("leaks") and not res.get("check-errors"), (res, err)


@requires_qemu_img
def test_goto_to_another_size_switches_the_size_in_the_same_write(tmp_path):
    p, g, bs, rnd = _image(tmp_path, 4096, "1.1", seed=3)
    bs.snapshot_create("small")
    bs.truncate(SIZE * 2)
    bs.write(SIZE + 4096, b"x" * 9000)
    bs.flush()
    old = _state(p)
    rec = Recorder(bs, p, tmp_path)
    try:
        bs.snapshot_goto("small")
    finally:
        rec.stop()
    new = _state(p)
    assert len(new[1]) == SIZE and len(old[1]) == 2 * SIZE
    _verify(rec, old, new)
    g.close_all()


@requires_qemu_img
@pytest.mark.parametrize("cs", [4096, 65536])
def test_every_write_of_a_split_create_with_guest_writes(tmp_path, cs):
    """Begin (the cut), guest writes, zero writes and discards that copy tables, allocate and
    free clusters, then the finish: until the header write the image is the old one (the
    guest's requests after the cut were never flushed; no cluster the old image uses was
    reused or punched), after it the snapshot holds the cut and the active image every
    request."""
    p, g, bs, rnd = _image(tmp_path, cs, "1.1", seed=5)
    bs.snapshot_create("before")
    bs.write(0, b"q" * 300000)
    bs.flush()
    old = _state(p)
    rec = Recorder(bs, p, tmp_path)
    try:
        ticket = bs.snapshot_create_begin("s")
        for _ in range(6):
            bs.write(rnd.randrange(0, SIZE - 70000), rnd.randbytes(rnd.randrange(1, 70000)))
        bs.write_zeroes(1 << 20, 256 << 10)
        bs.discard(0, 256 << 10)
        bs.write(4096, b"r" * 5000)
        bs.snapshot_create_finish(ticket)
    finally:
        rec.stop()
    new = _state(p)
    assert new[0] == ["before", "s"] and new[2]["s"] == old[1]
    _verify(rec, old, new)
    g.close_all()


@requires_qemu_img
def test_guest_flush_in_the_pending_phase_commits_first(tmp_path):
    """A flush between the cut and the finish completes only once the snapshot and every
    write before the flush are reachable from the header (a crash right after it loses
    nothing the guest was told is durable); the finish then only reports."""
    p, g, bs, rnd = _image(tmp_path, 65536, "1.1", seed=9)
    bs.flush()
    cut = bs.read(0, SIZE)
    ticket = bs.snapshot_create_begin("s")
    bs.write(70000, b"w" * 100000)
    before_flush = bs.read(0, SIZE)
    bs.flush()
    cp = str(tmp_path / "after-flush.qcow2")
    shutil.copyfile(p, cp)
    names, active, snaps = _state(cp)
    assert names == ["s"] and active == before_flush and snaps["s"] == cut
    res, _ = _check(cp)
    assert not res.get("corruptions") and not res.get("check-errors"), res
    info = bs.snapshot_create_finish(ticket)
    assert info["name"] == "s"
    g.close_all()
    res, _ = _check(p)
    assert not res.get("corruptions") and not res.get("leaks") and not res.get("check-errors"), res
    assert _state(p) == (["s"], before_flush, {"s": cut})


def test_header_fields_are_one_write(tmp_path):
    """The switch writes l1_size .. snapshots_offset as one pwrite of bytes 36..71."""
    p = str(tmp_path / "h.qcow2")
    create_qcow2(p, SIZE, cluster_size=4096)
    g = BlockGraph()
    bs = g.open_image(p)
    bs.write(0, b"a" * 50000)
    header_writes = []
    impl = bs.file.impl
    orig = impl.write

    def write(off, data):
        if off < 72:
            header_writes.append((off, len(data)))
        orig(off, data)
    impl.write = write
    bs.snapshot_create("s")
    bs.write(0, b"b" * 50000)
    bs.snapshot_delete(None, "s")
    impl.write = orig
    assert header_writes == [(36, 36), (36, 36)]
    with open(p, "rb") as fh:
        head = fh.read(72)
    l1_size, l1_off, rt_off, rt_clusters, nb, sn_off = struct.unpack(">IQQIIQ", head[36:72])
    h = bs.impl.header
    assert (l1_size, l1_off, rt_off, rt_clusters, nb, sn_off) == (
        h.l1_size, h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters, 0, 0)
    g.close_all()


class FailingWrites:
    """Makes the file driver's ``n``-th write from now raise ENOSPC (once)."""

    def __init__(self, bs, n: int) -> None:
        self.impl = bs.file.impl
        self.orig = self.impl.write
        self.left = n
        self.impl.write = self._write

    def _write(self, off: int, data) -> None:
        self.left -= 1
        if self.left == 0:
            raise OSError(28, "No space left on device")
        self.orig(off, data)

    def stop(self) -> None:
        self.impl.write = self.orig


@requires_qemu_img
@pytest.mark.parametrize("op", ["create", "delete", "goto"])
def test_write_error_inside_an_operation_changes_nothing(tmp_path, op):
    """A write that fails before the header switch leaves the image as it was, on disk and
    for the open node, which keeps working."""
    p, g, bs, rnd = _image(tmp_path, 4096, "1.1", seed=21)
    bs.snapshot_create("a")
    bs.write(0, b"x" * 90000)
    bs.flush()
    old = _state(p)
    run = {"create": lambda: bs.snapshot_create("b"), "delete": lambda: bs.snapshot_delete(None, "a"),
           "goto": lambda: bs.snapshot_goto("a")}[op]
    fail = FailingWrites(bs, 2)
    try:
        with pytest.raises(OSError):
            run()
    finally:
        fail.stop()
    assert _state(p) == old
    assert [s["name"] for s in bs.snapshot_list()] == old[0] and bs.read(0, SIZE) == old[1]
    run()                                   # and it works the second time
    bs.write(8192, b"y" * 20000)
    g.close_all()
    res, err = _check(p)
    assert not res.get("corruptions") and not res.get("check-errors"), (res, err)


@requires_qemu_img
def test_write_error_in_a_split_create_keeps_the_guest_writes(tmp_path):
    """The commit of a two-phase create fails: the finish reports it, the guest's writes made
    after the cut stay (the next flush commits them, without the snapshot)."""
    p, g, bs, rnd = _image(tmp_path, 4096, "1.1", seed=22)
    bs.flush()
    ticket = bs.snapshot_create_begin("s")
    bs.write(100000, b"g" * 50000)
    after = bs.read(0, SIZE)
    fail = FailingWrites(bs, 2)
    try:
        with pytest.raises(OSError):
            bs.snapshot_create_finish(ticket)
    finally:
        fail.stop()
    assert bs.snapshot_list() == [] and bs.read(0, SIZE) == after
    bs.flush()
    assert _state(p) == ([], after, {})
    g.close_all()
    res, err = _check(p)
    assert not res.get("corruptions") and not res.get("check-errors"), (res, err)

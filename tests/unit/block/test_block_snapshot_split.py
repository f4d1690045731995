"""Internal snapshot creation in two halves (emu.block.qcow2.snapshot): the cut (begin,
drained) and the finish, with guest writes allowed in between and during the finish.

The snapshot must hold exactly the image as it was at the cut, the active image every
write made after it, and the file must stay clean for ``qemu-img check`` (leaks only if a
crash interrupts)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import random
import shutil
import subprocess
import threading

import pytest
from conftest import REPO, requires_qemu_img

from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError

CS = 4096
SIZE = 8 << 20          # 4 L2 tables of 512 clusters each


def _image(tmp_path, name="s.qcow2", seed=1):
    p = str(tmp_path / name)
    create_qcow2(p, SIZE, cluster_size=CS)
    g = BlockGraph()
    bs = g.open_image(p)
    rnd = random.Random(seed)
    # data in three of the four L2 tables' ranges, some clusters twice
    for _ in range(40):
        off = rnd.choice((0, 2 << 20, 6 << 20)) + rnd.randrange(0, (2 << 20) - 70000)
        bs.write(off, rnd.randbytes(rnd.randrange(1, 70000)))
    return p, g, bs


def _qemu_read_snapshot(p: str, name: str, out: str) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw",
                    p, out], check=True, capture_output=True)
    with open(out, "rb") as fh:
        return fh.read()


def _check(p: str) -> dict:
    r = subprocess.run(["qemu-img", "check", "--output=json", p], capture_output=True, text=True)
    return json.loads(r.stdout)


@requires_qemu_img
def test_writes_between_cut_and_finish_stay_out_of_the_snapshot(tmp_path):
    p, g, bs = _image(tmp_path)
    cut = bs.read(0, SIZE)
    ticket = bs.snapshot_create_begin("s")
    rnd = random.Random(2)
    # the "guest" runs again: overwrites (settle + copy-on-write), new tables, zeroes
    for _ in range(30):
        off = rnd.randrange(0, SIZE - 70000)
        bs.write(off, rnd.randbytes(rnd.randrange(1, 70000)))
    bs.write_zeroes(2 << 20, 64 * CS)
    bs.discard(6 << 20, 16 * CS)
    after = bs.read(0, SIZE)
    info = bs.snapshot_create_finish(ticket)
    assert info["name"] == "s" and [s["name"] for s in bs.snapshot_list()] == ["s"]
    assert bs.read(0, SIZE) == after
    g.close_all()
    res = _check(p)
    assert not res.get("corruptions") and not res.get("leaks") and not res.get("check-errors"), res
    assert _qemu_read_snapshot(p, "s", str(tmp_path / "snap.raw")) == cut
    # and emu agrees after a goto
    g = BlockGraph()
    bs = g.open_image(p)
    bs.snapshot_goto("s")
    assert bs.read(0, SIZE) == cut
    g.close_all()


@requires_qemu_img
def test_finish_interleaves_with_a_writer_thread(tmp_path):
    p, g, bs = _image(tmp_path, seed=3)
    cut = bs.read(0, SIZE)
    ticket = bs.snapshot_create_begin("s")
    stop = threading.Event()
    written: list[tuple[int, bytes]] = []

    def writer() -> None:
        rnd = random.Random(4)
        while not stop.is_set() or len(written) < 20:
            off = rnd.randrange(0, SIZE - 9000)
            data = rnd.randbytes(rnd.randrange(1, 9000))
            bs.write(off, data)
            written.append((off, data))

    t = threading.Thread(target=writer)
    t.start()
    try:
        bs.snapshot_create_finish(ticket)
    finally:
        stop.set()
        t.join()
    expect = bytearray(cut)
    for off, data in written:
        expect[off:off + len(data)] = data
    assert bs.read(0, SIZE) == bytes(expect)
    g.close_all()
    res = _check(p)
    assert not res.get("corruptions") and not res.get("leaks") and not res.get("check-errors"), res
    assert _qemu_read_snapshot(p, "s", str(tmp_path / "snap.raw")) == cut


@requires_qemu_img
def test_cancel_leaves_no_trace(tmp_path):
    p, g, bs = _image(tmp_path, seed=5)
    bs.write(0, b"w" * CS)
    bs.flush()
    before = open(p, "rb").read()
    ticket = bs.snapshot_create_begin("s")
    assert [s["name"] for s in bs.snapshot_list()] == ["s"]     # visible to name checks
    with pytest.raises(BlockError, match="already exists"):
        bs.snapshot_create_begin("s")
    bs.snapshot_create_cancel(ticket)
    assert bs.snapshot_list() == []
    assert open(p, "rb").read() == before       # nothing was written
    bs.write(0, b"x" * CS)                        # still written in place
    g.close_all()
    res = _check(p)
    assert not res.get("corruptions") and not res.get("leaks"), res
    assert res["image-end-offset"] == len(before)


@requires_qemu_img
def test_two_snapshots_of_one_cut(tmp_path):
    p, g, bs = _image(tmp_path, seed=6)
    cut = bs.read(0, SIZE)
    t1 = bs.snapshot_create_begin("a")
    t2 = bs.snapshot_create_begin("b")
    assert [s["id"] for s in bs.snapshot_list()] == ["1", "2"]
    bs.write(4096, b"n" * 100000)
    bs.snapshot_create_finish(t1)
    bs.write(3 << 20, b"m" * 5000)
    bs.snapshot_create_finish(t2)
    g.close_all()
    res = _check(p)
    assert not res.get("corruptions") and not res.get("leaks"), res
    assert _qemu_read_snapshot(p, "a", str(tmp_path / "a.raw")) == cut
    assert _qemu_read_snapshot(p, "b", str(tmp_path / "b.raw")) == cut


@requires_qemu_img
def test_two_snapshots_of_one_image_finished_on_two_threads(tmp_path):
    """A transaction may name a device twice: its finishes run on two threads at once."""
    p, g, bs = _image(tmp_path, seed=8)
    cut = bs.read(0, SIZE)
    tickets = [bs.snapshot_create_begin(n) for n in ("a", "b")]
    bs.write(5000, b"q" * 30000)
    threads = [threading.Thread(target=bs.snapshot_create_finish, args=(t,)) for t in tickets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s["name"] for s in bs.snapshot_list()) == ["a", "b"]
    g.close_all()
    res = _check(p)
    assert not res.get("corruptions") and not res.get("leaks"), res
    for n in ("a", "b"):
        assert _qemu_read_snapshot(p, n, str(tmp_path / f"{n}.raw")) == cut


@requires_qemu_img
def test_crash_after_every_write_of_a_split_create(tmp_path):
    """A kill -9 after any single write from the cut to the end of the finish (guest writes
    included) leaves an image qemu-img check finds clean or leaking (not even the
    refcount/OFLAG_COPIED window of QEMU's in-place burst: one header write commits)."""
    script = REPO / "scripts" / "crash-loop-img"
    loader = importlib.machinery.SourceFileLoader("crash_loop_img_split", str(script))
    crash_loop = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(crash_loop)
    p, g, bs = _image(tmp_path, seed=7)
    cp = str(tmp_path / "cp.qcow2")
    fimpl = bs.file.impl
    orig = fimpl.write
    seen: list[tuple[int, str]] = []

    def write(off: int, data: bytes) -> None:
        orig(off, data)
        shutil.copyfile(p, cp)
        r = subprocess.run(["qemu-img", "check", "--output=json", cp], capture_output=True, text=True)
        res = json.loads(r.stdout)
        if res.get("corruptions") or res.get("check-errors"):
            seen.append((off, "window" if crash_loop.copied_window_only(cp, r.stderr, res) else "CORRUPT"))

    ticket = bs.snapshot_create_begin("s")
    fimpl.write = write
    try:
        bs.write(100, b"g" * 10000)              # settles the first table, copies on write
        bs.write((6 << 20) + 5, b"h" * 3000)
        bs.snapshot_create_finish(ticket)
        bs.write(2 << 20, b"i" * 5000)
    finally:
        fimpl.write = orig
    g.close_all()
    assert seen == [], seen

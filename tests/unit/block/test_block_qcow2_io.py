"""qcow2 driver against an in-memory model: writes, zeroes, discard, COW, compression, snapshots."""

from __future__ import annotations

import random
import struct

import pytest

from emu.block.node import BlockGraph
from emu.block.qcow2 import format as f
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError, ImageFormatError

SIZE = 4 << 20


def _exercise(bs, ref: bytearray, cs: int, rnd: random.Random, ops: int) -> None:
    size = len(ref)
    for i in range(ops):
        off = rnd.randrange(size)
        ln = min(rnd.randrange(1, 3 * cs + 5000), size - off)
        op = i % 4
        if op == 0:
            bs.write_zeroes(off, ln)
            ref[off:off + ln] = bytes(ln)
        elif op == 1:
            bs.discard(off, ln)
            a, b = -(-off // cs) * cs, (off + ln) // cs * cs
            if b > a:
                ref[a:b] = bytes(b - a)
        else:
            d = rnd.randbytes(ln)
            bs.write(off, d)
            ref[off:off + ln] = d
    assert bs.read(0, size) == ref


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_random_io_matches_model(tmp_path, cs, compat):
    p = str(tmp_path / "t.qcow2")
    create_qcow2(p, SIZE, cluster_size=cs, compat=compat)
    rnd = random.Random(cs)
    ref = bytearray(SIZE)
    g = BlockGraph()
    bs = g.open_image(p)
    _exercise(bs, ref, cs, rnd, 40)
    g.close_all()
    g = BlockGraph()
    assert g.open_image(p, read_only=True).read(0, SIZE) == ref
    g.close_all()


def test_cow_from_backing_and_zero_over_backing(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (SIZE // 256))
    top = str(tmp_path / "top.qcow2")
    create_qcow2(top, SIZE, backing_file="base.raw", backing_fmt="raw", cluster_size=4096)
    g = BlockGraph()
    bs = g.open_image(top)
    ref = bytearray(base.read_bytes())
    bs.write(5000, b"X" * 10)  # partial cluster: head and tail come from the backing file
    ref[5000:5010] = b"X" * 10
    bs.write_zeroes(8192, 8192)  # whole clusters over backing data: zero flag
    ref[8192:16384] = bytes(8192)
    bs.discard(65536, 4096)  # v3 with backing: discard reads as zeroes
    ref[65536:69632] = bytes(4096)
    assert bs.read(0, SIZE) == ref
    assert bs.block_status(8192, 8192)[0] == "zero"
    assert bs.block_status(1 << 20, 4096)[0] == "unallocated"
    g.close_all()
    assert base.read_bytes()[5000:5010] != b"X" * 10  # backing untouched


def test_compressed_write_and_read(tmp_path):
    p = str(tmp_path / "c.qcow2")
    create_qcow2(p, 1 << 20, cluster_size=65536)
    g = BlockGraph()
    bs = g.open_image(p)
    text = (b"compressible " * 6000)[:65536]
    for i in range(4):
        bs.impl.write_compressed(i * 65536, text)
    bs.impl.write_compressed(4 * 65536, random.Random(1).randbytes(65536))  # falls back to plain
    assert bs.read(0, 4 * 65536) == text * 4
    l2 = bs.impl.l2cache.get(bs.impl.l1[0] & f.L1E_OFFSET_MASK)
    e = struct.unpack_from(">Q", l2, 0)[0]
    assert e & f.QCOW_OFLAG_COMPRESSED
    assert not struct.unpack_from(">Q", l2, 32)[0] & f.QCOW_OFLAG_COMPRESSED
    bs.write(10, b"new")  # overwrite of a compressed cluster allocates a plain one
    assert bs.read(0, 20) == text[:10] + b"new" + text[13:20]
    with pytest.raises(BlockError):
        bs.impl.write_compressed(100, text)
    g.close_all()


def test_snapshots_create_goto_delete(tmp_path):
    p = str(tmp_path / "s.qcow2")
    create_qcow2(p, 1 << 20, cluster_size=4096)
    g = BlockGraph()
    bs = g.open_image(p)
    bs.write(0, b"A" * 8192)
    s1 = bs.snapshot_create("one", vm_clock_ns=1_500_000_000, date=1700000000.25)
    assert s1 == {"id": "1", "name": "one", "vm-state-size": 0, "date-sec": 1700000000,
                  "date-nsec": 250000000, "vm-clock-sec": 1, "vm-clock-nsec": 500000000}
    bs.write(4096, b"B" * 4096)
    assert bs.snapshot_create("two")["id"] == "2"
    with pytest.raises(BlockError, match="already exists"):
        bs.snapshot_create("two")
    bs.snapshot_goto("one")
    assert bs.read(0, 8192) == b"A" * 8192
    bs.snapshot_goto("2")
    assert bs.read(4096, 4096) == b"B" * 4096
    assert bs.snapshot_delete(snapshot_id="1", name="one")["name"] == "one"
    with pytest.raises(BlockError, match="Can't find the snapshot"):
        bs.snapshot_delete(name="one")
    assert [s["id"] for s in bs.snapshot_list()] == ["2"]
    assert bs.snapshot_create("three")["id"] == "3"
    info = bs.image_info()
    assert [s["name"] for s in info["snapshots"]] == ["two", "three"]
    g.close_all()


def test_lazy_refcounts_dirty_bit(tmp_path):
    p = str(tmp_path / "l.qcow2")
    create_qcow2(p, 1 << 20, lazy_refcounts=True)
    g = BlockGraph()
    bs = g.open_image(p)
    assert not bs.image_info()["dirty-flag"]
    bs.write(0, b"x")
    assert bs.image_info()["dirty-flag"]
    assert bs.image_info()["format-specific"]["data"]["lazy-refcounts"] is True
    g.close_all()
    g = BlockGraph()
    assert not g.open_image(p, read_only=True).image_info()["dirty-flag"]
    g.close_all()


def test_grow_and_refcount_table_growth(tmp_path):
    p = str(tmp_path / "g.qcow2")
    create_qcow2(p, 1 << 20, cluster_size=512)
    g = BlockGraph()
    bs = g.open_image(p)
    bs.truncate(64 << 20)
    assert bs.size == 64 << 20
    rnd = random.Random(5)
    data = rnd.randbytes(1 << 20)
    for i in range(0, 64 << 20, 4 << 20):  # many refcount blocks -> table grows
        bs.write(i, data[:20000])
    old_rt = bs.impl.header.refcount_table_clusters
    g.close_all()
    g = BlockGraph()
    bs = g.open_image(p)
    assert bs.read(60 << 20, 20000) == data[:20000]
    assert bs.impl.header.refcount_table_clusters == old_rt
    g.close_all()


def test_unknown_incompatible_bit_and_corrupt_bit(tmp_path):
    p = str(tmp_path / "u.qcow2")
    create_qcow2(p, 1 << 20)
    with open(p, "r+b") as fh:
        fh.seek(72)
        fh.write(struct.pack(">Q", 1 << 40))
    g = BlockGraph()
    with pytest.raises(ImageFormatError, match="Unsupported qcow2 feature"):
        g.open_image(p)
    with open(p, "r+b") as fh:
        fh.seek(72)
        fh.write(struct.pack(">Q", f.QCOW2_INCOMPAT_CORRUPT))
    with pytest.raises(ImageFormatError, match="corrupt; cannot be opened read/write"):
        g.open_image(p)
    assert g.open_image(p, read_only=True).image_info()["format-specific"]["data"]["corrupt"]
    g.close_all()


def test_snapshot_refcount_overflow_is_all_or_nothing(tmp_path):
    p = str(tmp_path / "r1.qcow2")
    create_qcow2(p, 1 << 20, cluster_size=4096, refcount_bits=1)
    g = BlockGraph()
    bs = g.open_image(p)
    bs.write(0, b"d" * 65536)
    free_before = bs.impl.refs.get(40)
    with pytest.raises(ImageFormatError, match="overflow"):
        bs.snapshot_create("s")  # 1-bit refcounts cannot share clusters
    assert bs.snapshot_list() == [] and bs.impl.refs.get(40) == free_before
    bs.write(0, b"e" * 4096)  # still writable in place, nothing half-done
    assert bs.read(0, 8192) == b"e" * 4096 + b"d" * 4096
    g.close_all()

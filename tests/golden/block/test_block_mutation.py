"""Mutation test: hundreds of corrupted/hostile qcow2 images (header, L1, L2, refcount
table and blocks, snapshot table).  Each must give a clean BlockError or a read, never a
traceback or a hang, within a second, and writes never grow the file without bound."""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib

import pytest

from emu.block.node import BlockGraph
from emu.block.qcow2 import format as f
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError

CASES = 500
SIZE = 1 << 20


def _base_image(path: str, compat: str) -> bytes:
    create_qcow2(path, SIZE, cluster_size=4096, compat=compat)
    g = BlockGraph()
    bs = g.open_image(path)
    rnd = random.Random(11)
    bs.write(0, rnd.randbytes(40000))
    bs.impl.write_compressed(65536, b"abc" * 1365 + b"a")
    if compat == "1.1":
        bs.write_zeroes(131072, 8192)
    bs.snapshot_create("s1")
    bs.write(8192, rnd.randbytes(20000))
    bs.snapshot_create("s2")
    g.close_all()
    with open(path, "rb") as fh:
        return fh.read()


def _metadata_regions(img: bytes) -> dict[str, tuple[int, int]]:
    h = f.parse_header(img[:4096])
    cs = h.cluster_size
    regions = {"header": (0, h.header_length), "l1": (h.l1_table_offset, h.l1_size * 8),
               "reftable": (h.refcount_table_offset, 64),
               "snapshots": (h.snapshots_offset, 200)}
    l1 = f.parse_table(img[h.l1_table_offset:h.l1_table_offset + 8], 1)
    regions["l2"] = ((l1[0] & f.L1E_OFFSET_MASK), cs)
    rt = f.parse_table(img[h.refcount_table_offset:h.refcount_table_offset + 8], 1)
    regions["refblock"] = (rt[0] & f.REFT_OFFSET_MASK, 64)
    return regions


HOSTILE = [0, 1, 0x1FF, 0x200, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40, 4096, 8192]


def _mutate(img: bytes, rnd: random.Random, regions: dict[str, tuple[int, int]]) -> bytes:
    b = bytearray(img)
    name = rnd.choice(sorted(regions))
    start, length = regions[name]
    start = min(start, len(b) - 1)
    length = max(1, min(length, len(b) - start - 8))
    kind = rnd.randrange(4)
    if kind == 0:  # flip bits
        for _ in range(rnd.randrange(1, 4)):
            i = start + rnd.randrange(max(1, length))
            b[i] ^= 1 << rnd.randrange(8)
    elif kind == 1:  # hostile 32/64-bit value at an aligned slot
        i = start + rnd.randrange(max(1, length // 4)) * 4
        if rnd.random() < 0.5 and i + 8 <= len(b):
            b[i:i + 8] = struct.pack(">Q", rnd.choice(HOSTILE))
        else:
            b[i:i + 4] = struct.pack(">I", rnd.choice(HOSTILE) & 0xFFFFFFFF)
    elif kind == 2:  # random bytes
        i = start + rnd.randrange(max(1, length))
        n = rnd.randrange(1, 16)
        b[i:i + n] = rnd.randbytes(n)
    else:  # truncate the file
        return bytes(b[:rnd.randrange(0, len(b))])
    return bytes(b)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _exercise(path: str) -> str:
    """Open, read everything, write, snapshot; returns how it ended."""
    g = BlockGraph()
    try:
        bs = g.open_image(path, "qcow2", read_only=True, cache="unsafe")
        bs.read(0, bs.size)
        bs.snapshot_list()
        bs.image_info()
        g.close_all()
        bs = g.open_image(path, "qcow2", cache="unsafe")  # no fdatasync: keeps 300 cases fast
        bs.write(4096, b"w" * 10000)
        bs.write(200000, b"v" * 5000)
        bs.write_zeroes(0, 4096)
        bs.snapshot_create("m")
        bs.snapshot_delete(name="m")
        bs.flush()
        return "ok"
    except BlockError as err:
        msg = str(err)
        assert msg and "\n" not in msg.strip().split("\nIs another")[0], msg
        return "error"
    finally:
        try:
            g.close_all()
        except BlockError:
            pass


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_mutated_images_fail_cleanly(tmp_path, compat):
    base = str(tmp_path / "base.qcow2")
    img = _base_image(base, compat)
    regions = _metadata_regions(img)
    rnd = random.Random(compat)
    outcomes = {"ok": 0, "error": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for n in range(CASES // 2):
            m = _mutate(img, rnd, regions)
            p = str(tmp_path / "m.qcow2")
            with open(p, "wb") as fh:
                fh.write(m)
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                outcomes[_exercise(p)] += 1
            except _Timeout:
                pytest.fail(f"case {n}: hang")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert time.monotonic() - t0 < 2.0, f"case {n} took too long"
            assert os.path.getsize(p) <= len(m) + (32 << 20), f"case {n}: file grew without bound"
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["error"] > 10 and outcomes["ok"] > 10, outcomes


def _patch(img: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_named_hostile_images(tmp_path):
    """The cases the brief names, each a one-line ImageFormatError in well under a second."""
    base = str(tmp_path / "base.qcow2")
    img = _base_image(base, "1.1")
    h = f.parse_header(img[:4096])
    l2_off = f.parse_table(img[h.l1_table_offset:h.l1_table_offset + 8], 1)[0] & f.L1E_OFFSET_MASK
    cases = {
        "huge l1_size": (_patch(img, 36, ">I", 0x7FFFFFFF), "L1 table too large"),
        "l1 beyond EOF": (_patch(img, 36, ">I", 100000), "beyond the end"),
        "huge refcount table": (_patch(img, 56, ">I", 0x7FFFFFFF), "Reference count table too large"),
        "refcount table beyond EOF": (_patch(img, 48, ">Q", 1 << 40), "beyond the end"),
        "L1 overlaps refcount table": (_patch(img, 40, ">Q", h.refcount_table_offset), "overlap"),
        "L1 inside the header": (_patch(img, 40, ">Q", 0), "Metadata overlap"),
        "L2 entry into the header": (_patch(img, l2_off + 8, ">Q", f.QCOW_OFLAG_COPIED | 0), None),
        "L2 entry into the L1 table": (_patch(img, l2_off + 8, ">Q", f.QCOW_OFLAG_COPIED | h.l1_table_offset),
                                       "Preventing invalid write on metadata"),
        "L2 entry into the refcount table": (_patch(img, l2_off + 8, ">Q",
                                                    f.QCOW_OFLAG_COPIED | h.refcount_table_offset),
                                             "Preventing invalid write on metadata"),
        "too many snapshots": (_patch(img, 60, ">I", 1 << 20), "Snapshot table too large"),
    }
    for name, (data, want) in cases.items():
        p = str(tmp_path / "h.qcow2")
        with open(p, "wb") as fh:
            fh.write(data)
        t0 = time.monotonic()
        g = BlockGraph()
        try:
            bs = g.open_image(p, "qcow2", cache="unsafe")
            bs.read(0, bs.size)
            bs.write(4096, b"x" * 4096)  # must never land on the header
            bs.flush()
            assert want is None, name
        except BlockError as err:
            assert want is not None and want in str(err), (name, str(err))
            assert "\n" not in str(err)
        finally:
            try:
                g.close_all()
            except BlockError:
                pass
        assert time.monotonic() - t0 < 1.0, name
        with open(p, "rb") as fh:
            assert fh.read(4)[:4] == b"QFI\xfb", name  # the header was not overwritten

"""Unit tests for emu.block.qcow2.format: header, extensions, entries, snapshot table."""

from __future__ import annotations

import pytest

from emu.block.qcow2 import format as f
from emu.errors import ImageFormatError


def _v3_header(**kw) -> f.QCowHeader:
    h = f.QCowHeader(size=1 << 30, l1_size=2, l1_table_offset=0x30000,
                     refcount_table_offset=0x10000, refcount_table_clusters=1)
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def test_header_roundtrip_v3_with_backing():
    h = _v3_header(backing_file="base.img", backing_format="raw")
    raw = f.serialize_header(h) + b"\0" * 1000
    g = f.parse_header(raw)
    assert (g.version, g.size, g.l1_size, g.header_length) == (3, 1 << 30, 2, 112)
    assert g.backing_file == "base.img" and g.backing_format == "raw"
    assert ("lazy refcounts" in [n for _, _, n in g.feature_table])
    assert g.refcount_bits == 16


def test_header_v2_is_72_bytes():
    h = _v3_header(version=2)
    raw = f.serialize_header(h)
    assert raw[:8] == b"QFI\xfb\0\0\0\x02" and len(raw) == 80  # 72 + end-of-extensions
    assert f.parse_header(raw + b"\0" * 64).header_length == 72


def test_unknown_extension_preserved():
    h = _v3_header()
    h.unknown_extensions.append(f.HeaderExtension(0x12345678, b"abc"))
    g = f.parse_header(f.serialize_header(h) + b"\0" * 64)
    assert g.unknown_extensions == [f.HeaderExtension(0x12345678, b"abc")]


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b.__setitem__(slice(0, 4), b"XXXX"), "not in qcow2 format"),
    (lambda b: b.__setitem__(slice(4, 8), (9).to_bytes(4, "big")), "Unsupported qcow2 version 9"),
    (lambda b: b.__setitem__(slice(20, 24), (40).to_bytes(4, "big")), "Unsupported cluster size"),
    (lambda b: b.__setitem__(slice(96, 100), (7).to_bytes(4, "big")), "may not exceed 64 bits"),
    (lambda b: b.__setitem__(slice(100, 104), (50).to_bytes(4, "big")), "header too short"),
])
def test_header_rejects(mutate, msg):
    raw = bytearray(f.serialize_header(_v3_header()) + b"\0" * 64)
    mutate(raw)
    with pytest.raises(ImageFormatError, match=msg):
        f.parse_header(bytes(raw))


def test_check_features_refuses_unknown_and_extl2():
    h = _v3_header(incompatible_features=1 << 20)
    with pytest.raises(ImageFormatError, match="Unsupported qcow2 feature"):
        f.check_features(h)
    with pytest.raises(ImageFormatError, match="extended L2"):
        f.check_features(_v3_header(incompatible_features=f.QCOW2_INCOMPAT_EXTL2))
    with pytest.raises(ImageFormatError, match="external data file"):
        f.check_features(_v3_header(incompatible_features=f.QCOW2_INCOMPAT_DATA_FILE))
    f.check_features(_v3_header(incompatible_features=f.QCOW2_INCOMPAT_DIRTY))


def test_compressed_layout_per_cluster_bits():
    lay = f.CompressedLayout.for_cluster_bits(16)
    assert lay.csize_shift == 54 and lay.csize_mask == 0xFF
    entry = lay.encode(0x50000 + 100, 1000)
    assert entry & f.QCOW_OFLAG_COMPRESSED
    off, size = lay.decode(entry)
    assert off == 0x50000 + 100 and size >= 1000 and size < 1000 + 512


@pytest.mark.parametrize("order", range(7))
def test_refcount_widths(order):
    bits = 1 << order
    block = bytearray(f.refcount_block_entries(9, order) * bits // 8)
    assert len(block) == 512
    top = (1 << bits) - 1
    f.write_refcount(block, 3, order, top)
    f.write_refcount(block, 2, order, 1)
    assert f.read_refcount(block, 3, order) == top
    assert f.read_refcount(block, 2, order) == 1
    assert f.read_refcount(block, 4, order) == 0


def test_snapshot_table_roundtrip():
    s = f.QCowSnapshot(0x70000, 16, "1", "first", 1700000000, 5, 3_500_000_000, 0, disk_size=1 << 30,
                       icount=None)
    raw = f.serialize_snapshot_table([s, s])
    assert len(raw) % 8 == 0
    a, b = f.parse_snapshot_table(raw, 2)
    assert a.name == "first" and b.disk_size == 1 << 30 and a.icount == 0xFFFFFFFFFFFFFFFF
    assert a.info()["vm-clock-sec"] == 3 and "icount" not in a.info()
    with pytest.raises(ImageFormatError):
        f.parse_snapshot_table(raw[:50], 1)

"""create_qcow2 writes a finished image in one go when its layout is known in advance; the
bytes must be those of QEMU's way (write an empty image, open it, grow it, record the
backing file), which create_by_growing still does for every other layout."""

from __future__ import annotations

import os

import pytest

from emu.block.node import BlockGraph
from emu.block.qcow2 import create as c
from emu.block.qcow2.create import create_by_growing, create_qcow2, initial_header
from emu.errors import ImageFormatError

VERSIONS = {"0.10": 2, "1.1": 3}


def _grown(path, size, *, cluster_size=65536, compat="1.1", lazy_refcounts=False,
           refcount_bits=16, backing_file=None, backing_fmt=None):
    h = initial_header(VERSIONS[compat], cluster_size.bit_length() - 1,
                       refcount_bits.bit_length() - 1, lazy_refcounts)
    create_by_growing(str(path), h, size, backing_file, backing_fmt, "off", True)
    return path.read_bytes()


CASES = [
    dict(size=1 << 30),
    dict(size=0),
    dict(size=512),
    dict(size=(1 << 30) + 512),
    dict(size=1 << 40),
    dict(size=(1 << 50) + (7 << 20)),            # L1 of 2^21 + 1 entries: 257 clusters
    dict(size=1 << 30, compat="0.10"),
    dict(size=1 << 30, lazy_refcounts=True),
    dict(size=64 << 20, cluster_size=512),
    dict(size=3 << 20, cluster_size=4096),
    dict(size=1 << 30, cluster_size=2 << 20),
    dict(size=8 << 20, cluster_size=512, refcount_bits=1),
    dict(size=1 << 30, refcount_bits=64),
    dict(size=1 << 30, refcount_bits=2),
    dict(size=1 << 30, backing_file="base.qcow2", backing_fmt="qcow2"),
    dict(size=1 << 30, compat="0.10", backing_file="/some/where/base.raw", backing_fmt="raw"),
    dict(size=1 << 20, cluster_size=512, backing_file="b" * 300, backing_fmt="qcow2"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())[:60])
def test_direct_image_equals_grown_image(tmp_path, case):
    case = dict(case)
    size = case.pop("size")
    direct = tmp_path / "direct.qcow2"
    create_qcow2(str(direct), size, **case)
    grown = _grown(tmp_path / "grown.qcow2", size, **case)
    assert direct.read_bytes() == grown
    # and it opens as the image asked for
    g = BlockGraph()
    try:
        bs = g.open_image(str(direct), "qcow2", backing=None)
        assert bs.size == size
        assert bs.backing_file == case.get("backing_file")
        assert bs.impl.cluster_size == case.get("cluster_size", 65536)
    finally:
        g.close_all()


def test_layouts_the_first_refcount_block_cannot_count_are_grown(tmp_path):
    """512-byte clusters with 16-bit refcounts count 256 clusters in the first block; a
    600 MiB image's L1 table alone takes 300 (19200 entries): QEMU's way places them."""
    size = 600 << 20
    p = tmp_path / "big.qcow2"
    create_qcow2(str(p), size, cluster_size=512)
    assert p.read_bytes() == _grown(tmp_path / "grown.qcow2", size, cluster_size=512)


def test_header_too_small_for_the_backing_name_fails_as_before(tmp_path):
    p = tmp_path / "o.qcow2"
    with pytest.raises(ImageFormatError, match="do not fit in the first cluster"):
        create_qcow2(str(p), 1 << 20, cluster_size=512, backing_file="x" * 600,
                     backing_fmt="qcow2")


def test_not_durable_leaves_the_sync_to_the_caller(tmp_path):
    """durable=False writes the same bytes; sync_file makes them durable (fdatasync)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(str(a), 1 << 30, durable=False)
    c.sync_file(str(a))
    create_qcow2(str(b), 1 << 30)
    assert a.read_bytes() == b.read_bytes()
    assert os.path.getsize(a) == 3 * 65536 + 16

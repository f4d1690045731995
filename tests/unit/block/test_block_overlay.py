"""Overlays, rebase (safe and unsafe), commit and drop_intermediate as library calls."""

from __future__ import annotations

import pytest

from emu.block.node import BlockGraph
from emu.block.overlay import commit, create_overlay, drop_intermediate, is_allocated_above, rebase, set_backing
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError

MB = 1 << 20


@pytest.fixture
def chain(tmp_path):
    g = BlockGraph()
    base_p = str(tmp_path / "base.qcow2")
    create_qcow2(base_p, 2 * MB, cluster_size=4096)
    base = g.open_image(base_p, node_name="base")
    base.write(0, b"\x01" * (2 * MB))
    mid = create_overlay(g, base, str(tmp_path / "mid.qcow2"), node_name="mid")
    mid.write(4096, b"\x02" * 4096)
    top = create_overlay(g, mid, str(tmp_path / "top.qcow2"), node_name="top")
    top.write(8192, b"\x03" * 4096)
    yield g, base, mid, top
    g.close_all()


def test_overlay_reads_through_and_records_backing(chain):
    g, base, mid, top = chain
    assert top.backing is mid and mid.backing is base
    assert top.read(0, 3 * 4096) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    assert top.backing_file == mid.filename and top.backing_format == "qcow2"
    assert is_allocated_above(top, base, 4096, 4096) == (True, 4096)
    assert is_allocated_above(top, base, 65536, 4096)[0] is False


def test_commit_into_base_then_drop_intermediate(chain):
    g, base, mid, top = chain
    assert commit(top, base) == 65536  # one 64 KiB overlay cluster holds both writes
    assert base.read(0, 3 * 4096) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    drop_intermediate(top, base)
    assert top.backing is base and top.backing_file == base.filename
    assert g.lookup("mid") is not None  # user-opened nodes stay until removed
    with pytest.raises(BlockError, match="not in the backing chain"):
        commit(base, top)


def test_safe_rebase_keeps_content_unsafe_does_not(chain, tmp_path):
    g, base, mid, top = chain
    before = top.read(0, 2 * MB)
    rebase(top, base)  # skip mid: its cluster must be copied into top
    assert top.backing is base and top.read(0, 2 * MB) == before
    other_p = str(tmp_path / "other.qcow2")
    create_qcow2(other_p, 2 * MB)
    other = g.open_image(other_p, node_name="other")
    set_backing(top, other)  # rebase -u: content now shows the new (empty) backing
    assert top.read(65536, 4096) == bytes(4096) and top.read(8192, 4096) == b"\x03" * 4096
    with pytest.raises(BlockError, match="loop"):
        set_backing(other, top)


def test_writethrough_mode_flag(tmp_path):
    p = str(tmp_path / "w.qcow2")
    create_qcow2(p, MB)
    g = BlockGraph()
    assert g.open_image(p, cache="writethrough").cache_writeback is False
    g.close_all()
    g = BlockGraph()
    bs = g.open_image(p, cache="directsync")
    assert bs.cache_writeback is False and bs.cache_direct
    bs.write(0, b"abc")
    assert bs.read(0, 3) == b"abc"
    g.close_all()


def test_safe_rebase_onto_a_backing_of_a_standalone_image(tmp_path):
    g = BlockGraph()
    lone_p, new_p = str(tmp_path / "lone.qcow2"), str(tmp_path / "new.qcow2")
    create_qcow2(lone_p, MB)
    create_qcow2(new_p, MB)
    lone = g.open_image(lone_p)
    lone.write(0, b"L" * 4096)
    new = g.open_image(new_p, node_name="new")
    new.write(0, b"N" * MB)
    rebase(lone, new)  # unallocated zeroes of `lone` must stay zeroes
    assert lone.backing is new
    assert lone.read(0, 8192) == b"L" * 4096 + bytes(4096)
    assert lone.read(MB - 10, 10) == bytes(10)
    g.close_all()

"""BlockGraph / BlockDriverState: names, probing, backing chains, locks, blockdev-add, raw."""

from __future__ import annotations

import os
import re

import pytest

from emu.block.node import BlockGraph, probe_format
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError, ImageFormatError, ImageOpenError


@pytest.fixture
def graph():
    g = BlockGraph()
    yield g
    g.close_all()


def _raw(path, size=1 << 20, fill=b"\0"):
    with open(path, "wb") as fh:
        fh.write(fill * size)
    return str(path)


def test_probe_and_auto_names(tmp_path, graph):
    q = str(tmp_path / "a.qcow2")
    create_qcow2(q, 1 << 20)
    r = _raw(tmp_path / "b.raw")
    a = graph.open_image(q)
    b = graph.open_image(r, node_name="rawdisk")
    assert (a.drv, b.drv) == ("qcow2", "raw")
    assert re.fullmatch(r"#block\d+", a.node_name) and a.file.drv == "file"
    assert graph.lookup("rawdisk") is b
    assert graph.nodes()[0] is b  # newest first
    assert len({n.node_name for n in graph.nodes()}) == 4
    with pytest.raises(BlockError, match="Duplicate nodes with node-name='rawdisk'"):
        graph.open_image(r, node_name="rawdisk", read_only=True, force_share=True)
    graph.remove(b)
    assert graph.lookup("rawdisk") is None and len(graph.nodes()) == 2
    assert probe_format(b"QFI\xfb\0\0\0\x03", "x") == "qcow2" and probe_format(b"hello", "x") == "raw"


def test_missing_file_message(tmp_path, graph):
    with pytest.raises(ImageOpenError, match=r"Could not open '.*nope': No such file or directory"):
        graph.open_image(str(tmp_path / "nope"))


def test_write_lock_conflict_and_force_share(tmp_path):
    q = str(tmp_path / "a.qcow2")
    create_qcow2(q, 1 << 20)
    g1, g2 = BlockGraph(), BlockGraph()
    try:
        g1.open_image(q)
        with pytest.raises(ImageOpenError, match='Failed to get "write" lock'):
            g2.open_image(q)
        with pytest.raises(ImageOpenError, match='Failed to get shared "write" lock'):
            g2.open_image(q, read_only=True)
        ro = g2.open_image(q, read_only=True, force_share=True)
        assert ro.read(0, 512) == bytes(512)
        with pytest.raises(BlockError, match="force-share=on can only be used with read-only"):
            g2.open_image(q, force_share=True)
    finally:
        g1.close_all()
        g2.close_all()
    # Locks are gone after close: a writer gets in.
    g3 = BlockGraph()
    g3.open_image(q)
    g3.close_all()


def test_backing_chain_any_depth_and_relative_names(tmp_path, graph):
    base = _raw(tmp_path / "base.raw", 1 << 20, b"\x01")
    prev, prev_fmt = "base.raw", "raw"
    for i in range(5):
        name = f"l{i}.qcow2"
        create_qcow2(str(tmp_path / name), 1 << 20, backing_file=prev, backing_fmt=prev_fmt)
        prev, prev_fmt = name, "qcow2"
    top = graph.open_image(str(tmp_path / prev))
    chain = top.backing_chain()
    assert len(chain) == 6 and chain[-1].filename == os.path.join(str(tmp_path), "base.raw")
    assert all(n.read_only for n in chain[1:]) and not top.read_only
    assert top.read(4096, 10) == b"\x01" * 10
    top.write(4096, b"\x02" * 10)
    assert top.read(4090, 20) == b"\x01" * 6 + b"\x02" * 10 + b"\x01" * 4
    info = top.image_info()
    assert info["backing-filename"] == "l3.qcow2" and info["backing-filename-format"] == "qcow2"
    assert info["full-backing-filename"] == str(tmp_path / "l3.qcow2")
    assert base


def test_backing_loop_is_refused(tmp_path, graph):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create_qcow2(a, 1 << 20)
    create_qcow2(b, 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2")
    # Point a at b: a -> b -> a.
    g = BlockGraph()
    n = g.open_image(a, backing=None)
    n.impl.set_backing("b.qcow2", "qcow2")
    g.close_all()
    with pytest.raises(ImageFormatError, match="loop"):
        graph.open_image(a)
    assert graph.nodes() == []


def test_blockdev_add_forms(tmp_path, graph):
    q = str(tmp_path / "a.qcow2")
    create_qcow2(q, 1 << 20)
    f = graph.blockdev_add({"driver": "file", "node-name": "proto", "filename": q})
    top = graph.blockdev_add({"driver": "qcow2", "node-name": "disk", "file": "proto"})
    assert top.file is f and top.size == 1 << 20
    top.write(0, b"hi")
    r = _raw(tmp_path / "r.raw", 8192, b"\x07")
    rn = graph.blockdev_add({"driver": "raw", "node-name": "win", "offset": 512, "size": 1024,
                             "read-only": True, "file": {"driver": "file", "filename": r}})
    assert rn.size == 1024 and rn.read_only and rn.read(0, 4) == b"\x07" * 4
    with pytest.raises(BlockError):
        rn.read(1020, 8)
    with pytest.raises(BlockError, match="Cannot find device='' nor node-name='nosuch'"):
        graph.blockdev_add({"driver": "qcow2", "file": "nosuch"})
    with pytest.raises(BlockError, match="has to be smaller or equal"):
        graph.blockdev_add({"driver": "raw", "offset": 4096, "size": 8192, "read-only": True,
                            "file": {"driver": "file", "filename": r}})


def test_raw_window_writes_stay_inside(tmp_path, graph):
    r = _raw(tmp_path / "r.raw", 4096, b"\0")
    n = graph.open_image(r, "raw", options={"offset": 1024, "size": 1024})
    n.write(0, b"\xff" * 1024)
    with pytest.raises(BlockError):
        n.write(1000, b"x" * 100)
    graph.close_all()
    data = open(r, "rb").read()
    assert data[:1024] == bytes(1024) and data[1024:2048] == b"\xff" * 1024 and data[2048:] == bytes(2048)


def test_file_discard_punches_hole_and_direct_io(tmp_path, graph):
    r = _raw(tmp_path / "r.raw", 1 << 20, b"\x55")
    n = graph.open_image(r, "raw", cache="none")
    assert n.file.impl.direct
    n.write(1000, b"abc" * 700)  # unaligned write through the bounce buffer
    assert n.read(1000, 2100) == b"abc" * 700 and n.read(999, 1) == b"\x55"
    n.discard(65536, 65536)
    assert n.read(65536, 65536) == bytes(65536)
    n.flush()
    assert os.stat(r).st_blocks * 512 < (1 << 20)
    assert n.size == 1 << 20


def test_reopen_read_write_and_back(tmp_path):
    base = str(tmp_path / "base.qcow2")
    create_qcow2(base, 1 << 20)
    top = str(tmp_path / "top.qcow2")
    create_qcow2(top, 1 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    g = BlockGraph()
    t = g.open_image(top)
    b = t.backing
    assert b.read_only
    with pytest.raises(BlockError):
        b.write(0, b"x")
    b.reopen(False)  # as block-commit does
    b.write(0, b"base")
    other = BlockGraph()
    with pytest.raises(ImageOpenError, match='Failed to get "write" lock'):
        other.open_image(base)
    b.reopen(True)
    assert b.read_only and t.read(0, 4) == b"base"
    other.open_image(base, read_only=True)  # only readers now
    other.close_all()
    g.close_all()


def test_before_write_hook_sees_old_data(tmp_path, graph):
    p = str(tmp_path / "h.qcow2")
    create_qcow2(p, 1 << 20)
    bs = graph.open_image(p)
    bs.write(0, b"old!")
    seen = []
    bs.before_write.append(lambda off, n: seen.append((off, n, bs.read(off, n))))
    bs.write(0, b"new!")
    bs.write_zeroes(0, 2)
    assert seen == [(0, 4, b"old!"), (0, 2, b"ne")]
    assert bs.read(0, 4) == b"\0\0w!"

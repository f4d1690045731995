"""qcow2 guest discard (QEMU 7.2's discard_in_l2_slice, full_discard=false) in emu's driver alone:
zero clusters on v3, unallocated on v2, refcounts of the freed clusters back to 0, and the freed
clusters punched in the file only with pass-discard-request on (the default)."""

from __future__ import annotations

import os

import pytest

from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2

CS = 65536


@pytest.mark.parametrize("compat,kind", [("0.10", "zero-unallocated"), ("1.1", "zero")])
@pytest.mark.parametrize("passdown", [True, False])
def test_discard_frees_and_punches(tmp_path, compat, kind, passdown):
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 4 << 20, cluster_size=CS, compat=compat)
    g = BlockGraph()
    bs = g.open_image(p, options={"pass-discard-request": passdown})
    bs.write(0, b"\x5a" * (16 * CS))
    bs.flush()
    hosts = [bs.impl.map_run(i * CS, CS)[1] for i in range(16)]
    assert all(bs.impl.refs.get(h // CS) == 1 for h in hosts)
    before = os.stat(p).st_blocks
    bs.discard(CS // 2, 9 * CS)                # clusters 1..8 whole, halves of 0 and 9 ignored
    assert bs.read(0, 16 * CS) == b"\x5a" * CS + bytes(8 * CS) + b"\x5a" * (7 * CS)
    assert bs.block_status(CS, 8 * CS)[:2] == (kind, 8 * CS)
    assert bs.block_status(0, CS)[0] == "data" and bs.block_status(9 * CS, CS)[0] == "data"
    bs.flush()
    assert [bs.impl.refs.get(h // CS) for h in hosts] == [1] + [0] * 8 + [1] * 7
    punched = (before - os.stat(p).st_blocks) * 512
    assert punched == (8 * CS if passdown else 0)
    g.close_all()
    g = BlockGraph()
    assert g.open_image(p, read_only=True).read(0, 16 * CS) == \
        b"\x5a" * CS + bytes(8 * CS) + b"\x5a" * (7 * CS)
    g.close_all()

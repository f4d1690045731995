"""Public node API used by QMP: node-name validation before anything is created, and
flipping a node read-only/read-write with QEMU's locks."""

from __future__ import annotations

import subprocess

import pytest
from conftest import requires_qemu_img

from emu.block.node import BlockGraph, InvalidNodeNameError, NodeNameInUseError
from emu.block.qcow2.create import create_qcow2
from emu.errors import BlockError


def test_check_node_name_in_qemu_order(tmp_path):
    p = str(tmp_path / "n.qcow2")
    create_qcow2(p, 1 << 20)
    g = BlockGraph()
    g.open_image(p, node_name="taken")
    for ok in ("a", "x-y.z_1", "A" * 31):
        g.check_node_name(ok)
    for bad in ("#bad", "", "1a", "-a", "a b", "é", "aé"):
        with pytest.raises(InvalidNodeNameError, match=r"^Invalid node-name: '"):
            g.check_node_name(bad)
    with pytest.raises(NodeNameInUseError, match=r"^Duplicate nodes with node-name='taken'$"):
        g.check_node_name("taken")
    with pytest.raises(NodeNameInUseError, match="^node-name=drive0 is conflicting with a device id$"):
        g.check_node_name("drive0", device_names=["drive0"])
    with pytest.raises(InvalidNodeNameError, match="^Node name too long$"):
        g.check_node_name("a" * 32)
    # The check creates nothing; opening with a bad name fails the same way.
    assert [n.node_name for n in g.nodes() if not n.auto] == ["taken"]
    with pytest.raises(BlockError, match="Invalid node-name: '#x'"):
        g.open_image(p, node_name="#x", read_only=True, force_share=True)
    assert g.node_name_in_use("taken") and not g.node_name_in_use("free")
    g.close_all()


@requires_qemu_img
def test_set_read_only_switches_locks_and_writes(tmp_path):
    p = str(tmp_path / "ro.qcow2")
    create_qcow2(p, 1 << 20)
    g = BlockGraph()
    bs = g.open_image(p)
    bs.write(0, b"w" * 4096)
    # While we write, qemu-img may not open it read-write.
    r = subprocess.run(["qemu-img", "check", p], capture_output=True, text=True)
    assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr
    bs.set_read_only(True)
    assert bs.read_only and bs.file.read_only
    with pytest.raises(BlockError, match="read-only"):
        bs.write(0, b"x")
    # Metadata was written back and our write lock dropped: qemu-img sees a clean image.
    r = subprocess.run(["qemu-img", "check", p], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bs.set_read_only(False)
    bs.write(4096, b"y" * 4096)
    assert bs.read(0, 8192) == b"w" * 4096 + b"y" * 4096
    g.close_all()

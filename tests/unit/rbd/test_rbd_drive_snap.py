"""``-drive file=rbd:...@snap`` as QEMU 7.2 opens it: auto-read-only makes the rbd node
read-only instead of refusing it, a writable guest device on it is refused with QEMU's text,
and the rbd node's ImageInfo carries QEMU's ``format-specific {"type": "rbd"}`` and the
object size as cluster size (each compared with qemu-system-x86_64 on the same image)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import rbd_ceph_cluster
from conftest import SocketLines, requires_qemu_system
from emu.cli import OptionError, parse_args
from emu.machine.drives import open_drives
from emu.machine.pc import Machine
from emu.qmp.commands import CommandContext, load_all
from emu.qmp.protocol import dispatch

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()


class _S:
    negotiated = True
    oob_enabled = False


@pytest.fixture(scope="module")
def snap_image(ceph_conf):
    name = "ds" + uuid.uuid4().hex[:8]
    for cmd in (["create", "--size", "8M", f"rbd/{name}"], ["snap", "create", f"rbd/{name}@s1"]):
        subprocess.run(["rbd", "-c", ceph_conf, *cmd], check=True, capture_output=True, timeout=60)
    return name


def _emu(argv: list[str]) -> Machine:
    load_all()
    cfg, _ = parse_args(["-S", *argv])
    m = Machine(cfg)
    try:
        open_drives(m)
    except BaseException:
        m.close()
        raise
    return m


def _run(m: Machine, cmd: str, **args: Any) -> Any:
    req: dict = {"execute": cmd}
    if args:
        req["arguments"] = args
    return dispatch(req, CommandContext(m, _S()), negotiated=True, oob_enabled=False)


def _rbd_node(nodes: list[dict]) -> dict:
    [node] = [n for n in nodes if n["drv"] == "rbd"]
    node = dict(node)
    node.pop("node-name")
    return node


def _qemu_nodes(argv: list[str], tmp: Path) -> list[dict]:
    sock = str(tmp / "q.sock")
    p = subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", *argv,
                          "-qmp", f"unix:{sock},server=on,wait=off"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < end, p.stderr.read()
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = SocketLines(s)
        f.readline()
        for cmd in ("qmp_capabilities", "query-named-block-nodes"):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "event" in (rsp := json.loads(f.readline())):
                pass
        s.close()
        return rsp["return"]
    finally:
        p.kill()
        p.wait(10)


def test_drive_at_snapshot_opens_read_only(ceph_conf, snap_image, tmp_path):
    drive = f"file=rbd:rbd/{snap_image}@s1:conf={ceph_conf},format=raw,if=none,id=d0"
    m = _emu(["-drive", drive])
    try:
        nodes = _run(m, "query-named-block-nodes")["return"]
    finally:
        m.close()
    node = _rbd_node(nodes)
    assert node["ro"] is True
    assert node["image"]["format-specific"] == {"type": "rbd", "data": {}}
    assert node["image"]["cluster-size"] == 4 << 20
    if requires_qemu_system.args[0]:
        return
    # QEMU's rbd node: the same members and values.
    assert node == _rbd_node(_qemu_nodes(["-drive", drive], tmp_path))


@pytest.mark.parametrize("interface,loc", [("virtio", True), ("ide", False)])
def test_writable_device_on_snapshot_refused(ceph_conf, snap_image, interface, loc, tmp_path):
    drive = f"file=rbd:rbd/{snap_image}@s1:conf={ceph_conf},format=raw,if={interface}"
    with pytest.raises(OptionError) as ei:
        _emu(["-drive", drive])
    assert str(ei.value) == "Block node is read-only"
    # if=virtio creates its device with the -drive option (QEMU prefixes it), IDE later.
    assert bool(ei.value.loc) == loc
    if interface == "virtio":      # a read-only virtio disk on the snapshot is fine
        _emu(["-drive", drive + ",readonly=on"]).close()
    if requires_qemu_system.args[0]:
        return
    q = subprocess.run(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-drive", drive],
                       capture_output=True, text=True, timeout=60)
    last = q.stderr.strip().splitlines()[-1]
    assert q.returncode == 1
    assert last == ("qemu-system-x86_64: " + (f"-drive {drive}: " if loc else "") + "Block node is read-only")

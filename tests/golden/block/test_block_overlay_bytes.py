"""External overlays are byte-identical to the ones qemu-img and QEMU's blockdev-snapshot-sync
write; the file node length QEMU reports (197120 for a 196616-byte overlay) is its
sector-rounded length, not extra bytes in the file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

from conftest import requires_qemu_img, requires_qemu_io, requires_qemu_system

from emu.block.node import BlockGraph
from emu.block.overlay import create_overlay


def _chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x12 1M 64k",
                    base], check=True, capture_output=True)
    return base


@requires_qemu_img
@requires_qemu_io
def test_two_deep_overlay_chain_matches_qemu_img(tmp_path):
    base = _chain(tmp_path)
    g = BlockGraph()
    node = g.open_image(base)
    ours = []
    for k in (1, 2):
        ov = str(tmp_path / f"emu-ov{k}.qcow2")
        node = create_overlay(g, node, ov)
        ours.append(ov)
    g.close_all()
    ref_backing = base
    for k, ov in enumerate(ours, 1):
        ref = str(tmp_path / f"ref-ov{k}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", ref_backing, "-F", "qcow2", ref],
                       check=True)
        assert open(ov, "rb").read() == open(ref, "rb").read()
        ref_backing = ov
    # The second overlay names the first (what blockdev-snapshot-sync records).
    assert os.path.getsize(ours[1]) == 196616
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", ours[1]],
                                     capture_output=True, text=True, check=True).stdout)
    assert [i["filename"] for i in info] == [ours[1], ours[0], base]


def _qmp(sock_path: str):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rwb")
    f.readline()

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "event" not in msg:
                return msg
    cmd("qmp_capabilities")
    return cmd


@requires_qemu_img
@requires_qemu_io
@requires_qemu_system
def test_overlay_matches_qemu_blockdev_snapshot_sync(tmp_path):
    base = _chain(tmp_path)
    sock = str(tmp_path / "q.sock")
    p = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults",
                          "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off",
                          "-drive", f"file={base},format=qcow2,if=none,id=d0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cmd = _qmp(sock)
        q1, q2 = str(tmp_path / "q-ov1.qcow2"), str(tmp_path / "q-ov2.qcow2")
        assert cmd("blockdev-snapshot-sync", device="d0", **{"snapshot-file": q1}) == {"return": {}}
        assert cmd("blockdev-snapshot-sync", device="d0", **{"snapshot-file": q2}) == {"return": {}}
        files = {n["file"]: n["image"]["virtual-size"] for n in cmd("query-named-block-nodes")["return"]
                 if n["drv"] == "file"}
        cmd("quit")
    finally:
        p.wait(30)
    # QEMU reports the file node rounded up to 512 bytes; the file itself is 196616 bytes.
    assert files[q2] == 197120 and os.path.getsize(q2) == 196616
    g = BlockGraph()
    node = g.open_image(base)
    e1, e2 = str(tmp_path / "e-ov1.qcow2"), str(tmp_path / "e-ov2.qcow2")
    node = create_overlay(g, node, e1)
    node = create_overlay(g, node, e2)
    g.close_all()
    # Same bytes once the (different) backing file names are swapped back.
    assert open(e1, "rb").read() == open(q1, "rb").read()
    assert open(e2, "rb").read().replace(e1.encode(), q1.encode()) == open(q2, "rb").read()

"""``-blockdev`` nodes attached to devices (``-device virtio-blk-pci,drive=<node-name>``,
``-device ide-hd,drive=<node-name>``), side by side with qemu-system-x86_64 7.2.

Each such device gets a BlockBackend of its own with no name: query-block and
query-blockstats list it as device ``""`` with its qdev path, HMP ``info block`` by its node
name; internal snapshots by node name work on it.  ``-blockdev`` takes JSON as well as keyval
(``read-only=off`` is false, a nested ``file.node-name`` can be attached), and the errors are
QEMU's: a second writer on one node, an IDE disk on a read-only node, an unknown node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QmpProcess, requires_qemu_img, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_system]

BASE = ["-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S"]
EMU = [sys.executable, "-m", "emu"]
QEMU = ["qemu-system-x86_64"]
_AUTO = re.compile(r"#block\d+")


def _images(w: Path) -> None:
    w.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "q.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "r.raw"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "s.raw"), "1M"], check=True)


def _devices(w: Path) -> list[str]:
    return ["-blockdev", f"driver=file,filename={w}/r.raw,node-name=n0,read-only=off",
            "-device", "virtio-blk-pci,drive=n0,id=vd0",
            "-blockdev", json.dumps({"driver": "qcow2", "node-name": "q0", "file": {
                "driver": "file", "filename": f"{w}/q.qcow2", "node-name": "q0file"}}),
            "-device", "ide-hd,drive=q0,bus=ide.0",
            "-drive", f"file={w}/s.raw,format=raw,if=none,id=spare,node-name=spare0,read-only=on"]


CMDS = [("query-block", None), ("query-named-block-nodes", None), ("query-blockstats", None),
        ("human-monitor-command", {"command-line": "info block"}),
        ("human-monitor-command", {"command-line": "info blockstats"}),
        ("blockdev-snapshot-internal-sync", {"device": "q0", "name": "s"}),
        ("blockdev-snapshot-internal-sync", {"device": "q0", "name": "s"}),
        ("human-monitor-command", {"command-line": "info snapshots"}),
        ("blockdev-snapshot-delete-internal-sync", {"device": "q0", "name": "s"}),
        ("human-monitor-command", {"command-line": 'qemu-io -d vd0 "read 0 512"'})]


def _session(argv0: list[str], w: Path) -> list:
    _images(w)
    with QmpProcess(argv0 + BASE + _devices(w), w / "qmp.sock", cwd=w) as q:
        q.cmd("qmp_capabilities")
        out = []
        for name, args in CMDS:
            text = _AUTO.sub("#block", json.dumps(q.cmd(name, args)).replace(str(w), "$W"))
            r = json.loads(re.sub(r'"date-(n?sec)": \d+', r'"date-\1": 0', text))
            if name == "human-monitor-command" and "snapshots" in args["command-line"]:
                r = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", r["return"])
            out.append((name, args, r))
        return out


def test_blockdev_nodes_on_devices_match_qemu(tmp_path: Path) -> None:
    want = _session(QEMU, tmp_path / "q")
    got = _session(EMU, tmp_path / "e")
    assert want[0][2]["return"][1]["qdev"] == "/machine/peripheral/vd0/virtio-backend"
    for w, g in zip(want, got):
        assert g == w


@pytest.mark.parametrize("extra", [
    # a second writing device on the same node
    ["-blockdev", "driver=file,filename=$W/r.raw,node-name=n0",
     "-device", "virtio-blk-pci,drive=n0", "-device", "virtio-blk-pci,drive=n0"],
    # an IDE disk needs write access
    ["-blockdev", "driver=file,filename=$W/r.raw,node-name=n0,read-only=on",
     "-device", "ide-hd,drive=n0"],
    # no such drive or node
    ["-blockdev", "driver=file,filename=$W/r.raw,node-name=n0", "-device", "virtio-blk-pci,drive=n1"],
    # a -drive id may not take a node's name
    ["-blockdev", "driver=file,filename=$W/r.raw,node-name=n0",
     "-drive", "file=$W/q.qcow2,if=none,id=n0"],
    # keyval values of the wrong type
    ["-blockdev", "driver=file,filename=$W/r.raw,node-name=n0,read-only=maybe"],
    ["-blockdev", "driver=raw,node-name=n0,offset=abc,file.driver=file,file.filename=$W/r.raw"],
    # JSON that is not an object, and broken JSON
    ["-blockdev", '["driver"]'],
], ids=["two-writers", "ide-on-read-only", "unknown-node", "id-vs-node-name", "bad-bool",
        "bad-int", "json-array"])
def test_blockdev_device_errors_match_qemu(tmp_path: Path, extra: list[str]) -> None:
    results = []
    for argv0, name in ((QEMU, "q"), (EMU, "e")):
        w = tmp_path / name
        _images(w)
        args = [a.replace("$W", str(w)) for a in extra]
        r = subprocess.run(argv0 + BASE + args, cwd=w, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        err = r.stderr.replace(str(w), "$W").replace("qemu-system-x86_64: ", "").replace("emu: ", "")
        results.append((r.returncode, err))
    assert results[1] == results[0]

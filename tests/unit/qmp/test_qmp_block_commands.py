"""Block commands on a real block graph (images made by qemu-img, checked by qemu-img)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from conftest import requires_qemu_img, requires_qemu_io
from emu.cli import parse_args
from emu.machine.drives import open_drives
from emu.machine.pc import Machine
from emu.qmp.commands import CommandContext, load_all
from emu.qmp.protocol import dispatch

pytestmark = [requires_qemu_img, requires_qemu_io]


class _S:
    negotiated = True
    oob_enabled = False


@pytest.fixture()
def pc(tmp_path):
    load_all()
    for name, fmt in (("ide.qcow2", "qcow2"), ("none.qcow2", "qcow2"), ("raw.img", "raw")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / name), "4M"],
                       check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k",
                    str(tmp_path / "ide.qcow2")], check=True, capture_output=True)
    cfg, _ = parse_args(["-S", "-drive", f"file={tmp_path}/ide.qcow2,format=qcow2,if=ide",
                         "-drive", f"file={tmp_path}/none.qcow2,format=qcow2,if=none,id=drv2,"
                                   "node-name=fmt2",
                         "-device", "virtio-blk-pci,drive=drv2,id=vblk2",
                         "-drive", f"file={tmp_path}/raw.img,format=raw,if=virtio"])
    m = Machine(cfg)
    open_drives(m)

    def run(cmd: str, **args: Any) -> Any:
        req: dict = {"execute": cmd}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        return dispatch(req, CommandContext(m, _S()), negotiated=True, oob_enabled=False)

    yield m, run, tmp_path
    m.close()


def info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)


def test_query_block_shapes(pc) -> None:
    m, run, tmp = pc
    blocks = run("query-block")["return"]
    assert [b["device"] for b in blocks] == ["ide0-hd0", "drv2", "virtio0"]
    ide = blocks[0]
    assert ide["qdev"] == "/machine/unattached/device[18]" and ide["type"] == "unknown"
    ins = ide["inserted"]
    assert ins["drv"] == "qcow2" and ins["file"] == f"{tmp}/ide.qcow2" and ins["ro"] is False
    assert ins["image"]["virtual-size"] == 4 << 20 and ins["node-name"].startswith("#block")
    assert blocks[1]["inserted"]["node-name"] == "fmt2"
    nodes = run("query-named-block-nodes", flat=True)["return"]
    assert len(nodes) == 6 and {n["drv"] for n in nodes} == {"qcow2", "raw", "file"}
    stats = run("query-blockstats")["return"]
    assert stats[0]["stats"]["account_invalid"] is True
    assert stats[0]["parent"]["driver-specific"]["driver"] == "file"
    text = run("human-monitor-command", command_line="info block drv2")["return"]
    assert text == (f"\r\ndrv2 (fmt2): {tmp}/none.qcow2 (qcow2)\r\n"
                    "    Attached to:      /machine/peripheral/vblk2/virtio-backend\r\n"
                    "    Cache mode:       writeback\r\n")


def test_internal_snapshots(pc) -> None:
    m, run, tmp = pc
    assert run("blockdev-snapshot-internal-sync", device="ide0-hd0", name="s1") == {"return": {}}
    assert run("blockdev-snapshot-internal-sync", device="ide0-hd0", name="s1")["error"]["desc"] \
        == "Snapshot with name 's1' already exists on device 'ide0-hd0'"
    assert run("blockdev-snapshot-internal-sync", device="virtio0", name="x")["error"]["desc"] \
        == "Block format 'raw' used by device 'virtio0' does not support internal snapshots"
    assert run("blockdev-snapshot-internal-sync", device="fmt2", name="bynode") == {"return": {}}
    # QEMU names the device as the client spelled it (here: the node name)
    assert run("blockdev-snapshot-internal-sync", device="fmt2", name="bynode")["error"][
        "desc"] == "Snapshot with name 'bynode' already exists on device 'fmt2'"
    snaps = run("query-block")["return"][0]["inserted"]["image"]["snapshots"]
    assert [s["name"] for s in snaps] == ["s1"] and snaps[0]["id"] == "1"
    text = run("human-monitor-command", command_line="info snapshots")["return"]
    assert "List of partial (non-loadable) snapshots on 'ide0-hd0':" in text
    gone = run("blockdev-snapshot-delete-internal-sync", device="ide0-hd0", name="s1")["return"]
    assert gone == snaps[0]
    assert run("blockdev-snapshot-delete-internal-sync", device="ide0-hd0", id="9")["error"][
        "desc"] == "Snapshot with id '9' and name 'null' does not exist on device 'ide0-hd0'"
    m.close()
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp / "none.qcow2")],
                            capture_output=True, text=True, check=True).stdout
    assert "bynode" in listed


def test_external_snapshot_and_blockdev_add(pc) -> None:
    m, run, tmp = pc
    ov = tmp / "ov.qcow2"
    assert run("blockdev-snapshot-sync", device="ide0-hd0", snapshot_file=str(ov)) == {"return": {}}
    ins = run("query-block")["return"][0]["inserted"]
    assert ins["file"] == str(ov) and ins["backing_file"] == f"{tmp}/ide.qcow2"
    assert ins["backing_file_depth"] == 1 and ins["image"]["backing-image"]["format"] == "qcow2"
    assert run("blockdev-snapshot-sync", node_name="fmt2",
               snapshot_file=str(tmp / "x.qcow2"))["error"]["desc"] == "New overlay node-name missing"
    assert run("blockdev-snapshot-sync", device="ide0-hd0", snapshot_file=str(ov))["error"][
        "desc"] == "Error: Trying to create an image with the same filename as the backing file"
    # guest-style write through qemu-io goes to the overlay, the base keeps the old data
    assert run("human-monitor-command",
               command_line='qemu-io ide0-hd0 "write -P 0x99 0 4k"')["return"] == ""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "new.qcow2"), "4M"],
                   check=True)
    assert run("blockdev-add", driver="qcow2", node_name="new",
               file={"driver": "file", "filename": str(tmp / "new.qcow2")}) == {"return": {}}
    assert run("blockdev-snapshot", node="drv2", overlay="new") == {"return": {}}
    assert run("query-block")["return"][1]["inserted"]["node-name"] == "new"
    assert run("blockdev-del", node_name="new")["error"]["desc"] == "Node new is in use"
    assert run("blockdev-del", node_name="nope")["error"]["desc"] == \
        "Failed to find node with node-name='nope'"
    m.close()
    assert info(ov)["backing-filename"] == f"{tmp}/ide.qcow2"
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x99 0 4k", str(ov)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 4k",
                        str(tmp / "ide.qcow2")], capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout
    chk = subprocess.run(["qemu-img", "check", str(ov)], capture_output=True, text=True)
    assert chk.returncode == 0

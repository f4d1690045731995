"""QMP internal snapshots on an RBD node: QEMU's RBD semantics, and a transaction that fails
removes its RBD snapshot again (QEMU 7.2 leaves it behind; emu keeps the promise)."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest

import rbd_ceph_cluster
from conftest import requires_qemu_img
import emu.block.drivers.rbd  # noqa: F401  (registers "rbd"; node.py's _load_drivers does not import it yet)
from emu.cli import parse_args
from emu.machine.drives import open_drives
from emu.machine.pc import Machine
from emu.qmp.commands import CommandContext, load_all
from emu.qmp.protocol import dispatch

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()


class _S:
    negotiated = True
    oob_enabled = False


def rbd_snaps(conf: str, name: str) -> list[str]:
    out = subprocess.run(["rbd", "-c", conf, "snap", "ls", "--format", "json", f"rbd/{name}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    import json
    return [s["name"] for s in json.loads(out)]


@pytest.fixture()
def pc(ceph_conf, tmp_path):
    load_all()
    q = tmp_path / "local.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)
    cfg, _ = parse_args(["-S", "-drive", f"file={q},format=qcow2,if=none,id=drv2,node-name=local"])
    m = Machine(cfg)
    open_drives(m)
    name = "q" + uuid.uuid4().hex[:10]
    subprocess.run(["rbd", "-c", ceph_conf, "create", "--size", "4M", f"rbd/{name}"], check=True, timeout=60)
    # blockdev-add's QMP schema has no rbd branch yet: the node is added through the graph.
    m.block_graph.open_protocol(f"rbd:rbd/{name}:conf={ceph_conf}", driver="rbd", node_name="r0")

    def run(cmd: str, **args: Any) -> Any:
        req: dict = {"execute": cmd}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        return dispatch(req, CommandContext(m, _S()), negotiated=True, oob_enabled=False)

    yield run, name
    m.close()


@requires_qemu_img
def test_qmp_internal_snapshots_on_rbd(pc, ceph_conf):
    run, name = pc
    assert run("blockdev-snapshot-internal-sync", device="r0", name="a") == {"return": {}}
    assert run("blockdev-snapshot-internal-sync", device="r0", name="a")["error"]["desc"] == \
        "Snapshot with name 'a' already exists on device 'r0'"
    assert run("blockdev-snapshot-internal-sync", device="r0", name="")["error"]["desc"] == "Name is empty"
    assert rbd_snaps(ceph_conf, name) == ["a"]
    # RBD snapshots have no ids: the id is the name.
    r = run("blockdev-snapshot-delete-internal-sync", device="r0", id="1", name="a")
    assert r["error"]["desc"] == "Snapshot with id '1' and name 'a' does not exist on device 'r0'"
    r = run("blockdev-snapshot-delete-internal-sync", device="r0", id="a", name="a")
    assert r["return"]["id"] == r["return"]["name"] == "a" and r["return"]["vm-state-size"] == 4 << 20
    assert rbd_snaps(ceph_conf, name) == []


@requires_qemu_img
def test_aborted_transaction_removes_rbd_snapshot(pc, ceph_conf):
    run, name = pc
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "r0", "name": "t1"}},
        {"type": "abort", "data": {}}])
    assert r["error"]["desc"] == "Transaction aborted using Abort action"
    assert rbd_snaps(ceph_conf, name) == []
    # RBD and qcow2 in one transaction: the qcow2 side fails, the RBD snapshot goes away.
    assert run("blockdev-snapshot-internal-sync", device="local", name="m") == {"return": {}}
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "r0", "name": "m"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "local", "name": "m"}}])
    assert r["error"]["desc"] == "Snapshot with name 'm' already exists on device 'local'"
    assert rbd_snaps(ceph_conf, name) == []
    # Both succeed together.
    assert run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "r0", "name": "ok"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "local", "name": "ok"}}]) == {"return": {}}
    assert rbd_snaps(ceph_conf, name) == ["ok"]

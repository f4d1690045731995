"""rbd in the block graph and QMP: ``-drive file=rbd:...`` opens as QEMU's raw-on-rbd pair,
blockdev-add has QEMU 7.2's ``rbd`` branch and error texts, and raw nodes hand internal
snapshots to their rbd child (QEMU's bdrv_snapshot fallback), in transactions too."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

import rbd_ceph_cluster
from emu.block.node import BlockGraph, rbd_connect_options
from emu.cli import parse_args
from emu.errors import ImageOpenError
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
    return [s["name"] for s in json.loads(out)]


@pytest.fixture()
def rbd_pc(ceph_conf):
    load_all()
    name = "n" + uuid.uuid4().hex[:10]
    subprocess.run(["rbd", "-c", ceph_conf, "create", "--size", "8M", f"rbd/{name}"], check=True, timeout=60)
    cfg, _ = parse_args(["-S", "-drive", f"file=rbd:rbd/{name}:conf={ceph_conf},format=raw,if=none,id=d0"])
    m = Machine(cfg)
    open_drives(m)

    def run(cmd: str, **args: Any) -> Any:
        req: dict = {"execute": cmd}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        return dispatch(req, CommandContext(m, _S()), negotiated=True, oob_enabled=False)

    yield run, name
    m.close()


def test_drive_rbd_query_block_as_qemu(rbd_pc, ceph_conf):
    run, name = rbd_pc
    [dev] = run("query-block")["return"]
    spec = {"pool": "rbd", "image": name, "conf": ceph_conf, "driver": "rbd", "namespace": ""}
    fn = "json:" + json.dumps({"driver": "raw", "file": spec})
    ins = dev["inserted"]
    assert ins["file"] == fn and ins["drv"] == "raw" and ins["ro"] is False
    # As qemu-system-x86_64 7.2 shows it: the object size as cluster size, no actual-size.
    assert ins["image"] == {"virtual-size": 8 << 20, "filename": fn, "cluster-size": 4 << 20,
                            "format": "raw", "dirty-flag": False}


def test_drive_rbd_internal_snapshots_and_abort(rbd_pc, ceph_conf):
    run, name = rbd_pc
    assert run("blockdev-snapshot-internal-sync", device="d0", name="s1") == {"return": {}}
    assert run("blockdev-snapshot-internal-sync", device="d0", name="s1")["error"]["desc"] == \
        "Snapshot with name 's1' already exists on device 'd0'"
    assert rbd_snaps(ceph_conf, name) == ["s1"]
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "t1"}},
        {"type": "abort", "data": {}}])
    assert r["error"]["desc"] == "Transaction aborted using Abort action"
    assert rbd_snaps(ceph_conf, name) == ["s1"]      # QEMU 7.2 would leave t1 behind
    snaps = run("query-block")["return"][0]["inserted"]["image"]["snapshots"]
    assert [(s["id"], s["name"], s["vm-state-size"]) for s in snaps] == [("s1", "s1", 8 << 20)]
    r = run("blockdev-snapshot-delete-internal-sync", device="d0", name="s1")
    assert r["return"]["id"] == "s1"
    assert rbd_snaps(ceph_conf, name) == []


def test_blockdev_add_rbd(rbd_pc, ceph_conf):
    run, name = rbd_pc
    base = {"driver": "rbd", "pool": "rbd", "image": name, "conf": ceph_conf}
    assert run("blockdev-add", **{"node-name": "r0"}, **base) == {"return": {}}
    assert run("blockdev-add", driver="raw", node_name="f0", file="r0") == {"return": {}}
    assert run("blockdev-snapshot-internal-sync", device="f0", name="x") == {"return": {}}
    assert rbd_snaps(ceph_conf, name) == ["x"]
    assert run("blockdev-snapshot-delete-internal-sync", device="f0", name="x")["return"]["name"] == "x"
    nodes = {n["node-name"]: n for n in run("query-named-block-nodes", flat=True)["return"]}
    # blockdev-add without namespace: QEMU's json: filename has none either.
    assert nodes["r0"]["file"] == "json:" + json.dumps(
        {"pool": "rbd", "image": name, "conf": ceph_conf, "driver": "rbd"})
    assert nodes["f0"]["drv"] == "raw" and nodes["f0"]["image"]["cluster-size"] == 4 << 20

    def err(**extra: Any) -> str:
        args = dict(base, **{"node-name": "r1"})
        args.update(extra)
        args = {k: v for k, v in args.items() if v is not None}
        return run("blockdev-add", **args)["error"]["desc"]

    # Each text as qemu-system-x86_64 7.2 (qemu-block-extra) answers it on this cluster.
    assert err(pool=None) == "Parameter 'pool' is missing"
    assert err(image=None) == "Parameter 'image' is missing"
    assert err(pool="nopool") == "error opening pool nopool: No such file or directory"
    assert err(image="noimg") == "error reading header from noimg: No such file or directory"
    assert err(conf="/nonexistent.conf") == \
        "error reading conf file /nonexistent.conf: No such file or directory"
    assert err(**{"key-secret": "sec0"}) == "No secret with id 'sec0'"
    assert err(encrypt={"format": "luks", "key-secret": "sec1"}) == "No secret with id 'sec1'"
    assert err(encrypt={"format": "luks-any", "key-secret": "s"}) == \
        "Parameter 'format' does not accept value 'luks-any'"
    assert err(server=[{"host": "127.0.0.1"}]) == "Parameter 'server[0].port' is missing"
    assert err(bogus=1) == "Parameter 'bogus' is unexpected"
    assert err(snapshot="nosnap", **{"read-only": True}) == \
        "error reading header from img: No such file or directory".replace("img", name)
    assert run("blockdev-add", **dict(base, **{"node-name": "r2", "user": "admin",
                                                "auth-client-required": ["cephx", "none"]})) == {"return": {}}


def test_rbd_connect_options_as_qemu():
    o = rbd_connect_options({"pool": "p", "image": "i", "auth-client-required": ["cephx", "none"],
                             "server": [{"host": "10.0.0.1", "port": "6789"},
                                        {"host": "::1", "port": "3300"}]})
    assert o == {"pool": "p", "image": "i", "key-value-pairs": [
        ("mon_host", "10.0.0.1:6789;[::1]:3300"), ("auth_client_required", "cephx;none")]}
    with pytest.raises(ImageOpenError, match="^No secret with id 'k'$"):
        rbd_connect_options({"pool": "p", "image": "i", "key-secret": "k"})


def test_raw_on_file_has_no_snapshot_fallback(tmp_path):
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(65536))
    g = BlockGraph()
    bs = g.open_image(str(p), "raw")
    try:
        assert bs.snapshot_target() is None and not bs.supports_snapshots
        assert bs.snapshot_list() == []
        with pytest.raises(Exception, match="does not support internal snapshots"):
            bs.snapshot_create("a")
    finally:
        g.close_all()

"""``transaction``, ``drive-backup``/``blockdev-backup`` and dirty-bitmap commands on a
machine with real drives: rollback order, grouped completion, internal snapshot rules,
one quiesce for all prepares, bitmap errors."""

from __future__ import annotations

import subprocess
import threading
import time
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
def pc(tmp_path, capsys):
    load_all()
    for name in ("ide.qcow2", "none.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name), "4M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c",
                        "write -P 0x12 1M 64k", str(tmp_path / name)], check=True,
                       capture_output=True)
    cfg, _ = parse_args(["-S", "-drive", f"file={tmp_path}/ide.qcow2,format=qcow2,if=ide",
                         "-drive", f"file={tmp_path}/none.qcow2,format=qcow2,if=none,id=drv2,"
                                   "node-name=fmt2",
                         "-device", "virtio-blk-pci,drive=drv2,id=vblk2"])
    m = Machine(cfg)
    open_drives(m)
    events: list[tuple[str, Any]] = []
    m.add_event_listener(lambda n, d: events.append((n, d)))

    def run(cmd: str, **args: Any) -> Any:
        req: dict = {"execute": cmd}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        return dispatch(req, CommandContext(m, _S()), negotiated=True, oob_enabled=False)

    yield m, run, tmp_path, events
    if getattr(m, "jobs", None) is not None:
        m.jobs.cancel_all()
    m.close()


def _job_events(events: list, job_id: str) -> list[str]:
    return [d["status"] if n == "JOB_STATUS_CHANGE" else n for n, d in events
            if d and (d.get("id") == job_id or d.get("device") == job_id)]


def _wait_no_jobs(run, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while run("query-jobs")["return"] and time.monotonic() < end:
        time.sleep(0.02)
    assert run("query-jobs")["return"] == []


def test_rollback_undoes_everything_in_reverse(pc) -> None:
    m, run, tmp, events = pc
    before = run("query-block")["return"]
    nodes_before = len(run("query-named-block-nodes")["return"])
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "s1"}},
        {"type": "drive-backup", "data": {"device": "ide0-hd0", "sync": "full", "job-id": "rb1",
                                          "target": str(tmp / "rb1.qcow2")}},
        {"type": "blockdev-snapshot-sync", "data": {"device": "drv2",
                                                    "snapshot-file": str(tmp / "ov.qcow2")}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "drv2", "name": "b"}},
        {"type": "drive-backup", "data": {"device": "drv2", "sync": "full", "job-id": "rb2",
                                          "target": str(tmp / "rb2.qcow2")}},
        {"type": "abort", "data": {}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "drv2", "name": "never"}},
    ])
    assert r["error"]["desc"] == "Transaction aborted using Abort action"
    seq = [(d["id"], d["status"]) for n, d in events if n == "JOB_STATUS_CHANGE"]
    assert seq == [("rb1", "created"), ("rb2", "created"), ("rb2", "aborting"),
                   ("rb2", "concluded"), ("rb2", "null"), ("rb1", "aborting"),
                   ("rb1", "concluded"), ("rb1", "null")]
    assert not any(n.startswith("BLOCK_JOB") for n, _ in events)
    after = run("query-block")["return"]
    for b in before + after:
        b["inserted"]["image"].pop("actual-size", None)
    assert after == before                           # snapshot deleted, overlay detached
    assert len(run("query-named-block-nodes")["return"]) == nodes_before
    assert (tmp / "ov.qcow2").exists() and (tmp / "rb2.qcow2").exists()
    assert run("query-jobs")["return"] == []


def test_internal_snapshot_rules(pc) -> None:
    m, run, tmp, events = pc
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "d"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "d"}}])
    assert r["error"]["desc"] == "Snapshot with name 'd' already exists on device 'ide0-hd0'"
    assert "snapshots" not in run("query-block")["return"][0]["inserted"]["image"]
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": ""}}])
    assert r["error"]["desc"] == "Name is empty"
    r = run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "x",
                                                             "id": "1"}}])
    assert r["error"]["desc"] == "Parameter 'actions[0].data.id' is unexpected"
    assert run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "ok"}}]
    ) == {"return": {}}
    snaps = run("query-block")["return"][0]["inserted"]["image"]["snapshots"]
    assert [s["name"] for s in snaps] == ["ok"]


def test_prepares_run_inside_one_quiesce(pc, monkeypatch) -> None:
    m, run, tmp, events = pc
    depth = []
    real = m.quiesce

    def counting(*a: Any, **kw: Any):
        depth.append(m._quiesce_depth)
        return real(*a, **kw)

    monkeypatch.setattr(m, "quiesce", counting)
    assert run("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0", "name": "a"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "drv2", "name": "b"}},
    ]) == {"return": {}}
    assert depth and depth[0] == 0 and all(d >= 1 for d in depth[1:])


def test_grouped_completion_mode(pc) -> None:
    m, run, tmp, events = pc
    r = run("transaction", properties={"completion-mode": "grouped"}, actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "ide0-hd0", "name": "g"}}])
    assert r["error"]["desc"] == ("Action 'block-dirty-bitmap-add' does not support "
                                  "Transaction property completion-mode = grouped")
    assert run("transaction", properties={"completion-mode": "grouped"}, actions=[
        {"type": "drive-backup", "data": {"device": "ide0-hd0", "sync": "full", "job-id": "g1",
                                          "target": str(tmp / "g1.qcow2")}},
        {"type": "drive-backup", "data": {"device": "drv2", "sync": "full", "job-id": "g2",
                                          "target": str(tmp / "g2.qcow2"), "speed": 65536}},
    ]) == {"return": {}}
    assert _job_events(events, "g1")[:4] == ["created", "running", "paused", "running"]
    # g1 finishes first but waits for g2; cancelling g2 cancels both
    end = time.monotonic() + 5
    while time.monotonic() < end and "waiting" not in _job_events(events, "g1"):
        time.sleep(0.02)
    assert run("block-job-cancel", device="g2") == {"return": {}}
    _wait_no_jobs(run)
    assert "BLOCK_JOB_CANCELLED" in _job_events(events, "g1")
    assert "BLOCK_JOB_CANCELLED" in _job_events(events, "g2")


def test_backup_errors_and_bitmap_commands(pc) -> None:
    m, run, tmp, events = pc
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="bm",
               granularity=65536)["return"] == {}
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="bm")["error"]["desc"] == \
        "Bitmap already exists: bm"
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="x",
               granularity=1000)["error"]["desc"] == \
        "Granularity must be power of 2 and at least 512"
    assert run("block-dirty-bitmap-remove", node="ide0-hd0", name="nope")["error"]["desc"] == \
        "Dirty bitmap 'nope' not found"
    assert run("block-dirty-bitmap-clear", node="nonode", name="bm")["error"]["desc"] == \
        "Node 'nonode' not found"
    run("human-monitor-command", command_line='qemu-io ide0-hd0 "write -P 0x5 2M 4k"')
    bm = run("query-block")["return"][0]["inserted"]["dirty-bitmaps"][0]
    assert bm == {"name": "bm", "recording": True, "persistent": False, "busy": False,
                  "granularity": 65536, "count": 65536}
    assert run("drive-backup", device="ide0-hd0", sync="incremental",
               target=str(tmp / "e.qcow2"))["error"]["desc"] == \
        "must provide a valid bitmap name for 'incremental' sync mode"
    assert run("drive-backup", device="ide0-hd0", sync="incremental", bitmap="bm",
               target=str(tmp / "inc.qcow2"), job_id="inc") == {"return": {}}
    _wait_no_jobs(run)
    assert run("query-block")["return"][0]["inserted"]["dirty-bitmaps"][0]["count"] == 0
    assert run("blockdev-backup", device="ide0-hd0", target="ide0-hd0",
               sync="full")["error"]["desc"] == "Source and target cannot be the same"
    assert run("block-job-cancel", device="nojob")["error"] == {
        "class": "DeviceNotActive", "desc": "Block job 'nojob' not found"}
    assert run("block-dirty-bitmap-disable", node="ide0-hd0", name="bm") == {"return": {}}
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="bm2") == {"return": {}}
    run("human-monitor-command", command_line='qemu-io ide0-hd0 "write -P 0x6 3M 4k"')
    assert run("block-dirty-bitmap-merge", node="ide0-hd0", target="bm",
               bitmaps=["bm2"]) == {"return": {}}
    infos = {b["name"]: b for b in run("query-block")["return"][0]["inserted"]["dirty-bitmaps"]}
    assert infos["bm"]["recording"] is False and infos["bm"]["count"] == 65536
    assert run("transaction", actions=[
        {"type": "block-dirty-bitmap-clear", "data": {"node": "ide0-hd0", "name": "bm"}},
        {"type": "abort", "data": {}}])["error"]["desc"] == \
        "Transaction aborted using Abort action"
    infos = {b["name"]: b for b in run("query-block")["return"][0]["inserted"]["dirty-bitmaps"]}
    assert infos["bm"]["count"] == 65536              # clear undone


def test_guest_writes_during_backup_through_the_device(pc) -> None:
    m, run, tmp, events = pc
    dev = m.find_block_device("ide0-hd0")
    before = dev.backend.read(0, 4 << 20)
    assert run("drive-backup", device="ide0-hd0", sync="full", job_id="live",
               target=str(tmp / "live.qcow2"), speed=64 << 10) == {"return": {}}
    stop = threading.Event()

    def guest() -> None:
        i = 0
        while not stop.is_set() and i < 100:
            dev.backend.write((i * 20480) % (4 << 20), b"\xab" * 4096)
            i += 1
    t = threading.Thread(target=guest)
    t.start()
    time.sleep(0.3)
    stop.set()
    t.join()
    assert run("query-block-jobs")["return"][0]["device"] == "live"    # still copying
    assert run("block-job-set-speed", device="live", speed=0) == {"return": {}}
    _wait_no_jobs(run)
    raw = tmp / "before.raw"
    raw.write_bytes(before)
    cmp_ = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                           str(tmp / "live.qcow2"), str(raw)], capture_output=True, text=True)
    assert cmp_.returncode == 0, cmp_.stdout + cmp_.stderr
    chk = subprocess.run(["qemu-img", "check", "-U", str(tmp / "live.qcow2")],
                         capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout


def test_internal_snapshot_after_overlay_lands_in_the_overlay(pc) -> None:
    m, run, tmp, events = pc
    assert run("transaction", actions=[
        {"type": "blockdev-snapshot-sync", "data": {"device": "drv2",
                                                    "snapshot-file": str(tmp / "ov2.qcow2")}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "drv2", "name": "in"}},
    ]) == {"return": {}}
    lst = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(tmp / "ov2.qcow2")],
                         capture_output=True, text=True, check=True).stdout
    assert " in " in lst
    base = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(tmp / "none.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert base == ""

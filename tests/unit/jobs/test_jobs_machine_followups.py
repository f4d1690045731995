"""Follow-ups on the QMP block/job commands and the machine facade, on a machine with real
qcow2 drives: dirty bitmaps in BlockDeviceInfo, drained jobs around snapshots,
``Machine.close()`` cancelling jobs, cut reasons, ``stop`` draining the guest's disks."""

from __future__ import annotations

import subprocess
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


class _Session:
    negotiated = True
    oob_enabled = False


@pytest.fixture()
def pc(tmp_path, capsys):
    load_all()
    for name in ("ide.qcow2", "none.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name), "4M"],
                       check=True)
    # data for a backup to copy slowly
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5 0 2M",
                    str(tmp_path / "none.qcow2")], check=True, capture_output=True)
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
        return dispatch(req, CommandContext(m, _Session()), negotiated=True, oob_enabled=False)

    yield m, run, tmp_path, events
    if getattr(m, "jobs", None) is not None:
        m.jobs.cancel_all()
    m.close()


def test_dirty_bitmaps_are_part_of_block_device_info(pc) -> None:
    m, run, tmp, _ = pc
    ins = run("query-block")["return"][0]["inserted"]
    assert "dirty-bitmaps" not in ins                  # absent while the node has none
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="a") == {"return": {}}
    assert run("block-dirty-bitmap-add", node="ide0-hd0", name="b",
               granularity=131072, disabled=True) == {"return": {}}
    ins = run("query-block")["return"][0]["inserted"]
    keys = list(ins)
    assert keys[keys.index("write_threshold") + 1] == "dirty-bitmaps"
    # newest first, as QEMU lists them
    assert ins["dirty-bitmaps"] == [
        {"name": "b", "recording": False, "persistent": False, "busy": False,
         "granularity": 131072, "count": 0},
        {"name": "a", "recording": True, "persistent": False, "busy": False,
         "granularity": 65536, "count": 0}]
    # the same BlockDeviceInfo in query-named-block-nodes (QEMU's bdrv_block_device_info)
    nodes = {n["node-name"]: n for n in run("query-named-block-nodes")["return"]}
    root = m.find_block_device("ide0-hd0").node.node_name
    assert [b["name"] for b in nodes[root]["dirty-bitmaps"]] == ["b", "a"]
    assert "dirty-bitmaps" not in nodes["fmt2"]
    # query-block is the block module's own command again, not a wrapper
    from emu.qmp.commands import COMMANDS

    assert COMMANDS["query-block"].fn.__module__ == "emu.qmp.commands.block"


def test_overlay_with_overridden_backing_shows_json_filename(pc) -> None:
    m, run, tmp, _ = pc
    ov = tmp / "ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ov), "4M"], check=True)
    assert run("blockdev-add", driver="qcow2", node_name="ovl",
               file={"driver": "file", "filename": str(ov)}, backing=None) == {"return": {}}
    assert run("blockdev-snapshot", node="drv2", overlay="ovl") == {"return": {}}
    ins = next(b for b in run("query-block")["return"] if b["device"] == "drv2")["inserted"]
    want = ('json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "'
            f'{tmp}/none.qcow2"}}}}, "driver": "qcow2", "file": {{"driver": "file", '
            f'"filename": "{ov}"}}}}')
    assert ins["file"] == want and ins["image"]["filename"] == want
    assert ins["backing_file"] == f"{tmp}/none.qcow2"
    assert ins["backing_file_depth"] == 1
    for key in ("backing-filename", "backing-filename-format", "full-backing-filename"):
        assert key not in ins["image"]
    assert ins["image"]["backing-image"]["filename"] == f"{tmp}/none.qcow2"
    # the overlay's header still names no backing file (QEMU writes nothing there)
    info = subprocess.run(["qemu-img", "info", "-U", str(ov)], capture_output=True, text=True,
                          check=True).stdout
    assert "backing file" not in info
    # an overlay whose header names its backing keeps the plain filename
    run("blockdev-snapshot-sync", device="ide0-hd0", snapshot_file=str(tmp / "s.qcow2"))
    ide = run("query-block")["return"][0]["inserted"]
    assert ide["file"] == str(tmp / "s.qcow2")
    assert ide["image"]["backing-filename"] == str(tmp / "ide.qcow2")


def _statuses(events: list, job_id: str) -> list[str]:
    return [d["status"] for n, d in events if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]


def test_standalone_snapshots_drain_jobs_as_qemu_does(pc) -> None:
    """Checked against qemu-system-x86_64 7.2: standalone snapshot commands are one-action
    transactions, so a running backup shows paused/running around them; on the job's own
    device QEMU refuses (the backup's filter is the device's root now)."""
    m, run, tmp, events = pc
    run2 = run
    try:
        assert run2("drive-backup", device="drv2", sync="full", target=str(tmp / "bk.qcow2"),
                    speed=65536, job_id="j") == {"return": {}}
        assert _statuses(events, "j") == ["created", "running", "paused", "running"]
        del events[:]
        assert run2("blockdev-snapshot-internal-sync", device="ide0-hd0", name="s") == \
            {"return": {}}
        assert _statuses(events, "j") == ["paused", "running"]
        del events[:]
        assert run2("blockdev-snapshot-internal-sync", device="drv2", name="s")["error"] == \
            {"class": "GenericError", "desc": "Need a root block node"}
        assert _statuses(events, "j") == ["paused", "running"]
        del events[:]
        assert run2("blockdev-snapshot-delete-internal-sync", device="drv2",
                    name="s")["error"]["desc"] == "Need a root block node"
        assert _statuses(events, "j") == []
        assert run2("blockdev-snapshot-sync", device="drv2",
                    snapshot_file=str(tmp / "ov.qcow2"))["error"]["desc"] == \
            "Node 'drv2' is busy: block device is in use by block job: backup"
        assert _statuses(events, "j") == ["paused", "running", "paused", "running"]
        del events[:]
        assert run2("blockdev-snapshot-sync", device="ide0-hd0",
                    snapshot_file=str(tmp / "ov.qcow2")) == {"return": {}}
        assert _statuses(events, "j") == ["paused", "running"]
        assert run2("query-block")["return"][0]["inserted"]["file"] == str(tmp / "ov.qcow2")
    finally:
        m.jobs.cancel_all()


def test_close_cancels_running_jobs_before_closing_backends(pc) -> None:
    m, run, tmp, events = pc
    assert run("drive-backup", device="drv2", sync="full", target=str(tmp / "bk.qcow2"),
               speed=65536, job_id="c") == {"return": {}}
    job = m.jobs.find("c")
    assert job is not None and _statuses(events, "c")[-1] == "running"
    m.close()
    assert m.jobs.find("c") is None and m.jobs.jobs() == []
    assert _statuses(events, "c")[-3:] == ["aborting", "concluded", "null"]
    assert [n for n, d in events if n == "BLOCK_JOB_CANCELLED"] == ["BLOCK_JOB_CANCELLED"]
    # the images were closed cleanly: qemu-img may open them read-write again
    for name in ("none.qcow2", "bk.qcow2"):
        r = subprocess.run(["qemu-img", "check", str(tmp / name)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_cuts_name_the_qmp_command_given_as_reason(pc) -> None:
    m, run, tmp, events = pc

    def commands(since: int) -> list[str]:
        return [c["command"] for c in run("x-emu-query-cuts", since=since)["return"]]

    assert run("blockdev-snapshot-internal-sync", device="ide0-hd0", name="a") == {"return": {}}
    assert run("blockdev-snapshot-delete-internal-sync", device="ide0-hd0",
               name="a")["return"]["name"] == "a"
    assert run("transaction", actions=[{"type": "blockdev-snapshot-internal-sync",
                                        "data": {"device": "drv2", "name": "t"}}]) == \
        {"return": {}}
    assert run("drive-backup", device="ide0-hd0", sync="full",
               target=str(tmp / "b.qcow2")) == {"return": {}}
    end = time.monotonic() + 10
    while run("query-jobs")["return"] and time.monotonic() < end:
        time.sleep(0.02)
    assert run("blockdev-snapshot-sync", device="ide0-hd0",
               snapshot_file=str(tmp / "o.qcow2")) == {"return": {}}
    assert commands(0) == ["blockdev-snapshot-internal-sync",
                           "blockdev-snapshot-delete-internal-sync", "transaction",
                           "drive-backup", "blockdev-snapshot-sync"]

    def qmp_made_up() -> None:      # the name of the caller is not read any more
        with m.quiesce():
            pass

    qmp_made_up()
    assert m.cuts.last().command == "unknown"


def test_stop_drains_block_devices_and_jobs_and_records_a_cut(pc) -> None:
    m, run, tmp, events = pc
    assert run("drive-backup", device="drv2", sync="full", target=str(tmp / "bk.qcow2"),
               speed=65536, job_id="s") == {"return": {}}
    assert run("cont") == {"return": {}}
    last = m.cuts.last().id
    del events[:]
    assert run("stop") == {"return": {}}
    assert [n if n != "JOB_STATUS_CHANGE" else d["status"] for n, d in events] == \
        ["STOP", "paused", "running"]          # QEMU 7.2's order (vm_stop, then drain_all)
    cut = m.cuts.last()
    assert cut.id == last + 1 and cut.command == "stop"
    assert {d.device for d in cut.devices} == {d.name for d in m.block_devices}
    assert all(d.in_flight == 0 for d in cut.devices)
    # the cut is taken after drain_begin on every device (Machine.quiesce)
    # a stopped machine is not drained again
    assert run("stop") == {"return": {}} and m.cuts.last().id == cut.id
    m.jobs.cancel_all()

"""Side by side with qemu-system-x86_64 7.2: the same job, bitmap and transaction commands
get the same replies from emu (errors included) and leave equal files behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import QmpProcess, requires_qemu_img, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_system]

#: (command, arguments); ``$W`` is the work directory
SCRIPT = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "nd",
                      "file": {"driver": "file", "filename": "$W/small.qcow2"}}),
    ("drive-backup", {"device": "nd", "sync": "full", "target": "$W/t-nd.qcow2"}),
    ("drive-backup", {"device": "ide0-hd0", "sync": "full", "target": "$W/t1.qcow2",
                      "speed": 1024}),
    ("block-job-pause", {"device": "ide0-hd0"}),
    ("block-job-pause", {"device": "ide0-hd0"}),
    ("block-job-cancel", {"device": "ide0-hd0"}),
    ("block-job-resume", {"device": "ide0-hd0"}),
    ("block-job-resume", {"device": "ide0-hd0"}),
    ("block-job-complete", {"device": "ide0-hd0"}),
    ("block-job-cancel", {"device": "ide0-hd0", "force": True}),
    ("WAIT", {"id": "ide0-hd0"}),
    ("block-dirty-bitmap-add", {"node": "virtio0", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "ide0-hd0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "ide0-hd0", "name": "b", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "ide0-hd0", "name": "b"}),
    ("block-dirty-bitmap-add", {"node": "ide0-hd0", "name": "b"}),
    ("block-dirty-bitmap-remove", {"node": "ide0-hd0", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "nonode", "name": "zz"}),
    ("block-dirty-bitmap-merge", {"node": "ide0-hd0", "target": "b", "bitmaps": ["zz"]}),
    ("human-monitor-command", {"command-line": 'qemu-io ide0-hd0 "write -P 0x33 1M 4k"'}),
    ("drive-backup", {"device": "ide0-hd0", "sync": "incremental", "bitmap": "b",
                      "bitmap-mode": "never", "target": "$W/t2.qcow2"}),
    ("drive-backup", {"device": "ide0-hd0", "sync": "full", "bitmap": "b",
                      "target": "$W/t3.qcow2"}),
    ("drive-backup", {"device": "ide0-hd0", "sync": "none", "bitmap": "b",
                      "bitmap-mode": "always", "target": "$W/t5.qcow2"}),
    ("drive-backup", {"device": "ide0-hd0", "sync": "full", "bitmap-mode": "always",
                      "target": "$W/t6.qcow2"}),
    ("blockdev-backup", {"device": "ide0-hd0", "sync": "full", "target": "nd"}),
    ("drive-backup", {"device": "virtio0", "sync": "full", "compress": True, "format": "raw",
                      "target": "$W/t7.img"}),
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "ide0-hd0", "name": "c"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "ide0-hd0", "name": "b"}},
        {"type": "abort", "data": {}}]}),
    ("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "ide0-hd0",
                                                             "name": "s"}},
        {"type": "drive-backup", "data": {"device": "ide0-hd0", "sync": "incremental",
                                          "bitmap": "b", "target": "$W/inc.qcow2",
                                          "job-id": "inc"}}]}),
    ("WAIT", {"id": "inc"}),
    ("query-block", {}),
    ("block-dirty-bitmap-remove", {"node": "ide0-hd0", "name": "b"}),
]


def _session(argv0: list[str], work: Path) -> list:
    out: list = []
    with QmpProcess(argv0 + [
            "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
            "-drive", f"file={work}/a.qcow2,format=qcow2,if=ide",
            "-drive", f"file={work}/r.img,format=raw,if=virtio"], work / "qmp.sock", cwd=work) as q:
        q.cmd("qmp_capabilities")
        for name, args in SCRIPT:
            if name == "WAIT":
                end = time.monotonic() + 10
                while time.monotonic() < end and not any(
                        e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {
                            "status": "null", "id": args["id"]} for e in q.events):
                    q.cmd("query-status")
                    time.sleep(0.02)
                continue
            r = q.cmd(name, json.loads(json.dumps(args).replace("$W", str(work))))
            if name == "query-block":
                r = [(b["device"], b["inserted"].get("dirty-bitmaps"),
                      [s["name"] for s in b["inserted"]["image"].get("snapshots", [])])
                     for b in r["return"]]
            out.append((name, r))
    return out


def _images(work: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "4M"],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "small.qcow2"), "2M"],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(work / "r.img"), "4M"],
                   check=True)


def test_replies_match_qemu(tmp_path: Path) -> None:
    qdir, edir = tmp_path / "q", tmp_path / "e"
    qdir.mkdir()
    edir.mkdir()
    _images(qdir)
    _images(edir)
    want = _session(["qemu-system-x86_64"], qdir)
    got = _session([sys.executable, "-m", "emu"], edir)
    assert len(got) == len(want)
    for (name, w), (_, g) in zip(want, got):
        w = json.loads(json.dumps(w).replace(str(qdir), "$W"))
        g = json.loads(json.dumps(g).replace(str(edir), "$W"))
        assert g == w, name
    cmp_ = subprocess.run(["qemu-img", "compare", str(qdir / "inc.qcow2"),
                           str(edir / "inc.qcow2")], capture_output=True, text=True)
    assert cmp_.returncode == 0, cmp_.stdout + cmp_.stderr
    chk = subprocess.run(["qemu-img", "check", str(edir / "inc.qcow2")], capture_output=True,
                         text=True)
    assert chk.returncode == 0, chk.stdout

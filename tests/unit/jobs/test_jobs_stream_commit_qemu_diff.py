"""Side by side with qemu-system-x86_64 7.2: block-stream and block-commit (of an
intermediate and of the active layer) get the same replies (errors included), each job the
same status events and BLOCK_JOB_COMPLETED/READY data, and the chains end up the same
(query-block, node names, images equal by qemu-img compare and clean by qemu-img check)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import QmpProcess, requires_qemu_img, requires_qemu_io, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_io, requires_qemu_system]


def _snap(name: str) -> tuple:
    return ("blockdev-snapshot-sync", {"device": "virtio0", "snapshot-file": f"$W/{name}.qcow2",
                                       "snapshot-node-name": name, "format": "qcow2"})


def _io(cmd: str) -> tuple:
    return ("human-monitor-command", {"command-line": f'qemu-io virtio0 "{cmd}"'})


#: (command, arguments); ``$W`` is the work directory; WAIT waits for a job status event
SCRIPT = [
    # a read-only, force-share base that cannot be reopened read-write, under two
    # blockdev-add'ed layers
    ("blockdev-add", {"driver": "qcow2", "node-name": "b2", "read-only": True,
                      "force-share": True,
                      "file": {"driver": "file", "filename": "$W/b2.qcow2"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "m2", "read-only": True, "backing": "b2",
                      "file": {"driver": "file", "filename": "$W/m2.qcow2"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "t2", "backing": "m2",
                      "file": {"driver": "file", "filename": "$W/t2.qcow2"}}),
    ("block-commit", {"device": "t2", "top-node": "m2", "job-id": "ro1"}),
    ("block-commit", {"device": "m2", "job-id": "ro2"}),
    ("block-stream", {"device": "m2", "job-id": "s3"}),
    ("WAIT", {"id": "s3", "status": "null"}),
    _snap("mid"), _io("write -P 0x22 512k 1M"),
    _snap("top"), _io("write -P 0x33 1M 512k"),
    ("block-stream", {"device": "virtio0", "base": "nonexist"}),
    ("block-stream", {"device": "virtio0", "base-node": "nonexist"}),
    ("block-stream", {"device": "virtio0", "base-node": "top"}),
    ("block-stream", {"device": "virtio0", "base": "x", "base-node": "mid"}),
    ("block-stream", {"device": "virtio0", "base": "x", "bottom": "mid"}),
    ("block-stream", {"device": "virtio0", "bottom": "nonexist"}),
    ("block-stream", {"device": "virtio0", "backing-file": "x"}),
    ("block-stream", {"device": "nodev"}),
    ("block-stream", {"device": "mid"}),
    ("block-stream", {"device": "virtio0", "job-id": "1bad"}),
    ("block-stream", {"device": "virtio0", "job-id": "sp", "speed": -1}),
    ("block-stream", {"device": "virtio0", "base-node": "mid", "job-id": "s0"}),
    ("block-stream", {"device": "virtio0", "base": "$W/mid.qcow2", "job-id": "s00"}),
    ("block-commit", {"device": "nodev"}),
    ("block-commit", {"device": "mid"}),
    ("block-commit", {"device": "virtio0", "top": "x", "top-node": "y"}),
    ("block-commit", {"device": "virtio0", "top-node": "nonode"}),
    ("block-commit", {"device": "virtio0", "top": "nonfile"}),
    ("block-commit", {"device": "virtio0", "top-node": "mid", "base": "nonfile"}),
    ("block-commit", {"device": "virtio0", "top-node": "mid", "base-node": "top"}),
    ("block-commit", {"device": "virtio0", "top-node": "mid", "base-node": "x", "base": "y"}),
    ("block-commit", {"device": "virtio0", "top-node": "base"}),
    ("block-commit", {"device": "virtio0", "top-node": "mid", "base-node": "mid"}),
    ("block-commit", {"device": "virtio0", "top-node": "top", "backing-file": "x"}),
    ("block-commit", {"device": "virtio0", "top-node": "mid", "job-id": "1bad"}),
    _snap("act"), _io("write -P 0x44 2M 64k"),
    ("block-commit", {"device": "virtio0", "top-node": "top", "base-node": "mid",
                      "job-id": "c1"}),
    ("WAIT", {"id": "c1", "status": "null"}),
    ("query-jobs", {}),
    ("block-stream", {"device": "virtio0", "base-node": "base", "job-id": "s1"}),
    ("WAIT", {"id": "s1", "status": "null"}),
    ("block-stream", {"device": "virtio0", "job-id": "s2", "auto-finalize": False,
                      "auto-dismiss": False}),
    ("WAIT", {"id": "s2", "status": "pending"}),
    ("query-block-jobs", {}),
    ("block-job-finalize", {"id": "s2"}),
    ("query-jobs", {}),
    ("block-job-dismiss", {"id": "s2"}),
    _snap("act2"), _io("write -P 0x66 3M 64k"),
    ("block-commit", {"device": "virtio0", "job-id": "a1"}),
    ("WAIT", {"id": "a1", "status": "ready"}),
    ("query-block-jobs", {}),
    ("block-job-complete", {"device": "a1"}),
    ("WAIT", {"id": "a1", "status": "null"}),
    ("block-job-complete", {"device": "a1"}),
    _io("write -P 0x77 3M 4k"),
    ("query-block", {}),
    ("query-named-block-nodes", {"flat": True}),
]


def _strip(v):
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k != "actual-size"}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _session(argv0: list[str], work: Path) -> tuple[list, list]:
    out: list = []
    with QmpProcess(argv0 + [
            "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
            "-drive", f"file={work}/base.qcow2,format=qcow2,if=virtio,node-name=base"],
            work / "qmp.sock", cwd=work) as q:
        q.cmd("qmp_capabilities")
        for name, args in SCRIPT:
            if name == "WAIT":
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    st = [j["status"] for j in q.cmd("query-jobs")["return"]
                          if j["id"] == args["id"]]
                    if st == [args["status"]] or (args["status"] == "null" and not st):
                        break
                    time.sleep(0.02)
                continue
            r = q.cmd(name, json.loads(json.dumps(args).replace("$W", str(work))))
            if name == "query-named-block-nodes":
                # automatic names (#blockNNN) are random in both
                r = sorted(("#auto" if n["node-name"].startswith("#") else n["node-name"],
                            n["ro"], n.get("backing_file")) for n in r["return"])
            out.append((name, _strip(r)))
    jobs: dict = {}
    for e in q.events:
        d = e.get("data") or {}
        if e["event"].startswith(("JOB_", "BLOCK_JOB")):
            key = d.get("id", d.get("device"))
            jobs.setdefault(key, []).append(
                d["status"] if e["event"] == "JOB_STATUS_CHANGE" else (e["event"], d))
    return out, sorted(jobs.items())


def _img(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _images(work: Path) -> None:
    _img("qemu-img", "create", "-q", "-f", "qcow2", str(work / "base.qcow2"), "4M")
    _img("qemu-io", "-c", "write -P 0x11 0 1M", str(work / "base.qcow2"))
    _img("qemu-img", "create", "-q", "-f", "qcow2", str(work / "b2.qcow2"), "4M")
    _img("qemu-io", "-c", "write -P 0x12 0 2M", str(work / "b2.qcow2"))
    for lower, upper in (("b2", "m2"), ("m2", "t2")):
        _img("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(work / f"{lower}.qcow2"),
             "-F", "qcow2", str(work / f"{upper}.qcow2"))
    _img("qemu-io", "-c", "write -P 0x13 1M 2M", str(work / "m2.qcow2"))


def test_stream_and_commit_match_qemu(tmp_path: Path) -> None:
    qdir, edir = tmp_path / "q", tmp_path / "e"
    qdir.mkdir()
    edir.mkdir()
    _images(qdir)
    _images(edir)
    want, want_jobs = _session(["qemu-system-x86_64"], qdir)
    got, got_jobs = _session([sys.executable, "-m", "emu"], edir)
    assert len(got) == len(want)
    for (name, w), (_, g) in zip(want, got):
        w = json.loads(json.dumps(w).replace(str(qdir), "$W"))
        g = json.loads(json.dumps(g).replace(str(edir), "$W"))
        assert g == w, name
    assert [k for k, _ in want_jobs] == ["a1", "c1", "ro1", "s0", "s00", "s1", "s2", "s3",
                                         "sp"]
    assert got_jobs == want_jobs
    for img in ("act", "mid", "base", "m2", "b2"):
        r = subprocess.run(["qemu-img", "compare", str(qdir / f"{img}.qcow2"),
                            str(edir / f"{img}.qcow2")], capture_output=True, text=True)
        assert r.returncode == 0, img + r.stdout + r.stderr
        chk = subprocess.run(["qemu-img", "check", str(edir / f"{img}.qcow2")],
                             capture_output=True, text=True)
        assert chk.returncode == 0, img + chk.stdout

"""HMP block and port commands side by side with qemu-system-x86_64 7.2: ``info blockstats``,
``info block-jobs``, ``snapshot_blkdev_internal`` / ``snapshot_delete_blkdev_internal``, the
``block_job_*`` verbs and ``i`` / ``o`` (port reads and writes through the machine's I/O bus,
wide reads of byte-wide devices split as QEMU's memory core splits them) give the same text,
errors included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import QmpProcess, requires_qemu_img, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_system]

LINES = [
    "info blockstats",
    "info block-jobs",
    "snapshot_blkdev_internal ide0-hd0 s1",
    "snapshot_blkdev_internal ide0-hd0 s1",
    "snapshot_blkdev_internal nope s1",
    "snapshot_blkdev_internal virtio0 s1",
    "snapshot_blkdev_internal ide0-hd0",
    "snapshot_blkdev_internal ide0-hd0 a b",
    'snapshot_blkdev_internal ide0-hd0 "with space"',
    "info blockstats",
    "snapshot_delete_blkdev_internal ide0-hd0 s1",
    "snapshot_delete_blkdev_internal ide0-hd0 s1",
    "snapshot_delete_blkdev_internal ide0-hd0 s2 9",
    "snapshot_delete_blkdev_internal ide0-hd0",
    "block_job_cancel ide0-hd0",
    "block_job_cancel -f ide0-hd0",
    "block_job_complete nope",
    "block_job_pause ide0-hd0",
    "block_job_resume",
    # ports: byte-wide devices read wide (split as QEMU does), unassigned ports, bad input
    "i/b 0x64", "i/w 0x64", "i/h 0x61", "i/w 0x60", "i/w 0x92", "i/w 0x3f8", "i/w 0x3fb",
    "i/w 0x3fe", "i/w 0x3ff", "i/w 0x40", "i/w 0x42", "i/w 0x43", "i/w 0x21", "i/w 0xa0",
    "i/w 0xa1", "i/w 0x1f1", "i/w 0x1f7", "i/w 0x3f6", "i/w 0x177", "i/w 0x376", "i/w 0x80",
    "i/w 0xcfb", "i/h 0xcfe", "i/b 0x4d0",
    "o/b 0x3fb 0x83", "i/b 0x3fb", "i/b 0x3f8", "o/b 0x3f8 0x0c", "i/b 0x3f8", "o/b 0x3fb 0x03",
    "i/b 0x3fb", "o 0x80 0x12", "o 0x80", "o 0x80 0x100000000", "i 0x100000000", "i/g 0x3fd",
    "i/x",
]


def _session(argv0: list[str], work: Path) -> list[str]:
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(work / "b.raw"), "4M"], check=True)
    with QmpProcess(argv0 + ["-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none",
                             "-S", "-drive", f"file={work}/a.qcow2,format=qcow2,if=ide",
                             "-drive", f"file={work}/b.raw,format=raw,if=virtio"],
                    work / "qmp.sock", cwd=work) as q:
        q.cmd("qmp_capabilities")
        return [q.cmd("human-monitor-command", {"command-line": line})["return"] for line in LINES]


def test_hmp_block_and_port_commands_match_qemu(tmp_path: Path) -> None:
    want = _session(["qemu-system-x86_64"], tmp_path / "q")
    got = _session([sys.executable, "-m", "emu"], tmp_path / "e")
    assert want[2] == "" and "already exists" in want[3]          # the snapshot was taken
    for line, w, g in zip(LINES, want, got):
        assert g == w, f"{line!r}\nQEMU: {w!r}\nemu:  {g!r}"

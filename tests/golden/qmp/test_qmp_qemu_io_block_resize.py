"""HMP ``qemu-io`` and ``block_resize`` side by side with qemu-system-x86_64 7.2: the same
replies (errors included), the same qemu-io text on the emulator's stdout once the timing
figures are masked, and images of the same size afterwards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import QmpProcess, requires_qemu_img, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_system]

QEMU_IO = [
    "write 0 512", "write -P 0x33 1M 4k", "read -P 0x33 1M 4k", "read -P 0x34 1M 4k",
    "read -v 1M 32", "write -z 2M 64k", "flush", "aio_write -P 0x11 0 4k",
    "aio_read -P 0x11 0 4k", "aio_flush", "aio_discard 0 4k", "write 4M 512", "read 4M 512",
    "write 513 512", "write -q 0 512", "write", "write abc 512", "nosuch", "help write",
    "writev -P 3 0 512 1k", "readv -P 3 0 512 1k", "readv -v 0 16 16", "write -c 0 64k",
    "alloc 0 1M", "length", "write -P 0x100 0 512", "write -u 0 512", "write -P 1 -z 0 1",
    "write 0 3G", "read 0 0", "read -x 0 1", "read 0 -1", "read 0 1.5k",
    "read -C 0 512", "read -P 5 -s 512 -l 512 0 64k", "aio_write 512 511", "flush x",
    "help", "help nosuch", "discard -q 8k 512", "info",
]
HMP = [f'qemu-io ide0-hd0 "{c}"' for c in QEMU_IO] + [
    'qemu-io virtio0 "write -P 7 0 1k"', 'qemu-io virtio0 "discard 4M 512"',
    'qemu-io virtio0 "truncate 3M"', 'qemu-io virtio0 "length"', 'qemu-io vro "write 0 512"',
    'qemu-io vro "truncate 1M"', 'qemu-io vro "read -P 0 0 512"', "qemu-io ide0-hd0",
    "qemu-io", 'qemu-io -d nosuch "read 0 512"', 'qemu-io -d vdev "read 0 512"',
    'qemu-io nodev "read 0 512"', "qemu-io virtio0 'read 0 16'", "qemu-io virtio0 read",
    'qemu-io nd "write -P 5 0 64k"', 'qemu-io nd "read -P 5 0 64k"', 'qemu-io nro "write 0 1"',
    "block_resize virtio0 6M", "block_resize virtio0", "block_resize nosuch 6M",
]
QMP = [
    ("block_resize", {"device": "virtio0", "size": 8 << 20}),
    ("block_resize", {"device": "virtio0", "size": -512}),
    ("block_resize", {"device": "virtio0", "size": 2 << 20}),
    ("block_resize", {"device": "ide0-hd0", "size": 8 << 20}),
    ("block_resize", {"device": "ide0-hd0", "size": (8 << 20) + 1}),
    ("block_resize", {"node-name": "nd", "size": 4 << 20}),
    ("block_resize", {"node-name": "ndfile", "size": 8 << 20}),
    ("block_resize", {"node-name": "nro", "size": 4 << 20}),
    ("block_resize", {"device": "vro", "size": 8 << 20}),
    ("block_resize", {"device": "nosuch", "size": 8 << 20}),
    ("block_resize", {"node-name": "nosuch", "size": 8 << 20}),
    ("block_resize", {"size": 8 << 20}),
    ("block_resize", {"device": "", "node-name": "nd", "size": 5 << 20}),
    ("block_resize", {"device": "virtio0", "size": (1 << 63) - 512}),
    ("query-block", {}),
]
_TIMING = re.compile(r"(\d+:)?[\d:.]+( sec)? \([^)]*\)|^\d+,\d+,[\d:.]+,[\d.]+,[\d.]+$", re.M)


def _images(w: Path) -> None:
    def img(fmt: str, name: str, size: str) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(w / name), size], check=True)
    img("qcow2", "a.qcow2", "4M")
    img("raw", "r.img", "4M")
    img("raw", "ro.img", "4M")
    img("qcow2", "n.qcow2", "2M")
    img("raw", "n2.img", "1M")


def _session(argv0: list[str], w: Path) -> tuple[list, str]:
    replies: list = []
    q = QmpProcess(argv0 + [
        "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
        "-drive", f"file={w}/a.qcow2,format=qcow2,if=ide",
        "-drive", f"file={w}/r.img,format=raw,if=virtio",
        "-drive", f"file={w}/ro.img,format=raw,if=none,id=vro,readonly=on",
        "-device", "virtio-blk-pci,drive=vro,id=vdev"], w / "qmp.sock", cwd=w)
    try:
        q.cmd("qmp_capabilities")
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "nd", "file": {
            "driver": "file", "filename": f"{w}/n.qcow2", "node-name": "ndfile"}})
        q.cmd("blockdev-add", {"driver": "raw", "node-name": "nro", "read-only": True,
                               "file": {"driver": "file", "filename": f"{w}/n2.img"}})
        for line in HMP:
            replies.append((line, q.cmd("human-monitor-command", {"command-line": line})))
        for name, args in QMP:
            r = q.cmd(name, args)
            if name == "query-block":
                r = [(b["device"], b["inserted"]["image"]["virtual-size"]) for b in r["return"]]
            replies.append((name, args, r))
    finally:
        out = q.close()
    return replies, _TIMING.sub("T", out)


def test_qemu_io_and_block_resize_match_qemu(tmp_path: Path) -> None:
    qdir, edir = tmp_path / "q", tmp_path / "e"
    qdir.mkdir()
    edir.mkdir()
    _images(qdir)
    _images(edir)
    want, want_out = _session(["qemu-system-x86_64"], qdir)
    got, got_out = _session([sys.executable, "-m", "emu"], edir)
    assert len(want) == len(got) == len(HMP) + len(QMP)
    assert "wrote 4096/4096 bytes at offset 1048576" in want_out
    for w, g in zip(want, got):
        w = json.loads(json.dumps(w).replace(str(qdir), "$W"))
        g = json.loads(json.dumps(g).replace(str(edir), "$W"))
        assert g == w
    # qemu-io's text on the emulator's stdout/stderr; the line order between the two
    # streams is the pipe's, so compare the lines as multisets
    assert sorted(got_out.splitlines()) == sorted(want_out.splitlines())
    for name in ("a.qcow2", "n.qcow2"):
        chk = subprocess.run(["qemu-img", "check", str(edir / name)], capture_output=True,
                             text=True)
        assert chk.returncode == 0, chk.stdout + chk.stderr
    for name in ("a.qcow2", "r.img", "n.qcow2"):
        info = [json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U",
                                           str(d / name)], capture_output=True, text=True,
                                          check=True).stdout)["virtual-size"]
                for d in (qdir, edir)]
        assert info[0] == info[1], name

"""qcow2 guest discard side by side with qemu-io 7.2 (qcow2_co_pdiscard, full_discard=false).

The same writes, zero writes and discards (whole clusters, partial clusters, the short last
cluster of an unaligned image, a range with no L2 table) go through qemu-io on one image and
through emu's qcow2 driver on another: ``qemu-img map``, ``qemu-img check`` (image end offset,
leaks, errors), the file size and its data/hole layout (freed clusters are punched)
are the same, for v2 and v3 images with and without a backing file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io
from emu.block.node import BlockGraph

pytestmark = [requires_qemu_img, requires_qemu_io]

KiB = 1024
MiB = 1024 * KiB
OPS = [("write", 0, 320 * KiB, 0x11), ("write", 448 * KiB, 64 * KiB, 0x22),
       ("write", 1536 * KiB, 64 * KiB, 0x33), ("zero", 512 * KiB, 128 * KiB),
       ("discard", 32 * KiB, 256 * KiB),          # partial head and tail ignored
       ("discard", 448 * KiB, 64 * KiB),          # data cluster
       ("discard", 512 * KiB, 64 * KiB),          # zero cluster
       ("discard", 640 * KiB, 128 * KiB),         # unallocated
       ("discard", (512 << 20) + 64 * KiB, 64 * KiB),   # its L2 table does not exist yet
       ("discard", 1500 * KiB, 10 * KiB)]         # less than a cluster


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _state(img: Path) -> tuple:
    m = json.loads(_qemu_img("map", "--output=json", str(img)))
    c = json.loads(_qemu_img("check", "--output=json", str(img)))
    c.pop("filename")
    return m, c, os.stat(img).st_size, _data_ranges(img)


def _data_ranges(img: Path) -> list[tuple[int, int]]:
    """The file's data extents by SEEK_DATA/SEEK_HOLE: punched clusters are holes.  (Not
    st_blocks: that also counts ext4's extent-tree blocks, which depend on the order the
    holes were made in, not on which clusters are punched.)"""
    ranges, pos = [], 0
    with open(img, "rb") as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:             # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos))
    return ranges


@pytest.mark.parametrize("size", [(1 << 30) + (2 << 20), (1 << 30) + 2000 * KiB])
@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_discard_matches_qemu_io(tmp_path: Path, compat: str, backing: bool, size: int) -> None:
    base = tmp_path / "base.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
    subprocess.run(["qemu-io", "-c", "write -P 0x77 0 2M", "-c", f"write -P 0x66 {size - 2 * MiB} 2M",
                    "-c", f"write -P 0x55 {512 * MiB} 1M", str(base)], check=True, capture_output=True)
    ops = OPS + [("discard", size - 48 * KiB, 48 * KiB)]   # the last cluster (short when unaligned)
    states = {}
    for who in ("qemu", "emu"):
        img = tmp_path / f"{who}.qcow2"
        opts = ["-o", f"compat={compat}"] + (["-b", str(base), "-F", "qcow2"] if backing else [])
        _qemu_img("create", "-q", "-f", "qcow2", *opts, str(img), str(size))
        if who == "qemu":
            cmds = []
            for op in ops:
                verb = {"write": f"write -P {op[3] if len(op) > 3 else 0}", "zero": "write -z",
                        "discard": "discard"}[op[0]]
                cmds += ["-c", f"{verb} {op[1]} {op[2]}"]
            subprocess.run(["qemu-io", *cmds, str(img)], check=True, capture_output=True)
        else:
            g = BlockGraph()
            bs = g.open_image(str(img))
            for op in ops:
                if op[0] == "write":
                    bs.write(op[1], bytes([op[3]]) * op[2])
                elif op[0] == "zero":
                    bs.write_zeroes(op[1], op[2])
                else:
                    bs.discard(op[1], op[2])
            g.close_all()
        states[who] = _state(img)
    q, e = states["qemu"], states["emu"]
    assert e[0] == q[0]                      # qemu-img map: zero clusters vs unallocated
    assert e[1] == q[1]                      # qemu-img check: no leak, same image end
    assert e[1]["check-errors"] == 0
    assert e[2:] == q[2:]                    # file size and data/hole layout (punched clusters)
    r = subprocess.run(["qemu-img", "compare", str(tmp_path / "qemu.qcow2"), str(tmp_path / "emu.qcow2")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr          # the same content

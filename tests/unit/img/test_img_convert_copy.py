"""emu-img convert's copy loop: zero-block detection (-S), the reused read buffer, and the
images it writes compared with qemu-img's byte for byte."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import requires_qemu_img
from emu.img.cmd_copy import _sparse_runs
from emu.img.main import main

KiB, MiB = 1 << 10, 1 << 20


def _reference_runs(buf: bytes, n: int, step: int) -> list[tuple[int, int, bool]]:
    """The obvious per-block loop: blocks of ``step`` from the start, runs merged."""
    out: list[list] = []
    for i in range(0, n, step):
        j = min(i + step, n)
        zero = buf[i:j].count(0) == j - i
        if out and out[-1][2] == zero:
            out[-1][1] = j
        else:
            out.append([i, j, zero])
    return [tuple(r) for r in out]


def test_sparse_runs_match_a_per_block_scan():
    rnd = random.Random(20261202)
    for _ in range(800):
        step = rnd.choice([512, 1024, 4096, 65536])
        n = rnd.randrange(1, 6 * step + 1000)
        buf = bytearray(n + rnd.randrange(0, 3000))  # the buffer may be longer than the chunk
        for _ in range(rnd.randrange(0, 8)):
            a = rnd.randrange(len(buf))
            b = min(len(buf), a + rnd.choice([1, 8, 100, step - 1, step, 3 * step]))
            buf[a:b] = rnd.randbytes(b - a).replace(b"\0", b"\1")
        for _ in range(rnd.randrange(0, 4)):  # isolated bytes, some of them zero
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        got = list(_sparse_runs(buf, n, step, bytes(step)))
        assert got == _reference_runs(buf, n, step), (step, n)


def test_sparse_runs_edges():
    step = 4096
    z = bytes(step)
    assert list(_sparse_runs(bytearray(3 * step), 3 * step, step, z)) == [(0, 3 * step, True)]
    data = bytearray(b"\x01" * (2 * step + 100))
    assert list(_sparse_runs(data, len(data), step, z)) == [(0, len(data), False)]
    # Zero words at the start of a block that is not all zero; a short zero tail.
    buf = bytearray(b"\x07" * step) + bytearray(step) + bytearray(8) + b"\x09" * (step - 8) + bytearray(100)
    assert list(_sparse_runs(buf, len(buf), step, z)) == [
        (0, step, False), (step, 2 * step, True), (2 * step, 3 * step, False), (3 * step, len(buf), True)]


def _source(path: Path) -> None:
    rnd = random.Random(7)
    with open(path, "wb") as fh:
        fh.truncate(24 * MiB)
        fh.seek(MiB + 512)  # unaligned data with zero blocks inside and around it
        fh.write(rnd.randbytes(3 * MiB) + bytes(300 * KiB) + rnd.randbytes(5 * KiB) + bytes(64 * KiB))
        fh.seek(9 * MiB)
        fh.write(bytes(2 * MiB))  # allocated zeros
        fh.seek(20 * MiB - 4 * KiB)
        fh.write(rnd.randbytes(4 * KiB + 1))  # across a chunk boundary, odd length


@requires_qemu_img
@pytest.mark.parametrize("opts", [[], ["-S", "0"], ["-S", "64k"], ["-c"], ["-o", "cluster_size=4096"]])
def test_convert_matches_qemu_img_byte_for_byte(tmp_path, opts):
    src = tmp_path / "src.raw"
    _source(src)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert main(["convert", "-f", "raw", "-O", "qcow2", *opts, str(src), str(ours)]) == 0
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(src), str(theirs)],
                   check=True)
    subprocess.run(["qemu-img", "check", "-q", str(ours)], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src), str(ours)], check=True)
    if "-c" not in opts:  # zlib output may differ; the layout is compared through compare/check
        assert ours.read_bytes() == theirs.read_bytes()


@requires_qemu_img
def test_convert_raw_to_raw_keeps_holes_and_data(tmp_path):
    src = tmp_path / "src.raw"
    _source(src)
    dst = tmp_path / "dst.raw"
    assert main(["convert", "-f", "raw", "-O", "raw", str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks < os.stat(src).st_blocks  # allocated zeros became holes

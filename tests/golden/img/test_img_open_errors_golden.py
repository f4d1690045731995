"""Opening damaged qcow2 images: emu-img gives qemu-img 7.2's texts and exit codes.

A corpus built here from a qemu-img image (v3 with a backing file and a snapshot, and a v2
one): the file cut at 0..196607 bytes, and single header fields set to bad values (magic,
version, cluster bits, header length, table offsets and sizes, snapshot count, features,
refcount order, compression type, backing name offset/size, a header extension length).
QEMU reads past the end of a file as zeroes and checks the fields in its own order
(qcow2_do_open); ``info``, ``check`` and ``snapshot -l`` must answer byte for byte alike.

Left out, as emu limitations (docs/architecture.md): encryption, extended L2, external data
files, zstd, qcow version 1 (QEMU's separate "qcow" driver), and ``check`` of an image
without a refcount table (QEMU's check mode accepts it)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

EMU_IMG = [sys.executable, "-m", "emu.img"]

CUTS = [0, 1, 3, 4, 7, 8, 20, 71, 72, 99, 100, 103, 104, 105, 111, 112, 200, 511, 512, 65535,
        65536, 196607]
FIELDS = {   # name: (offset, struct format, value)
    "ver0": (4, ">I", 0), "ver4": (4, ">I", 4), "verff": (4, ">I", 0xFFFFFFFF),
    "cb0": (20, ">I", 0), "cb8": (20, ">I", 8), "cb9": (20, ">I", 9), "cb21": (20, ">I", 21),
    "cb22": (20, ">I", 22), "hl0": (100, ">I", 0), "hl103": (100, ">I", 103),
    "hl105": (100, ">I", 105), "hl112": (100, ">I", 112), "hl64k": (100, ">I", 65536),
    "hl64k1": (100, ">I", 65537), "magic": (0, ">I", 0x514649FA), "size62": (24, ">Q", 1 << 62),
    "size55": (24, ">Q", 1 << 55), "l1s0": (36, ">I", 0), "l1sbig": (36, ">I", 0x7FFFFFFF),
    "l1s5M": (36, ">I", 5 << 20), "l1ounal": (40, ">Q", 0x30008), "l1ofar": (40, ">Q", 1 << 40),
    "rtcbig": (56, ">I", 0x10000), "rto0": (48, ">Q", 0), "rtounal": (48, ">Q", 0x10008),
    "rtofar": (48, ">Q", 1 << 40), "nbs_big": (60, ">I", 70000), "nbs_5": (60, ">I", 5),
    "so0": (64, ">Q", 0), "sounal": (64, ">Q", 0x70008), "sofar": (64, ">Q", 1 << 40),
    "inc_unk": (72, ">Q", 1 << 20), "inc_dirty": (72, ">Q", 1), "inc_corrupt": (72, ">Q", 2),
    "inc_zlibbit": (72, ">Q", 8), "ro7": (96, ">I", 7), "ro6": (96, ">I", 6), "ro0": (96, ">I", 0),
    "bfo_big": (8, ">Q", 70000), "bfo_none": (8, ">Q", 0), "bfs0": (16, ">I", 0),
    "bfs1023": (16, ">I", 1023), "bfs1024": (16, ">I", 1024), "bfs2k": (16, ">I", 2000),
    "bfo_odd": (8, ">Q", 0x10001), "ctype1": (104, ">B", 1), "ctype2": (104, ">B", 2),
}
V2_FIELDS = ["ver4", "cb8", "l1s0", "nbs_5", "so0", "l1ofar", "rtofar", "bfo_big"]


def _corpus(d: Path) -> list[str]:
    def qi(*a: str) -> None:
        subprocess.run(list(a), cwd=d, check=True, capture_output=True)
    qi("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qi("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "full.qcow2", "4M")
    qi("qemu-io", "-c", "write 0 64k", "full.qcow2")
    qi("qemu-img", "snapshot", "-c", "s", "full.qcow2")
    qi("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M")
    full, v2 = (d / "full.qcow2").read_bytes(), (d / "v2.qcow2").read_bytes()
    names = []
    for n in CUTS:
        (d / f"cut{n}.qcow2").write_bytes(full[:n])
        names.append(f"cut{n}.qcow2")
    for n in (8, 20, 71, 72, 104):
        (d / f"v2cut{n}.qcow2").write_bytes(v2[:n])
        names.append(f"v2cut{n}.qcow2")
    for base, tag, fields in ((full, "m", FIELDS), (v2, "w", {k: FIELDS[k] for k in V2_FIELDS})):
        for k, (off, fm, val) in fields.items():
            b = bytearray(base)
            struct.pack_into(fm, b, off, val)
            (d / f"{tag}_{k}.qcow2").write_bytes(b)
            names.append(f"{tag}_{k}.qcow2")
    hl = struct.unpack_from(">I", full, 100)[0]
    b = bytearray(full)
    struct.pack_into(">I", b, hl + 4, 0xFFF0)      # first header extension too long
    (d / "m_extlen.qcow2").write_bytes(b)
    names.append("m_extlen.qcow2")
    return names


def _run(cmd: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("damaged")
    return d, _corpus(d)


@pytest.mark.parametrize("command", [["info"], ["check"], ["snapshot", "-l"]])
def test_damaged_headers_answer_as_qemu_img(corpus, command: list[str]) -> None:
    tmp_path, names = corpus
    jobs = []
    for n in names:
        jobs.append((n, ["qemu-img", *command, n]))
        jobs.append((n, EMU_IMG + [*command, n]))
    with ThreadPoolExecutor(4) as pool:
        res = list(pool.map(lambda j: _run(j[1], tmp_path), jobs))
    bad = []
    for i in range(0, len(jobs), 2):
        name = jobs[i][0]
        q, e = res[i], res[i + 1]
        e = (e[0], re.sub(rb"(?<!q)emu-img", b"qemu-img", e[1]), re.sub(rb"(?<!q)emu-img", b"qemu-img", e[2]))
        if q != e:
            bad.append(f"{' '.join(command)} {name}:\n  qemu: {q}\n  emu:  {e}")
    assert not bad, "\n".join(bad)

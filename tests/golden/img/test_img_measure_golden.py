"""``emu-img measure`` against qemu-img 7.2: --size and image sources, -O raw/qcow2, -o
cluster_size/refcount_bits/compat, -l snapshots, --output=json, and the refusals; same
output byte for byte and same exit code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

TOOLS = {"qemu": ["qemu-img"], "emu": [sys.executable, "-m", "emu.img"]}

CASES = [
    "--size 1G -O qcow2", "--size 1G", "--size 1000 -O qcow2", "-O qcow2 --size 3T -o cluster_size=2M",
    "-O qcow2 -o cluster_size=4k,compat=0.10 --size 100M", "-O qcow2 -o refcount_bits=1 --size 100M",
    "-O qcow2 -o cluster_size=512 --size 10G", "--output=json --size 1M",
    "-O qcow2 --output=json --size 5G -o refcount_bits=64",
    "-O qcow2 d.qcow2", "-O qcow2 --output=json d.qcow2", "-O raw d.qcow2",
    "-O qcow2 -o compat=0.10 d.qcow2", "-O qcow2 v2.qcow2", "-O qcow2 --output=json v2.qcow2",
    "-O qcow2 top.qcow2", "-O qcow2 d.raw", "-O qcow2 -o cluster_size=4k d.raw",
    "-O qcow2 -l one d.qcow2", "-O qcow2 -l snapshot.name=one d.qcow2", "-O qcow2 -l nope d.qcow2",
    "", "--size 1G d.qcow2", "--size 1x", "-O foo --size 1G", "--output=xml --size 1G",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("measure")

    def sh(*cmd: str) -> None:
        subprocess.run(list(cmd), cwd=d, check=True, capture_output=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "1G")
    sh("qemu-io", "-c", "write 0 3M", "-c", "write 100M 64k", "-c", "write -z 200M 1M",
       "-c", "write 300M 1000", "d.qcow2")
    sh("qemu-img", "snapshot", "-c", "one", "d.qcow2")
    sh("qemu-io", "-c", "write 500M 2M", "d.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M")
    sh("qemu-io", "-c", "write 1M 1M", "v2.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", "top.qcow2")
    sh("qemu-io", "-c", "write 700M 64k", "top.qcow2")
    with open(d / "d.raw", "wb") as fh:
        fh.write(b"\1" * 300000)
        fh.truncate(50 << 20)
        fh.seek(20 << 20)
        fh.write(b"\2" * 70000)
    return d


@pytest.mark.parametrize("args", CASES)
def test_measure_like_qemu(images: Path, args: str) -> None:
    res = []
    for tool in TOOLS:
        r = subprocess.run(TOOLS[tool] + ["measure", *args.split()], cwd=images, capture_output=True,
                           text=True, timeout=60)
        res.append((r.returncode, r.stdout, re.sub(r"^emu-img", "qemu-img", r.stderr, flags=re.M)))
    assert res[1] == res[0]

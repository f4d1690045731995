"""``resize --shrink`` of qcow2 (and raw) images: emu-img against qemu-img 7.2 on twin images.

Same messages and exit codes, same virtual size, same ``check`` report (image end offset
included: the file is cut after its last cluster in use), same contents, and snapshots
taken before the shrink keep the data past the new end."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

TOOLS = {"qemu": ["qemu-img"], "emu": [sys.executable, "-m", "emu.img"]}
M = 1 << 20


def _sh(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)


def _resize(tool: str, d: Path, *args: str) -> tuple:
    r = subprocess.run(TOOLS[tool] + ["resize", *args], cwd=d, capture_output=True, text=True)
    return r.returncode, r.stdout, re.sub(r"^emu-img", "qemu-img", r.stderr, flags=re.M)


def _state(d: Path, img: str) -> tuple:
    info = _sh(d, "qemu-img", "info", "--output=json", img).stdout
    vsize = re.search(r'"virtual-size": (\d+)', info).group(1)
    chk = subprocess.run(["qemu-img", "check", img], cwd=d, capture_output=True, text=True)
    return vsize, chk.returncode, chk.stdout


@pytest.mark.parametrize("variant", ["plain", "snapshot", "backing", "v2", "cluster4k"])
def test_qcow2_shrink_like_qemu(tmp_path: Path, variant: str) -> None:
    d = tmp_path
    opts = {"v2": ["-o", "compat=0.10"], "cluster4k": ["-o", "cluster_size=4096"]}.get(variant, [])
    if variant == "backing":
        _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
        _sh(d, "qemu-io", "-c", "write -P 7 0 8M", "base.qcow2")
        _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2")
    else:
        _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", *opts, "a.qcow2", "8M")
    _sh(d, "qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 5M 1M", "-c", "write -z 6M 64k",
        "-c", "write -c -P 3 7M 64k", "a.qcow2")
    if variant in ("snapshot", "v2"):
        _sh(d, "qemu-img", "snapshot", "-c", "before", "a.qcow2")
        _sh(d, "qemu-io", "-c", "write -P 4 2M 4M", "a.qcow2")
    shutil.copy(d / "a.qcow2", d / "q.qcow2")
    shutil.copy(d / "a.qcow2", d / "e.qcow2")
    for args in (["q.qcow2", "4M"], ["--shrink", "q.qcow2", "5000"], ["--shrink", "q.qcow2", "2560K"],
                 ["--shrink", "q.qcow2", "-512K"], ["q.qcow2", "+3M"]):
        q = _resize("qemu", d, *args)
        e = _resize("emu", d, *[a.replace("q.qcow2", "e.qcow2") for a in args])
        assert e == (q[0], q[1], q[2].replace("q.qcow2", "e.qcow2")), args
        assert _state(d, "e.qcow2") == _state(d, "q.qcow2"), args
    _sh(d, "qemu-img", "compare", "q.qcow2", "e.qcow2")
    if variant in ("snapshot", "v2"):
        for img in ("q.qcow2", "e.qcow2"):
            _sh(d, "qemu-img", "snapshot", "-a", "before", img)
        _sh(d, "qemu-img", "compare", "q.qcow2", "e.qcow2")
        out = _sh(d, "qemu-io", "-c", "read -P 2 5M 1M", "-c", "read -P 3 7M 64k", "e.qcow2").stdout
        assert "verification failed" not in out   # the snapshot kept the data past the cut
        assert _state(d, "e.qcow2") == _state(d, "q.qcow2")


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_grow_over_a_longer_backing_file(tmp_path: Path, compat: str) -> None:
    """QEMU zeroes the new area (v3: zero clusters) so the backing file does not show
    through it, and refuses for v2 (no zero clusters)."""
    _sh(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    _sh(tmp_path, "qemu-io", "-c", "write -P 7 0 8M", "base.qcow2")
    for t in TOOLS:
        _sh(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b",
            "base.qcow2", "-F", "qcow2", f"{t}.qcow2", "1000K")
    q = _resize("qemu", tmp_path, "qemu.qcow2", "4M")
    e = _resize("emu", tmp_path, "emu.qcow2", "4M")
    assert e == q
    maps = [_sh(tmp_path, "qemu-img", "map", "--output=json", f"{t}.qcow2").stdout for t in TOOLS]
    assert maps[0] == maps[1]
    _sh(tmp_path, "qemu-img", "compare", "qemu.qcow2", "emu.qcow2")


def test_raw_shrink_like_qemu(tmp_path: Path) -> None:
    for tool in TOOLS:
        p = tmp_path / f"{tool}.raw"
        p.write_bytes(b"\x01" * (3 * M))
    for args in (["-f", "raw", "X.raw", "1M"], ["-f", "raw", "--shrink", "X.raw", "1M"],
                 ["-f", "raw", "--shrink", "X.raw", "1000"]):
        q = _resize("qemu", tmp_path, *[a.replace("X", "qemu") for a in args])
        e = _resize("emu", tmp_path, *[a.replace("X", "emu") for a in args])
        assert e == (q[0], q[1], q[2].replace("qemu.raw", "emu.raw")), args
        assert (tmp_path / "emu.raw").read_bytes() == (tmp_path / "qemu.raw").read_bytes()

"""``convert -B backing -F fmt`` and ``convert -l snapshot``: emu-img against qemu-img 7.2.

-B: the target gets the backing file and only what the source's top layer allocates is
copied (same map, same contents); its refusals (raw target, no -F, missing backing file).
-l: a bare name (id first, then name), ``snapshot.id=``/``snapshot.name=`` (both must match),
several sources, raw sources, bad parameters; same exit codes, messages and bytes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

TOOLS = {"qemu": ["qemu-img"], "emu": [sys.executable, "-m", "emu.img"]}


def _sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("convb")
    _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", "b1.qcow2", "4M")
    _sh(d, "qemu-io", "-c", "write -P 1 0 1M", "b1.qcow2")
    _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "top.qcow2")
    _sh(d, "qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 64k", "top.qcow2")
    _sh(d, "qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M")
    for i, name in enumerate(("one", "two", "2"), 1):
        _sh(d, "qemu-io", "-c", f"write -P {i} 0 64k", "s.qcow2")
        _sh(d, "qemu-img", "snapshot", "-c", name, "s.qcow2")
    _sh(d, "qemu-io", "-c", "write -P 9 0 64k", "s.qcow2")
    _sh(d, "qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M")
    return d


def _run(tool: str, d: Path, args: list[str], out: str) -> tuple:
    (d / out).unlink(missing_ok=True)
    r = subprocess.run(TOOLS[tool] + args + [out], cwd=d, capture_output=True, text=True, timeout=60)
    err = r.stderr if tool == "qemu" else re.sub(r"^emu-img", "qemu-img", r.stderr, flags=re.M)
    err = err.replace(f"'{out}'", "'OUT'")
    return r.returncode, r.stdout, err


def _map(d: Path, path: str) -> str:
    out = subprocess.run(["qemu-img", "map", "--output=json", path], cwd=d, capture_output=True,
                         text=True, check=True).stdout
    return re.sub(r'"offset": \d+', "", out)


CASES_B = [
    ["convert", "-O", "qcow2", "-B", "b1.qcow2", "-F", "qcow2", "top.qcow2"],
    ["convert", "-O", "qcow2", "-B", "b1.qcow2", "-F", "qcow2", "b1.qcow2"],
    ["convert", "-O", "qcow2", "-B", "b1.qcow2", "-F", "raw", "top.qcow2"],
    ["convert", "-O", "qcow2", "-B", "b1.qcow2", "top.qcow2"],
    ["convert", "-O", "raw", "-B", "b1.qcow2", "-F", "qcow2", "top.qcow2"],
    ["convert", "-O", "qcow2", "-B", "nonexist.qcow2", "-F", "qcow2", "top.qcow2"],
]


@pytest.mark.parametrize("args", CASES_B, ids=[" ".join(a[2:]) for a in CASES_B])
def test_convert_backing(images: Path, args: list[str]) -> None:
    q = _run("qemu", images, args, "q.out")
    qmap = _map(images, "q.out") if q[0] == 0 else None
    e = _run("emu", images, args, "e.out")
    assert e == q
    if q[0] == 0:
        assert _map(images, "e.out") == qmap
        subprocess.run(["qemu-img", "compare", "q.out", "e.out"], cwd=images, check=True,
                       capture_output=True)
        subprocess.run(["qemu-img", "check", "e.out"], cwd=images, check=True, capture_output=True)


CASES_L = ["one", "1", "two", "2", "3", "snapshot.id=1", "snapshot.name=two",
           "snapshot.id=1,snapshot.name=two", "snapshot.id=2,snapshot.name=two", "nope",
           "snapshot.foo=1", "id=1", "snapshot.id=9", "snapshot.id"]


@pytest.mark.parametrize("param", CASES_L)
def test_convert_snapshot(images: Path, param: str) -> None:
    args = ["convert", "-O", "raw", "-l", param, "s.qcow2"]
    q = _run("qemu", images, args, "q.raw")
    qdata = (images / "q.raw").read_bytes() if q[0] == 0 else None
    e = _run("emu", images, args, "e.raw")
    assert e == q
    if q[0] == 0:
        assert (images / "e.raw").read_bytes() == qdata


@pytest.mark.parametrize("args", [["-l", "one", "s.qcow2", "s.qcow2"],
                                  ["-l", "snapshot.name=one", "s.qcow2", "s.qcow2"],
                                  ["-l", "one", "r.raw"], ["-l", "one", "-B", "x", "top.qcow2"]])
def test_convert_snapshot_refusals(images: Path, args: list[str]) -> None:
    full = ["convert", "-O", "raw", *args]
    q = _run("qemu", images, full, "q.raw")
    qdata = (images / "q.raw").read_bytes() if q[0] == 0 else None
    e = _run("emu", images, full, "e.raw")
    assert e == q
    if q[0] == 0:
        assert (images / "e.raw").read_bytes() == qdata


def test_convert_copy_offload_raw(tmp_path: Path) -> None:
    """-C (copy_file_range) between raw files: same bytes and map as qemu-img -C, and its
    refusals with -c and -S."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as fh:
        fh.write(bytes(range(256)) * 4096)        # 1 MiB of data
        fh.truncate(8 << 20)                      # then a hole
        fh.seek(5 << 20)
        fh.write(b"\xff" * 65536)
    for args in (["-C", "-f", "raw", "-O", "raw", "src.raw"], ["-C", "-c", "-O", "qcow2", "src.raw"],
                 ["-C", "-S", "0", "-O", "raw", "src.raw"]):
        q = _run("qemu", tmp_path, ["convert", *args], "q.raw")
        qdata = (tmp_path / "q.raw").read_bytes() if q[0] == 0 else None
        e = _run("emu", tmp_path, ["convert", *args], "e.raw")
        assert e == q
        if q[0] == 0:
            assert (tmp_path / "e.raw").read_bytes() == qdata
            assert _map(tmp_path, "e.raw") == _map(tmp_path, "q.raw")

"""Images written by emu-img, judged by qemu-img: check, compare, snapshot -l, info.

Covers the brief's interop list: convert of a 64 MiB raw holding random data, zeros and
holes; internal snapshots created and deleted; a 3-deep backing chain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

EMU_IMG = [sys.executable, "-m", "emu.img"]
MiB = 1 << 20


def emu(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(EMU_IMG + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, f"emu-img {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


def qemu(*args: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == rc, f"qemu-img {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


def clean_check(path: str, cwd: Path) -> None:
    out = json.loads(qemu("check", "--output=json", path, cwd=cwd).stdout)
    assert out["check-errors"] == 0 and "corruptions" not in out and "leaks" not in out


INFO_KEYS = ("virtual-size", "format", "cluster-size", "backing-filename", "dirty-flag")


def assert_info_agrees(path: str, cwd: Path) -> None:
    ours = json.loads(emu("info", "--output=json", "--backing-chain", path, cwd=cwd).stdout)
    theirs = json.loads(qemu("info", "--output=json", "--backing-chain", path, cwd=cwd).stdout)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for k in INFO_KEYS:
            assert a.get(k) == b.get(k), k
        assert [(s["id"], s["name"]) for s in a.get("snapshots", [])] == \
            [(s["id"], s["name"]) for s in b.get("snapshots", [])]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """64 MiB raw: random data, explicit zeros, and holes."""
    d = tmp_path_factory.mktemp("interop")
    src = d / "src.raw"
    rnd = __import__("random").Random(42)
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 4):  # every 4th MiB: random; next: zeros written; rest: holes
            f.seek(i * MiB)
            f.write(rnd.randbytes(MiB - 4096) + bytes(4096))
            f.write(bytes(MiB))
        f.seek(63 * MiB + 12345)
        f.write(b"tail")
    return src


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "compat=0.10"], ["-c"],
                                  ["-o", "cluster_size=2M"]], ids=["default", "4k", "v2", "compressed", "2M"])
def test_convert_raw_to_qcow2(source: Path, opts: list[str]) -> None:
    d = source.parent
    out = f"conv{len(opts)}{''.join(o[:4] for o in opts)}.qcow2".replace("=", "")
    emu("convert", "-f", "raw", "-O", "qcow2", *opts, source.name, out, cwd=d)
    clean_check(out, d)
    qemu("compare", "-f", "raw", "-F", "qcow2", source.name, out, cwd=d)
    assert_info_agrees(out, d)
    # And back to raw through emu-img: identical bytes.
    back = out + ".raw"
    emu("convert", "-O", "raw", out, back, cwd=d)
    assert (d / back).read_bytes() == source.read_bytes()


def test_snapshots_created_and_deleted(source: Path) -> None:
    d = source.parent
    img = "snaps.qcow2"
    emu("convert", "-f", "raw", "-O", "qcow2", source.name, img, cwd=d)
    for name in ("one", "two", "three", "four"):
        emu("snapshot", "-c", name, img, cwd=d)
        subprocess.run(["qemu-io", "-c", f"write -P 0x{len(name):02x} {len(name)}M 64k", img], cwd=d,
                       check=True, capture_output=True)
    emu("snapshot", "-d", "two", img, cwd=d)
    emu("snapshot", "-d", "one", img, cwd=d)  # -d takes a name (qemu-img 7.2: never an id)
    clean_check(img, d)
    ours = emu("snapshot", "-l", img, cwd=d).stdout
    theirs = qemu("snapshot", "-l", img, cwd=d).stdout
    assert ours == theirs and "three" in ours and "two" not in ours
    assert_info_agrees(img, d)
    # Revert to "three" and compare with the source plus the writes made before it.
    emu("snapshot", "-a", "three", img, cwd=d)
    clean_check(img, d)
    ref = d / "snaps-ref.raw"
    ref.write_bytes(source.read_bytes())
    with open(ref, "r+b") as f:
        for name in ("one", "two"):
            f.seek(len(name) * MiB)
            f.write(bytes([len(name)]) * 65536)
    qemu("compare", "-F", "raw", img, ref.name, cwd=d)


def test_three_deep_backing_chain(source: Path) -> None:
    d = source.parent
    emu("convert", "-f", "raw", "-O", "qcow2", source.name, "c0.qcow2", cwd=d)
    emu("create", "-f", "qcow2", "-b", "c0.qcow2", "-F", "qcow2", "c1.qcow2", cwd=d)
    emu("create", "-f", "qcow2", "-b", "c1.qcow2", "-F", "qcow2", "c2.qcow2", cwd=d)
    for i, img in enumerate(("c1.qcow2", "c2.qcow2")):
        subprocess.run(["qemu-io", "-c", f"write -P 0x{0x70 + i:02x} {i * 3 + 1}M 2M", img], cwd=d,
                       check=True, capture_output=True)
    for img in ("c0.qcow2", "c1.qcow2", "c2.qcow2"):
        clean_check(img, d)
    assert_info_agrees("c2.qcow2", d)
    ours = emu("map", "--output=json", "c2.qcow2", cwd=d).stdout
    assert ours == qemu("map", "--output=json", "c2.qcow2", cwd=d).stdout
    flat = "flat.raw"
    emu("convert", "-O", "raw", "c2.qcow2", flat, cwd=d)
    qemu("compare", "c2.qcow2", flat, cwd=d)
    # Safe rebase of the top onto the bottom keeps the content; commit folds it down.
    emu("rebase", "-b", "c0.qcow2", "-F", "qcow2", "c2.qcow2", cwd=d)
    clean_check("c2.qcow2", d)
    qemu("compare", "c2.qcow2", flat, cwd=d)
    emu("commit", "c2.qcow2", cwd=d)
    clean_check("c0.qcow2", d)
    qemu("compare", "-f", "qcow2", "-F", "raw", "c0.qcow2", flat, cwd=d)


def test_resize_grow(tmp_path: Path) -> None:
    emu("create", "-f", "qcow2", "g.qcow2", "1M", cwd=tmp_path)
    emu("resize", "g.qcow2", "+1G", cwd=tmp_path)
    emu("create", "-f", "raw", "g.raw", "1M", cwd=tmp_path)
    emu("resize", "-f", "raw", "g.raw", "3M", cwd=tmp_path)
    clean_check("g.qcow2", tmp_path)
    assert json.loads(qemu("info", "--output=json", "g.qcow2", cwd=tmp_path).stdout)["virtual-size"] == \
        (1 << 30) + MiB
    assert os.path.getsize(tmp_path / "g.raw") == 3 * MiB


def test_dirty_lazy_refcount_image_is_repaired_on_open(tmp_path: Path) -> None:
    """A lazy-refcounts image left dirty is repaired when emu-img opens it read/write (as QEMU)."""
    img = "lazy.qcow2"
    qemu("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M", cwd=tmp_path)
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 1M", "-c", "abort", img], cwd=tmp_path,
                   capture_output=True)
    assert qemu("check", img, cwd=tmp_path, rc=2).returncode == 2
    emu("snapshot", "-c", "after", img, cwd=tmp_path)
    clean_check(img, tmp_path)
    assert json.loads(qemu("info", "--output=json", img, cwd=tmp_path).stdout)["dirty-flag"] is False
    r = subprocess.run(["qemu-io", "-c", "read -P 0x33 0 1M", img], cwd=tmp_path, capture_output=True,
                       text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0

"""guest-images/diskwriter/build (run by scripts/build-guests) rebuilds the committed image."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from conftest import REPO, requires_nasm
from diskwriter_runner import IMAGE

requires_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None,
                                  reason="gcc/ld are not installed")
#: The tool versions that built the committed image (guest-images/diskwriter/build says so too).
BUILT_WITH = {"nasm": "2.16.01", "gcc": "12.2.0", "ld": "2.40"}


def _versions() -> dict[str, str]:
    out = {}
    for tool, flag in (("nasm", "-v"), ("gcc", "--version"), ("ld", "--version")):
        text = subprocess.run([tool, flag], capture_output=True, text=True).stdout
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text.splitlines()[0] if text else "")
        out[tool] = m.group(1) if m else "?"
    return out


@requires_nasm
@requires_gcc
def test_diskwriter_build_reproducible(tmp_path) -> None:
    proc = subprocess.run([str(REPO / "scripts" / "build-guests"), "--out", str(tmp_path), "diskwriter"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fresh = (tmp_path / "diskwriter" / "diskwriter.img").read_bytes()
    assert sorted(p.name for p in (tmp_path / "diskwriter").iterdir()) == ["diskwriter.img"]
    # Whatever the toolchain: a 64 KiB boot image whose payload sums to 0 and ends in the signature.
    assert len(fresh) == 65536 and fresh[510:512] == b"\x55\xaa" and fresh[0x180:0x188] == b"DWPARAMS"
    end = fresh.rindex(b"DWEND!!!") + 12
    sectors = (end - 512 + 511) // 512
    assert sectors <= 120
    assert sum(struct.unpack(f"<{sectors * 128}I", fresh[512:512 + sectors * 512])) % (1 << 32) == 0
    versions = _versions()
    if versions != BUILT_WITH:
        pytest.skip(f"toolchain {versions} differs from the one that built the image {BUILT_WITH}")
    assert fresh == IMAGE.read_bytes(), "diskwriter.img differs from what its sources build: run scripts/build-guests"

"""Hostile images: mutated headers, L1/L2 tables, refcount structures and snapshot tables must
give a clean result or a clean error from the checker (with and without repair), quickly."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io
from emu.block.qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckError, check_qcow2
from emu.errors import EmuError

pytestmark = [requires_qemu_img, requires_qemu_io]


@pytest.fixture(scope="module")
def seed_image(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("mut")
    img = d / "seed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 4M 16k", str(img)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", str(img)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 3 0 8k", str(img)], check=True, capture_output=True)
    raw = img.read_bytes()
    v = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
    regions = {"header": (0, 112), "l1": (v[8], 64), "reftable": (v[9], 64), "snaptable": (v[12], 64)}
    l2 = struct.unpack(">Q", raw[v[8]:v[8] + 8])[0] & 0x00FFFFFFFFFFFE00
    rb = struct.unpack(">Q", raw[v[9]:v[9] + 8])[0]
    regions["l2"] = (l2, 256)
    regions["refblock"] = (rb, 128)
    return img, regions


@pytest.mark.parametrize("region", ["header", "l1", "l2", "reftable", "refblock", "snaptable"])
def test_mutations_are_clean(seed_image, tmp_path: Path, region: str) -> None:
    seed, regions = seed_image
    start, length = regions[region]
    rnd = random.Random(region)
    for i in range(30):
        p = tmp_path / f"m{i}.qcow2"
        shutil.copy(seed, p)
        data = bytearray(p.read_bytes())
        for _ in range(rnd.randint(1, 4)):
            pos = start + rnd.randrange(length)
            if pos < len(data):
                data[pos] = rnd.randrange(256) if rnd.random() < 0.7 else 0xFF
        p.write_bytes(bytes(data))
        for fix in (0, FIX_LEAKS | FIX_ERRORS):
            t = time.monotonic()
            try:
                res = check_qcow2(str(p), fix, log=io.StringIO())
                assert res.check_errors >= 0
            except (CheckError, EmuError) as err:
                assert str(err) and "\n" not in str(err).strip() or "Could not open" in str(err)
            assert time.monotonic() - t < 2.0
            assert p.stat().st_size < 128 << 20  # repairs never blow the file up

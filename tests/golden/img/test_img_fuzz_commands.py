"""Every read-side subcommand on mutated qcow2 images (header, L1/L2, refcount structures,
snapshot table): an exit code and a message, never a traceback or a hang."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

sys.path.insert(0, str(Path(__file__).parent))
from img_inproc import run_emu  # noqa: E402

pytestmark = [requires_qemu_img, requires_qemu_io]

COMMANDS = (["info", "fz.qcow2"], ["info", "--output=json", "fz.qcow2"], ["map", "--output=json", "fz.qcow2"],
            ["convert", "-O", "raw", "fz.qcow2", "fz.raw"], ["snapshot", "-l", "fz.qcow2"],
            ["compare", "fz.qcow2", "seed.qcow2"], ["check", "fz.qcow2"])


def test_mutated_images_never_crash_emu_img(tmp_path: Path) -> None:
    seed = tmp_path / "seed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(seed), "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 4M 16k", str(seed)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", str(seed)], check=True)
    raw = seed.read_bytes()
    v = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
    l2 = struct.unpack(">Q", raw[v[8]:v[8] + 8])[0] & 0x00FFFFFFFFFFFE00
    rb = struct.unpack(">Q", raw[v[9]:v[9] + 8])[0]
    regions = [(0, 112), (v[8], 64), (v[9], 64), (v[12], 64), (l2, 256), (rb, 128)]
    rnd = random.Random(2026)
    for i in range(48):
        start, length = regions[i % len(regions)]
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 3)):
            data[start + rnd.randrange(length)] = rnd.randrange(256)
        (tmp_path / "fz.qcow2").write_bytes(bytes(data))
        for args in COMMANDS:
            t = time.monotonic()
            code, out, err = run_emu(args, tmp_path)  # an escaping exception fails the test
            assert time.monotonic() - t < 3.0, (i, args)
            assert code in (0, 1, 2, 3, 4, 63), (i, args, code)  # compare 4: read error; check 63: not qcow2
            failed = code in (2, 4) if args[0] == "compare" else code == 1  # compare: 1 = "differ"
            if failed:
                assert err.startswith("emu-img: ") and "Traceback" not in err, (i, args, err)

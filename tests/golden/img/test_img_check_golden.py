"""`emu-img check` against `qemu-img check` on clean, leaking and corrupted qcow2 images.

Both tools run on byte-identical copies; stdout, stderr (program name and file name
normalised) and the exit code must be equal, and after ``-r`` both repaired files must
check the same with qemu-img.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

sys.path.insert(0, str(Path(__file__).parent))
import img_corrupt  # noqa: E402
from img_inproc import run_emu  # noqa: E402

pytestmark = [requires_qemu_img, requires_qemu_io]

EMU_IMG = [sys.executable, "-m", "emu.img"]


def _run(tool: list[str], args: list[str], cwd: Path, name: str) -> tuple[int, str, str]:
    if tool[0] == "qemu-img":
        r = subprocess.run(tool + args + [name], capture_output=True, cwd=cwd, timeout=60)
        code, out, err = r.returncode, r.stdout.decode(), r.stderr.decode()
    else:
        code, out, err = run_emu(tool[len(EMU_IMG):] + args + [name], cwd)
    prog = "qemu-img" if tool[0] == "qemu-img" else "emu-img"
    norm = lambda s: s.replace(prog, "PROG").replace(name, "IMG")  # noqa: E731
    return code, norm(out), norm(err)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("check")
    for kind in img_corrupt.KINDS:
        img_corrupt.make(kind, d / f"{kind}.orig")
    return d


@pytest.mark.parametrize("kind", img_corrupt.KINDS)
@pytest.mark.parametrize("mode", [[], ["--output=json"], ["-r", "leaks"], ["-r", "all"]],
                         ids=["plain", "json", "r-leaks", "r-all"])
def test_check_matches_qemu_img(images: Path, kind: str, mode: list[str]) -> None:
    ours, theirs = images / f"{kind}-{len(mode)}{mode[-1:] and mode[-1][:3]}-emu", \
        images / f"{kind}-{len(mode)}{mode[-1:] and mode[-1][:3]}-qemu"
    shutil.copy(images / f"{kind}.orig", ours)
    shutil.copy(images / f"{kind}.orig", theirs)
    ref = _run(["qemu-img", "check"], mode, images, theirs.name)
    got = _run(EMU_IMG + ["check"], mode, images, ours.name)
    assert got == ref
    if mode and mode[0] == "-r":
        after_ref = _run(["qemu-img", "check"], [], images, theirs.name)
        after_got = _run(["qemu-img", "check"], [], images, ours.name)
        assert after_got == after_ref


def test_expected_exit_codes(images: Path) -> None:
    # The corpus really covers each qemu-img outcome: clean, leaks only, corruption.
    codes = {k: _run(EMU_IMG + ["check"], [], images, f"{k}.orig")[0] for k in img_corrupt.KINDS}
    assert codes["clean"] == 0 and codes["dirty"] == 0
    assert codes["leak"] == 3
    assert codes["refcount-low"] == 2 and codes["refcount-zero"] == 2 and codes["l2-outside"] == 2
    assert codes["copied-flag"] == 2


@pytest.mark.parametrize("args", [["check", "raw.img"], ["check", "nonexistent.qcow2"],
                                  ["check", "-r", "bogus", "clean.orig"], ["check"],
                                  ["check", "--output=xml", "clean.orig"], ["check", "-f", "vmdkx", "clean.orig"],
                                  ["check", "-f", "qcow2", "raw.img"], ["check", "--bogus", "clean.orig"],
                                  ["frob"], []])
def test_cli_errors_match(images: Path, args: list[str]) -> None:
    (images / "raw.img").write_bytes(bytes(4096))
    def run(tool):
        r = subprocess.run(tool + args, capture_output=True, text=True, cwd=images, timeout=60)
        return r.returncode, r.stdout, r.stderr.replace("qemu-img", "PROG").replace("emu-img", "PROG")
    assert run(EMU_IMG) == run(["qemu-img"])


@pytest.mark.parametrize("region", ["l1", "l2", "reftable", "refblock", "snaptable"])
def test_random_mutations_match_qemu_img(images: Path, region: str) -> None:
    """Random byte mutations of metadata: both checkers print and exit the same."""
    import random
    import struct
    seed = images / "mutseed.qcow2"
    if not seed.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(seed), "8M"],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 4M 16k", str(seed)],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s", str(seed)], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 3 0 8k", str(seed)], check=True, capture_output=True)
    raw = seed.read_bytes()
    v = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
    l2 = struct.unpack(">Q", raw[v[8]:v[8] + 8])[0] & 0x00FFFFFFFFFFFE00
    rb = struct.unpack(">Q", raw[v[9]:v[9] + 8])[0]
    start, length = {"l1": (v[8], 64), "l2": (l2, 256), "reftable": (v[9], 64), "refblock": (rb, 128),
                     "snaptable": (v[12], 64)}[region]
    rnd = random.Random(region)
    for i in range(4):
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 3)):
            data[start + rnd.randrange(length)] = rnd.randrange(256)
        (images / f"mut-{region}-{i}-q").write_bytes(data)
        (images / f"mut-{region}-{i}-e").write_bytes(data)
        ref = _run(["qemu-img", "check"], [], images, f"mut-{region}-{i}-q")
        got = _run(EMU_IMG + ["check"], [], images, f"mut-{region}-{i}-e")
        assert got == ref, f"mutation {i}"

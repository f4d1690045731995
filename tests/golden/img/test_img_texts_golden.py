"""Output texts and exit codes of every emu-img subcommand against qemu-img's (program name
normalised): each case runs both tools on identical copies of the same files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

EMU_IMG = [sys.executable, "-m", "emu.img"]

sys.path.insert(0, str(Path(__file__).parent))
from img_inproc import run_emu  # noqa: E402


def _prepare(d: Path) -> None:
    def q(*a):
        subprocess.run(list(a), cwd=d, check=True, capture_output=True)
    q("qemu-img", "create", "-f", "qcow2", "base.qcow2", "64M")
    q("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 8M 1M", "base.qcow2")
    q("qemu-img", "snapshot", "-c", "snap1", "base.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    q("qemu-io", "-c", "write -P 5 512k 1M", "ov.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1G")
    q("qemu-img", "create", "-f", "raw", "r.raw", "2M")
    q("qemu-io", "-f", "raw", "-c", "write -P 3 0 4k", "r.raw")
    q("qemu-img", "convert", "-c", "-O", "qcow2", "base.qcow2", "cc.qcow2")
    (d / "d1.raw").write_bytes(bytes(range(256)) * 4096)
    b = bytearray((d / "d1.raw").read_bytes())
    b[5000] ^= 0xFF
    (d / "d2.raw").write_bytes(bytes(b))
    (d / "five.raw").write_bytes(b"hello")  # not a whole sector: QEMU shows 512 bytes
    (d / "empty.raw").write_bytes(b"")


CASES = [
    # create
    "create -f qcow2 new.qcow2 64M", "create -f raw new.raw 1G", "create -f qcow2 -o compat=0.10 n2.qcow2 1G",
    "create -f qcow2 -o cluster_size=4k,lazy_refcounts=on,preallocation=metadata n3.qcow2 16M",
    "create -f qcow2 -b base.qcow2 -F qcow2 n4.qcow2", "create -f qcow2 -u -b nope -F qcow2 n5.qcow2 1G",
    "create -f qcow2 -b nope -F qcow2 n6.qcow2", "create -f qcow2 n7.qcow2", "create -f qcow2 n8.qcow2 12Q",
    "create -f qcow2 -o cluster_size=1234 n9.qcow2 1M", "create -f qcow2 -o foo=1 n9.qcow2 1M",
    "create -f qcow2 -o compat=0.10,lazy_refcounts=on n9.qcow2 1M", "create -q -f qcow2 n10.qcow2 1M",
    "create -f raw n11.raw 1.5M",
    # info
    "info base.qcow2", "info --output=json base.qcow2", "info --backing-chain ov.qcow2",
    "info --output=json --backing-chain ov.qcow2", "info v2.qcow2", "info --output=json v2.qcow2",
    "info r.raw", "info --output=json r.raw", "info -f qcow2 r.raw", "info nope", "info -U ov.qcow2",
    "info --output=xml base.qcow2",
    # snapshot
    "snapshot -l base.qcow2", "snapshot -l r.raw", "snapshot -d nope base.qcow2", "snapshot -a nope base.qcow2",
    "snapshot -l -c x base.qcow2", "snapshot base.qcow2",
    # map
    "map base.qcow2", "map --output=json base.qcow2", "map ov.qcow2", "map --output=json ov.qcow2",
    "map --output=json r.raw", "map r.raw", "map --output=json cc.qcow2",
    # compare
    "compare base.qcow2 base.qcow2", "compare base.qcow2 ov.qcow2", "compare d1.raw d2.raw",
    "compare -s base.qcow2 r.raw", "compare base.qcow2 r.raw", "compare -q d1.raw d2.raw",
    "compare nope d1.raw", "compare d1.raw", "compare -p cc.qcow2 base.qcow2",
    # convert
    "convert -O qcow2 base.qcow2 cv.qcow2", "convert -O bogus base.qcow2 x.qcow2", "convert -O qcow2 base.qcow2",
    "convert -c -O raw base.qcow2 z.raw", "convert -n -O qcow2 base.qcow2 nope2.qcow2",
    "convert -O qcow2 -o cluster_size=1234 d1.raw x.qcow2", "convert -S 1000 -O raw d1.raw y.raw",
    "convert -O qcow2 -o foo=1 d1.raw x.qcow2", "convert -O raw d1.raw /nonexistent/x.raw",
    "convert -S abc -O raw d1.raw y.raw", "convert -O qcow2 -c -o compat=0.10 base.qcow2 z.qcow2",
    "compare -s base.qcow2 base.qcow2", "compare -s -f raw -F raw d1.raw d2.raw",
    # resize / commit / rebase
    "resize base.qcow2 +10M", "resize base.qcow2 10M", "resize -f raw r.raw +1M", "resize base.qcow2 abc",
    "commit base.qcow2", "commit ov.qcow2", "rebase ov.qcow2", "rebase -u -b base.qcow2 -F qcow2 ov.qcow2",
    "rebase -p -b v2.qcow2 -F qcow2 ov.qcow2", "rebase -b nope -F qcow2 ov.qcow2", "rebase -b v2.qcow2 ov.qcow2",
    "rebase -u -b v2.qcow2 ov.qcow2", "commit -b nope ov.qcow2",
    # raw images that are not whole sectors, and empty ones
    "info five.raw", "map --output=json five.raw", "map --output=json empty.raw", "info --output=json empty.raw",
    "convert -O qcow2 five.raw f.qcow2", "compare five.raw d1.raw",
    # general
    "frob", "", "check -r bogus base.qcow2",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    ref = tmp_path_factory.mktemp("ref")
    _prepare(ref)
    return ref, tmp_path_factory.mktemp("ours")


@pytest.mark.parametrize("case", CASES)
def test_text_matches(dirs: tuple[Path, Path], case: str) -> None:
    ref, ours = dirs
    args = case.split()
    results = []
    for name in ("qemu-img", "emu-img"):
        d = ours / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(ref, d)
        if name == "qemu-img":
            # Bytes, not text mode: text mode would turn the progress lines' \r into \n.
            r = subprocess.run(["qemu-img"] + args, capture_output=True, cwd=d, timeout=120)
            code, out, err = r.returncode, r.stdout.decode(), r.stderr.decode()
        else:
            code, out, err = run_emu(args, d)
        results.append((code, out.replace(name, "PROG"), err.replace(name, "PROG")))
    assert results[1] == results[0]


def test_locked_image_is_refused_like_qemu_img(tmp_path: Path) -> None:
    """While another process holds the image for writing, both tools refuse the same way; -U reads."""
    img = tmp_path / "held.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 60000", str(img)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        import time
        time.sleep(0.5)
        for args in (["check", "held.qcow2"], ["info", "held.qcow2"], ["check", "-U", "held.qcow2"],
                     ["info", "-U", "held.qcow2"], ["snapshot", "-c", "s", "held.qcow2"]):
            res = []
            for tool, name in ((["qemu-img"], "qemu-img"), (EMU_IMG, "emu-img")):
                r = subprocess.run(tool + args, capture_output=True, text=True, cwd=tmp_path, timeout=60)
                res.append((r.returncode, r.stdout, r.stderr.replace(name, "PROG")))
            assert res[1] == res[0], args
    finally:
        holder.kill()
        holder.wait()

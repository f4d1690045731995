"""RBD interop: what emu writes on RBD, qemu-img/qemu-io and ``rbd export`` read back
identically, and the other way round; emu-img's output on ``rbd:`` equals qemu-img's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, requires_qemu_img, requires_qemu_io

sys.path.insert(0, str(REPO / "tests" / "unit" / "rbd"))
import rbd_ceph_cluster  # noqa: E402

from emu.block.drivers import rbd  # noqa: E402
from emu.block.node import BlockGraph  # noqa: E402

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()
MiB = 1 << 20


def _qemu_has_rbd() -> bool:
    try:
        out = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return False
    return " rbd" in out


pytestmark = [requires_qemu_img, requires_qemu_io,
              pytest.mark.skipif(not _qemu_has_rbd(), reason="qemu-img has no rbd driver (qemu-block-extra)")]


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    # emu-img from this interpreter (the venv's bin need not be on PATH).
    argv = [sys.executable, "-m", "emu.img", *cmd[1:]] if cmd[0] == "emu-img" else list(cmd)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


def _clean(text: str, prog: str) -> str:
    # librbd logs its own lines on stderr (timestamps, thread ids): not part of the tool's output.
    lines = [ln for ln in text.splitlines() if not re.match(r"^\d{4}-\d\d-\d\dT", ln) and ln.strip()]
    return "\n".join(ln.replace(prog + ":", "PROG:") for ln in lines)


def _name() -> str:
    return "g" + uuid.uuid4().hex[:10]


def export(conf: str, spec: str) -> bytes:
    return subprocess.run(["rbd", "-c", conf, "export", spec, "-"], capture_output=True, check=True,
                          timeout=120).stdout


def test_emu_written_image_and_snapshot_read_by_qemu_and_rbd(ceph_conf, tmp_path):
    name = _name()
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    run("emu-img", "create", "-f", "raw", fn, "8M")
    g = BlockGraph()
    bs = rbd.open_image(g, fn)
    bs.write(0, b"\x11" * MiB)
    bs.write(5 * MiB, b"\x22" * 4096)
    g.close_all()
    run("emu-img", "snapshot", "-c", "s1", fn)
    g = BlockGraph()
    bs = rbd.open_image(g, fn)
    bs.write(0, b"\x33" * 4096)
    g.close_all()
    # qemu-io reads both states; qemu-img lists the snapshot; rbd export agrees byte for byte.
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 5M 4k",
            f"rbd:rbd/{name}@s1:conf={ceph_conf}")
    assert "Pattern verification failed" not in r.stdout
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 4k", "-c", "read -P 0x11 4k 1020k", fn)
    assert "Pattern verification failed" not in r.stdout
    assert "s1" in run("qemu-img", "snapshot", "-l", fn).stdout
    head, snap = export(ceph_conf, f"rbd/{name}"), export(ceph_conf, f"rbd/{name}@s1")
    g = BlockGraph()
    bs = rbd.open_image(g, fn, read_only=True)
    assert bs.read(0, 8 * MiB) == head
    sn = rbd.open_image(g, f"rbd:rbd/{name}@s1:conf={ceph_conf}")
    assert sn.read_only and sn.read(0, 8 * MiB) == snap
    g.close_all()
    # emu-img -a reverts; qemu-io sees the snapshot's data again.
    run("emu-img", "snapshot", "-a", "s1", fn)
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 1M", fn)
    assert "Pattern verification failed" not in r.stdout
    run("emu-img", "snapshot", "-d", "s1", fn)
    assert "s1" not in run("qemu-img", "snapshot", "-l", fn).stdout


def test_qemu_written_image_read_by_emu(ceph_conf):
    name = _name()
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    run("qemu-img", "create", "-f", "raw", fn, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 128k", fn)
    run("qemu-img", "snapshot", "-c", "q1", fn)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 64k 4k", fn)
    g = BlockGraph()
    sn = rbd.open_image(g, f"rbd:rbd/{name}@q1:conf={ceph_conf}")
    assert sn.read(64 * 1024, 128 * 1024) == b"\x5a" * 128 * 1024
    assert sn.read(0, 4 * MiB) == export(ceph_conf, f"rbd/{name}@q1")
    bs = rbd.open_image(g, fn, read_only=True)
    assert bs.read(64 * 1024, 4096) == b"\x6b" * 4096
    assert [s["name"] for s in rbd.snapshot_node(bs).snapshot_list()] == ["q1"]
    g.close_all()


def test_convert_and_compare_both_ways(ceph_conf, tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(3 * MiB)
    data[0:4096] = b"\x77" * 4096
    data[2 * MiB:2 * MiB + 100] = os.urandom(100)
    src.write_bytes(bytes(data))
    name = _name()
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    run("emu-img", "convert", "-f", "raw", "-O", "raw", str(src), fn)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), fn)
    run("emu-img", "compare", "-f", "raw", "-F", "raw", str(src), fn)
    back = tmp_path / "back.raw"
    run("emu-img", "convert", "-f", "raw", "-O", "raw", fn, str(back))
    assert back.read_bytes() == bytes(data)
    qsrc = tmp_path / "q.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qsrc))
    name2 = _name()
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qsrc), f"rbd:rbd/{name2}:conf={ceph_conf}")
    r = run("emu-img", "compare", "-f", "qcow2", "-F", "raw", str(qsrc),
            f"rbd:rbd/{name2}:conf={ceph_conf}")
    assert "Images are identical." in r.stdout
    # A differing byte is found at the same offset as qemu-img finds it.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x01 1M 512", f"rbd:rbd/{name2}:conf={ceph_conf}")
    e = run("emu-img", "compare", "-f", "raw", "-F", "raw", str(src), f"rbd:rbd/{name2}:conf={ceph_conf}", ok=False)
    q = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), f"rbd:rbd/{name2}:conf={ceph_conf}", ok=False)
    assert (e.returncode, e.stdout) == (q.returncode, q.stdout) == (1, q.stdout)


@pytest.fixture(scope="module")
def shared_image(ceph_conf):
    name = "cmp" + uuid.uuid4().hex[:8]
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    run("qemu-img", "create", "-f", "raw", fn, "4M")
    run("qemu-img", "snapshot", "-c", "s1", fn)
    return name


@pytest.mark.parametrize("args", [
    ["info", "{fn}"], ["info", "--output=json", "{fn}"], ["snapshot", "-l", "{fn}"],
    ["info", "rbd:rbd/nope:conf={conf}"], ["info", "rbd:nopool/x:conf={conf}"],
    ["info", "rbd:rbd/x:conf=/nonexistent.conf"], ["info", "rbd:rbd/x:foo"],
    ["snapshot", "-c", "s1", "{fn}"], ["create", "-f", "raw", "{fn}", "1M"],
    ["info", "rbd:rbd/{name}@nosnap:conf={conf}"], ["info", "rbd:rbd/{name}@s1:conf={conf}"],
    ["resize", "-f", "raw", "{fn}", "8M"], ["resize", "-f", "raw", "rbd:rbd/{name}@s1:conf={conf}", "8M"],
    ["snapshot", "-d", "nosnap", "{fn}"],
    # -f rbd: the protocol node is the image; QEMU 7.2's format-specific {"type": "rbd"}
    ["info", "-f", "rbd", "{fn}"], ["info", "--output=json", "-f", "rbd", "{fn}"],
    ["info", "-f", "rbd", "rbd:rbd/{name}@s1:conf={conf}"],
])
def test_emu_img_output_matches_qemu_img(ceph_conf, shared_image, args):
    # One image with snapshot s1 for every case: each case runs qemu-img first, then emu-img
    # on the same state (a resize leaves both at the same size).
    name = shared_image
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    argv = [a.format(fn=fn, conf=ceph_conf, name=name) for a in args]
    q = run("qemu-img", *argv, ok=False)
    e = run("emu-img", *argv, ok=False)
    assert e.returncode == q.returncode
    assert _clean(e.stdout, "emu-img") == _clean(q.stdout, "qemu-img")
    assert _clean(e.stderr, "emu-img") == _clean(q.stderr, "qemu-img")


def test_snapshot_apply_missing_same_error(ceph_conf):
    # qemu-img prints its probe warning twice on -a (its snapshot fallback reopens the rbd
    # child); the error line itself must be the same.
    name = "ap" + uuid.uuid4().hex[:8]
    fn = f"rbd:rbd/{name}:conf={ceph_conf}"
    run("qemu-img", "create", "-f", "raw", fn, "1M")
    q = run("qemu-img", "snapshot", "-a", "nosnap", fn, ok=False)
    e = run("emu-img", "snapshot", "-a", "nosnap", fn, ok=False)
    assert e.returncode == q.returncode == 1
    assert _clean(e.stderr, "emu-img").splitlines()[-1] == _clean(q.stderr, "qemu-img").splitlines()[-1]


def test_namespace_user_and_conf_options_as_qemu(ceph_conf):
    ns, name = "ns" + uuid.uuid4().hex[:6], "img"
    run("rbd", "-c", ceph_conf, "namespace", "create", f"rbd/{ns}")
    run("rbd", "-c", ceph_conf, "create", "--size", "1M", f"rbd/{ns}/{name}")
    for fn in (f"rbd:rbd/{ns}/{name}:conf={ceph_conf}:id=admin:rbd_cache=false",
               f"rbd:rbd/{ns}/{name}:conf={ceph_conf}:bogus_opt=1"):
        q = run("qemu-img", "info", fn, ok=False)
        e = run("emu-img", "info", fn, ok=False)
        assert (e.returncode, _clean(e.stdout, "emu-img"), _clean(e.stderr, "emu-img")) == \
            (q.returncode, _clean(q.stdout, "qemu-img"), _clean(q.stderr, "qemu-img"))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", f"rbd:rbd/{ns}/{name}:conf={ceph_conf}")
    g = BlockGraph()
    bs = rbd.open_image(g, f"rbd:rbd/{ns}/{name}:conf={ceph_conf}:id=admin", read_only=True)
    assert bs.read(0, 4096) == b"\x42" * 4096
    g.close_all()


def test_luks_header_reported_as_qemu_does(ceph_conf, tmp_path):
    # QEMU probes an rbd image's first bytes for a LUKS/LUKS2 header (encryption-format).
    for version, name in ((1, "lk1" + uuid.uuid4().hex[:6]), (2, "lk2" + uuid.uuid4().hex[:6])):
        src = tmp_path / f"{name}.raw"
        src.write_bytes(b"LUKS\xba\xbe" + version.to_bytes(2, "big") + bytes(65536 - 8))
        run("rbd", "-c", ceph_conf, "import", str(src), f"rbd/{name}")
        fn = f"rbd:rbd/{name}:conf={ceph_conf}"
        for argv in (["info", "-f", "rbd", fn], ["info", "--output=json", "-f", "rbd", fn]):
            q, e = run("qemu-img", *argv), run("emu-img", *argv)
            assert _clean(e.stdout, "emu-img") == _clean(q.stdout, "qemu-img")
        assert f'"encryption-format": "luks{"2" if version == 2 else ""}"' in e.stdout

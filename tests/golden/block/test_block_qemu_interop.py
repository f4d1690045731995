"""Interop with QEMU's own tools: images emu writes pass qemu-img check/compare, images
qemu-img/qemu-io write read back identical through emu, snapshots and locks are shared."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest
from conftest import requires_qemu_img, requires_qemu_io

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.block.overlay import commit, create_overlay, rebase
from emu.block.qcow2.create import create_qcow2
from emu.errors import ImageOpenError

pytestmark = requires_qemu_img


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stdout} {r.stderr}")
    return r


def qcheck(path: str) -> None:
    r = run("qemu-img", "check", "--output=json", path, check=False)
    res = json.loads(r.stdout)
    assert r.returncode == 0 and not res.get("corruptions") and not res.get("leaks"), r.stdout + r.stderr


def emu_read_all(path: str, fmt: str | None = None) -> bytes:
    g = BlockGraph()
    try:
        bs = g.open_image(path, fmt, read_only=True)
        return bs.read(0, bs.size)
    finally:
        g.close_all()


def qemu_raw(path: str, out: str, *extra: str) -> bytes:
    run("qemu-img", "convert", *extra, "-O", "raw", path, out)
    with open(out, "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("opts", [
    {}, {"compat": "0.10"}, {"cluster_size": 4096}, {"cluster_size": 512}, {"cluster_size": 2 << 20},
    {"lazy_refcounts": True}, {"refcount_bits": 1}, {"refcount_bits": 64}, {"preallocation": "metadata"},
])
def test_create_is_byte_identical(tmp_path, opts):
    ours, theirs = str(tmp_path / "e.qcow2"), str(tmp_path / "q.qcow2")
    create_qcow2(ours, 1 << 30 if opts.get("preallocation") is None else 64 << 20, **opts)
    qopts = ",".join(f"{k}={'on' if v is True else v}" for k, v in opts.items())
    run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", qopts] if qopts else []), theirs,
        "1G" if opts.get("preallocation") is None else "64M")
    assert open(ours, "rb").read() == open(theirs, "rb").read()


def test_create_with_backing_matches_qemu(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    ours, theirs = str(tmp_path / "e.qcow2"), str(tmp_path / "q.qcow2")
    create_qcow2(ours, None, backing_file="base.raw", backing_fmt="raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", theirs)
    assert open(ours, "rb").read() == open(theirs, "rb").read()


@pytest.mark.parametrize("cs,compat", [(4096, "1.1"), (65536, "0.10"), (65536, "1.1"), (2 << 20, "1.1")])
def test_emu_written_image_passes_check_and_compare(tmp_path, cs, compat):
    size = 16 << 20
    p, raw = str(tmp_path / "t.qcow2"), str(tmp_path / "t.raw")
    create_qcow2(p, size, cluster_size=cs, compat=compat)
    rnd = random.Random(cs)
    ref = bytearray(size)
    g = BlockGraph()
    bs = g.open_image(p)
    for i in range(40):
        off = rnd.randrange(size)
        ln = min(rnd.randrange(1, 400000), size - off)
        if i % 5 == 0:
            bs.write_zeroes(off, ln)
            ref[off:off + ln] = bytes(ln)
        else:
            d = rnd.randbytes(ln)
            bs.write(off, d)
            ref[off:off + ln] = d
    g.close_all()
    with open(raw, "wb") as fh:
        fh.write(ref)
    qcheck(p)
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", p, raw).returncode == 0


def test_emu_compressed_image_reads_in_qemu(tmp_path):
    p, raw = str(tmp_path / "c.qcow2"), str(tmp_path / "c.raw")
    create_qcow2(p, 1 << 20)
    g = BlockGraph()
    bs = g.open_image(p)
    data = (b"emu compresses like qemu " * 50000)[: 1 << 20]
    for off in range(0, 1 << 20, 65536):
        bs.impl.write_compressed(off, data[off:off + 65536])
    g.close_all()
    qcheck(p)
    assert qemu_raw(p, raw) == data
    assert os.path.getsize(p) < 5 * 65536 + 65536  # metadata clusters + a few KiB of data


@pytest.mark.parametrize("create_opts", ["compat=0.10", "compat=1.1", "cluster_size=4096", "cluster_size=2M"])
def test_qemu_written_images_read_identical(tmp_path, create_opts):
    p, raw = str(tmp_path / "q.qcow2"), str(tmp_path / "q.raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, p, "8M")
    cmds = ["write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -P 0x33 7M 4k", "write -z 3200k 256k",
            "discard 7M 64k"]
    run("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in cmds), []), p)
    assert emu_read_all(p) == qemu_raw(p, raw)


@requires_qemu_io
def test_qemu_zero_clusters_and_compressed_convert(tmp_path):
    src, p, raw = str(tmp_path / "s.raw"), str(tmp_path / "c.qcow2"), str(tmp_path / "o.raw")
    rnd = random.Random(3)
    with open(src, "wb") as fh:
        fh.write((b"text " * 420000)[:2 << 20] + rnd.randbytes(1 << 20) + bytes(1 << 20))
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, p)
    assert emu_read_all(p) == open(src, "rb").read()
    run("qemu-io", "-c", "write -z 0 128k", "-c", "write -z -u 2M 64k", p)
    data = emu_read_all(p)
    assert data == qemu_raw(p, raw) and data[:131072] == bytes(131072)


def test_qemu_backing_chain_reads_through_emu(tmp_path):
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-io", "-c", "write -P 1 0 4M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-c", "write -P 2 1M 1M", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-c", "write -P 3 1536k 10k", "-c", "write -z 0 64k", top)
    assert emu_read_all(top) == qemu_raw(top, str(tmp_path / "o.raw"))


def test_snapshots_interop_both_ways(tmp_path):
    p = str(tmp_path / "s.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
    run("qemu-io", "-c", "write -P 5 0 1M", p)
    run("qemu-img", "snapshot", "-c", "qemu-snap", p)
    run("qemu-io", "-c", "write -P 6 0 512k", p)
    g = BlockGraph()
    bs = g.open_image(p)
    assert [s["name"] for s in bs.snapshot_list()] == ["qemu-snap"]
    bs.snapshot_create("emu-snap", vm_clock_ns=3_000_000_000)
    bs.write(0, b"\x07" * 4096)
    bs.snapshot_goto("qemu-snap")
    assert bs.read(0, 1 << 20) == b"\x05" * (1 << 20)
    bs.snapshot_delete(name="qemu-snap")
    bs.snapshot_create("again")
    ours = bs.image_info()
    g.close_all()
    qcheck(p)
    info = json.loads(run("qemu-img", "info", "--output=json", p).stdout)
    assert [(s["id"], s["name"]) for s in info["snapshots"]] == [("2", "emu-snap"), ("3", "again")]
    assert [(s["id"], s["name"]) for s in ours["snapshots"]] == [("2", "emu-snap"), ("3", "again")]
    assert info["snapshots"][0]["vm-clock-sec"] == 3
    for k in ("virtual-size", "format", "cluster-size", "dirty-flag"):
        assert ours[k] == info[k]
    assert ours["format-specific"] == info["format-specific"]
    snap = qemu_raw(p, str(tmp_path / "o.raw"), "-l", "snapshot.name=emu-snap")
    assert snap[:512 << 10] == b"\x06" * (512 << 10) and snap[512 << 10:1 << 20] == b"\x05" * (512 << 10)
    run("qemu-img", "snapshot", "-d", "emu-snap", p)
    qcheck(p)


def test_overlay_rebase_commit_pass_check(tmp_path):
    base = str(tmp_path / "base.qcow2")
    create_qcow2(base, 2 << 20)
    g = BlockGraph()
    b = g.open_image(base)
    b.write(0, b"\x01" * (2 << 20))
    top = create_overlay(g, b, str(tmp_path / "top.qcow2"), node_name="top")
    top.write(65536, b"\x02" * 65536)
    assert top.read(0, 3 * 65536) == b"\x01" * 65536 + b"\x02" * 65536 + b"\x01" * 65536
    assert commit(top, b) == 65536
    assert b.read(65536, 65536) == b"\x02" * 65536
    rebase(top, None)  # copies the backing data in: top stands alone
    assert top.backing is None and top.read(0, 2 << 20) == b.read(0, 2 << 20)
    g.close_all()
    qcheck(base)
    qcheck(str(tmp_path / "top.qcow2"))
    info = json.loads(run("qemu-img", "info", "--output=json", str(tmp_path / "top.qcow2")).stdout)
    assert "backing-filename" not in info


@requires_qemu_io
def test_locks_are_seen_by_qemu_and_emu(tmp_path):
    p = str(tmp_path / "l.qcow2")
    create_qcow2(p, 1 << 20)
    proc = subprocess.Popen(["qemu-io", "-c", "sleep 5000", p], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.8)
        g = BlockGraph()
        with pytest.raises(ImageOpenError, match='Failed to get "write" lock'):
            g.open_image(p)
        g.open_image(p, read_only=True, force_share=True)
        g.close_all()
    finally:
        proc.kill()
        proc.wait()
    g = BlockGraph()
    g.open_image(p)
    try:
        r = run("qemu-img", "info", p, check=False)
        assert r.returncode == 1 and 'Failed to get shared "write" lock' in r.stderr
        assert run("qemu-img", "info", "-U", p).returncode == 0
    finally:
        g.close_all()


def test_drain_makes_completed_writes_visible_to_qemu(tmp_path):
    p, raw = str(tmp_path / "d.qcow2"), str(tmp_path / "ref.raw")
    create_qcow2(p, 8 << 20, cluster_size=65536)
    g = BlockGraph()
    blk = BlockBackend(g.open_image(p), "drive0")
    rnd = random.Random(9)
    ref = bytearray(8 << 20)
    done = []
    for i in range(64):
        off = rnd.randrange(0, 8 << 20, 512)
        d = rnd.randbytes(min(70000, (8 << 20) - off))
        blk.aio_write(off, d, done.append)
        ref[off:off + len(d)] = d
        blk.drain()  # writes complete in submission order across the drain
        blk.resume()
    blk.drain()
    with open(raw, "wb") as fh:
        fh.write(ref)
    try:
        r = run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", p, raw, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(done) == 64 and all(x is None for x in done)
    finally:
        blk.resume()
        blk.close()
        g.close_all()

"""Reading internal snapshots and active layers; damaged metadata is a clear error, never a crash."""

from __future__ import annotations

import random
import subprocess

import pytest

from conftest import requires_qemu_img, requires_qemu_io
from emu.oracle.images import ImageReadError, read_region, snapshot_names


@requires_qemu_img
@requires_qemu_io
def test_oracle_images_snapshot_backing_and_zero_clusters(tmp_path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 16k", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x22 4096 4096", "-c", "write -z 8192 4096", str(top)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(top)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 16k", str(top)], check=True, capture_output=True)
    snap = read_region(top, 0, 32, snapshot="s1")   # 16 KiB
    assert snap[:4096] == b"\x11" * 4096          # unallocated: from the backing file
    assert snap[4096:8192] == b"\x22" * 4096
    assert snap[8192:12288] == bytes(4096)        # zero cluster
    assert snap[12288:] == b"\x11" * 4096
    assert read_region(top, 0, 32) == b"\x33" * 16384
    assert read_region(top, 2048, 4) == bytes(2048)   # past the end reads as zeros
    assert snapshot_names(top) == ["s1"]
    with pytest.raises(ImageReadError, match="no snapshot named 'x' \\(snapshots: s1\\)"):
        read_region(top, 0, 1, snapshot="x")


@requires_qemu_img
def test_oracle_images_damaged_metadata_never_crashes(tmp_path) -> None:
    good = tmp_path / "good.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(good), "1M"], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", str(good)], check=True)
    data = good.read_bytes()
    rng = random.Random(5)
    bad = tmp_path / "bad.qcow2"
    outcomes = set()
    for i in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(buf), 5 * 4096)) if i % 2 else rng.randrange(0, 120)
            buf[pos] = rng.randrange(256)
        bad.write_bytes(bytes(buf))
        try:
            read_region(bad, 0, 16, snapshot="s")
            outcomes.add("read")
        except ImageReadError as err:
            assert str(err).startswith(str(bad))
            outcomes.add("error")
    assert outcomes == {"read", "error"}
    with pytest.raises(ImageReadError, match="No such file"):
        read_region(tmp_path / "none.qcow2", 0, 1, snapshot="s")
    with pytest.raises(ImageReadError, match="bad region"):
        read_region(good, -1, 1)

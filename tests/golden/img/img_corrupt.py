"""Build leaking / corrupted qcow2 images with qemu-img + direct byte edits (helpers for the golden tests)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def u64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def put(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        h = f.read(104)
    v = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
    return {"cluster_bits": v[4], "l1_size": v[7], "l1_off": v[8], "rt_off": v[9], "snap_off": v[12]}


def base_image(path: Path, snapshot: bool = False) -> None:
    """A 16 MiB qcow2 with a few data clusters (and optionally a snapshot sharing them)."""
    run("qemu-img", "create", "-f", "qcow2", str(path), "16M")
    run("qemu-io", "-c", "write -P 0x11 0 192k", "-c", "write -P 0x22 4M 64k", str(path))
    if snapshot:
        run("qemu-img", "snapshot", "-c", "s1", str(path))


def refblock_off(path: Path) -> int:
    return u64(path, header(path)["rt_off"]) & ~0x1FF


def set_refcount(path: Path, cluster: int, value: int) -> None:
    put(path, refblock_off(path) + 2 * cluster, struct.pack(">H", value))


def l2_off(path: Path) -> int:
    return u64(path, header(path)["l1_off"]) & 0x00FFFFFFFFFFFE00


def make(kind: str, path: Path) -> None:
    """Create the image ``kind`` at ``path``."""
    if kind == "clean":
        base_image(path)
    elif kind == "leak":
        base_image(path)
        # Two leaked clusters past the used ones.
        with open(path, "r+b") as f:
            f.seek(0, 2)
            end = f.tell()
            f.write(bytes(2 * 65536))
        c = (end + 65535) // 65536
        set_refcount(path, c, 1)
        set_refcount(path, c + 1, 1)
    elif kind == "refcount-high":
        base_image(path)
        data = u64(path, l2_off(path)) & 0x00FFFFFFFFFFFE00
        set_refcount(path, data >> 16, 2)  # a leak on a used cluster + OFLAG_COPIED wrong
    elif kind == "refcount-low":
        base_image(path, snapshot=True)
        data = u64(path, l2_off(path)) & 0x00FFFFFFFFFFFE00
        set_refcount(path, data >> 16, 1)  # shared with the snapshot: must be 2
    elif kind == "refcount-zero":
        base_image(path)
        data = u64(path, l2_off(path)) & 0x00FFFFFFFFFFFE00
        set_refcount(path, data >> 16, 0)  # needs a rebuild
    elif kind == "copied-flag":
        base_image(path)
        e = u64(path, l2_off(path))
        put(path, l2_off(path), struct.pack(">Q", e & ~(1 << 63)))
    elif kind == "l2-outside":
        base_image(path)
        put(path, l2_off(path) + 8 * 100, struct.pack(">Q", (1 << 63) | (1 << 40)))
    elif kind == "l2-into-header":
        base_image(path)
        put(path, l2_off(path) + 8 * 100, struct.pack(">Q", (1 << 63) | 0))
        # offset 0 with no flags is "unallocated"; point at the L1 table's cluster instead
        put(path, l2_off(path) + 8 * 100, struct.pack(">Q", (1 << 63) | header(path)["l1_off"]))
    elif kind == "l2-unaligned":
        base_image(path)
        put(path, l2_off(path) + 8 * 101, struct.pack(">Q", (1 << 63) | 0x30200))
    elif kind == "dirty":
        base_image(path)
        put(path, 72, struct.pack(">Q", 1))
    elif kind == "lazy-dirty":
        # A lazy-refcounts writer killed mid-run: dirty bit set, refcounts never written.
        run("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "16M")
        run("qemu-io", "-c", "write -P 0x33 0 1M", "-c", "abort", str(path))
    else:
        raise ValueError(kind)


KINDS = ["clean", "leak", "refcount-high", "refcount-low", "refcount-zero", "copied-flag",
         "l2-outside", "l2-into-header", "l2-unaligned", "dirty", "lazy-dirty"]

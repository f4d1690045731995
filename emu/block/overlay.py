"""External overlays, rebase and commit: the library behind QMP's blockdev-snapshot*,
block-commit and ``emu-img create -b`` / ``rebase`` / ``commit``.

All functions work on open nodes of one :class:`~emu.block.node.BlockGraph`; callers that
have a running guest drain the BlockBackend around them.
"""

from __future__ import annotations

import os
from typing import Callable

from emu.block.node import BlockDriverState, BlockGraph
from emu.errors import BlockError

#: Bytes copied per step by rebase/commit.
COPY_CHUNK = 1 << 20
#: block_status kinds meaning "not allocated in this node" (the second: and no backing file).
UNALLOCATED_KINDS = ("unallocated", "zero-unallocated")


def create_overlay(graph: BlockGraph, base: BlockDriverState, filename: str, *, fmt: str = "qcow2",
                   node_name: str | None = None, existing: bool = False,
                   backing_file: str | None = None, cluster_size: int = 65536) -> BlockDriverState:
    """Put a new qcow2 overlay on top of ``base`` and return its node (opened read-write).

    :param filename: the overlay file; created unless ``existing`` (QMP ``mode: existing``).
    :param backing_file: name recorded in the overlay (default: ``base.filename``).
    :raises BlockError: unsupported format, or the existing file cannot be used.
    """
    if fmt != "qcow2":
        raise BlockError(f"Format '{fmt}' does not support backing files")
    if not existing:
        from emu.block.qcow2.create import create_qcow2
        create_qcow2(filename, base.size, cluster_size=cluster_size,
                     backing_file=backing_file or base.filename, backing_fmt=base.drv)
    elif not os.path.exists(filename):
        raise BlockError(f"Could not open '{filename}': No such file or directory")
    return graph.open_image(filename, fmt, node_name=node_name, backing=base)


def set_backing(bs: BlockDriverState, new_backing: BlockDriverState | None,
                backing_file: str | None = None, backing_fmt: str | None = None) -> None:
    """Re-point ``bs`` at ``new_backing`` (node) and record its name in the image header.

    This is ``rebase -u``: no data is copied.
    """
    impl = bs.impl
    if not impl.supports_backing:
        raise BlockError(f"Driver '{bs.drv}' does not support backing files")
    if new_backing is not None and new_backing in _above(bs):
        raise BlockError("Making this node its own backing file would create a loop")
    name = backing_file if backing_file is not None else (new_backing.filename if new_backing else None)
    fmt = backing_fmt if backing_fmt is not None else (new_backing.drv if new_backing else None)
    with bs.lock:
        impl.set_backing(name, fmt if name else None)
        old = bs.backing
        bs.backing = new_backing
        if new_backing is not None:
            new_backing.parents += 1
        if old is not None:
            old.parents -= 1
            if old.parents <= 0 and old.auto and old in bs.graph._nodes:
                bs.graph.remove(old)


def _above(bs: BlockDriverState) -> list[BlockDriverState]:
    # Nodes of the graph that have bs in their backing chain (bs included).
    return [n for n in bs.graph.nodes() if bs in n.backing_chain()]


def is_allocated_above(top: BlockDriverState, base: BlockDriverState | None, offset: int,
                       length: int) -> tuple[bool, int]:
    """Whether ``[offset, offset+n)`` is allocated in ``top`` or any node above ``base``.

    :returns: ``(allocated, n)`` for the first ``n`` bytes with the same answer.
    """
    node = top
    n = length
    while node is not None and node is not base:
        if offset >= node.size:
            node = node.backing
            continue
        kind, cnt, _ = node.block_status(offset, min(n, node.size - offset))
        if kind not in UNALLOCATED_KINDS:
            return True, max(1, min(n, cnt))
        n = max(1, min(n, cnt))
        node = node.backing
    return False, n


def rebase(bs: BlockDriverState, new_backing: BlockDriverState | None, *,
           backing_file: str | None = None, backing_fmt: str | None = None,
           progress: Callable[[float], None] | None = None) -> None:
    """Safe rebase: copy into ``bs`` whatever reads differently through the new backing,
    then point ``bs`` at it (``qemu-img rebase -b``)."""
    size = bs.size
    old = bs.backing
    off = 0
    while off < size:
        n = min(COPY_CHUNK, size - off)
        kind, cnt, _ = bs.block_status(off, n)
        cnt = max(1, min(n, cnt))
        if kind in UNALLOCATED_KINDS:
            a = _read_node(old, off, cnt)
            b = _read_node(new_backing, off, cnt)
            if a != b:
                _write_differences(bs, off, a, b)
        off += cnt
        if progress:
            progress(100.0 * off / size)
    set_backing(bs, new_backing, backing_file, backing_fmt)
    bs.flush()


def _read_node(node: BlockDriverState | None, offset: int, length: int) -> bytes:
    if node is None or offset >= node.size:
        return bytes(length)
    n = min(length, node.size - offset)
    return node.read(offset, n) + bytes(length - n)


def _write_differences(bs: BlockDriverState, offset: int, old: bytes, new: bytes, gran: int = 512) -> None:
    i = 0
    while i < len(old):
        if old[i:i + gran] == new[i:i + gran]:
            i += gran
            continue
        j = i + gran
        while j < len(old) and old[j:j + gran] != new[j:j + gran]:
            j += gran
        bs.write(offset + i, old[i:j])
        i = j


def commit(top: BlockDriverState, base: BlockDriverState | None = None, *,
           progress: Callable[[float], None] | None = None) -> int:
    """Copy everything allocated in ``top`` and the nodes between it and ``base`` into
    ``base`` (default: ``top.backing``).  Returns the bytes copied.

    ``base`` must be writable (open it read-write, or reopen it).  The caller decides what
    happens to ``top`` afterwards (emptying it, or dropping the intermediate nodes with
    :func:`drop_intermediate`).
    """
    if base is None:
        base = top.backing
    if base is None:
        raise BlockError(f"Block node '{top.node_name}' has no backing file")
    if base not in top.backing_chain():
        raise BlockError(f"'{base.node_name}' is not in the backing chain of '{top.node_name}'")
    if base.read_only:
        raise BlockError(f"Block node '{base.node_name}' is read-only")
    size = top.size
    if base.size < size:
        base.truncate(size)
    copied = 0
    off = 0
    while off < size:
        n = min(COPY_CHUNK, size - off)
        alloc, cnt = is_allocated_above(top, base, off, n)
        if alloc:
            base.write(off, top.read(off, cnt))
            copied += cnt
        off += cnt
        if progress:
            progress(100.0 * off / size)
    base.flush()
    return copied


def drop_intermediate(top: BlockDriverState, base: BlockDriverState) -> None:
    """After a commit: make ``top`` use ``base`` directly as its backing file."""
    if top.backing is base:
        return
    set_backing(top, base, base.filename, base.drv)

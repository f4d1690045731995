"""Dirty bitmaps (QEMU's BdrvDirtyBitmap): which parts of a node were written.

A :class:`DirtyBitmap` belongs to one node and records, per ``granularity`` bytes, whether
a write touched that range since the bitmap was created or cleared.  Recording hooks into
the node's ``before_write`` list, so every write, zero-write and discard that reaches
the node (from the guest's BlockBackend, ``qemu-io``, a job) is seen.

Bitmaps are kept in memory (``persistent: true`` is refused); a backup job *freezes* a
bitmap (``busy``) and records new writes in a successor that is merged back or replaces
the bitmap when the job ends (QEMU's create_successor / abdicate / reclaim).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator

from emu.errors import BlockError

__all__ = ["DirtyBitmap", "BitmapError", "bitmaps_of", "find_bitmap", "add_bitmap",
           "remove_bitmap", "bitmap_info_list", "default_granularity"]

#: QEMU's default when the format has no cluster size.
DEFAULT_GRANULARITY = 65536
MIN_GRANULARITY = 512


class BitmapError(BlockError):
    """A bitmap operation refused, with QEMU's text."""


class DirtyBitmap:
    """One dirty bitmap.

    :param name: the bitmap's name (unique per node).
    :param size: the node's size in bytes when the bitmap was made.
    :param granularity: bytes per bit (power of two, >= 512).
    :param recording: whether writes are recorded (``disabled: true`` creates it off).
    """

    def __init__(self, name: str, size: int, granularity: int, recording: bool = True) -> None:
        self.name = name
        self.size = size
        self.granularity = granularity
        self.recording = recording
        self.persistent = False
        #: frozen by a job (QEMU's "busy": in use by another operation)
        self.busy = False
        self._bits: set[int] = set()
        self._lock = threading.Lock()
        #: writes recorded while frozen (QEMU's successor)
        self.successor: DirtyBitmap | None = None

    # --- bits --------------------------------------------------------------------------
    def _range(self, offset: int, length: int) -> range:
        g = self.granularity
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return range(0)
        return range(offset // g, (end - 1) // g + 1)

    def set_dirty(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` dirty."""
        with self._lock:
            self._bits.update(self._range(offset, length))

    def reset(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` clean."""
        with self._lock:
            self._bits.difference_update(self._range(offset, length))

    def clear(self) -> None:
        with self._lock:
            self._bits.clear()

    def is_dirty(self, offset: int) -> bool:
        with self._lock:
            return offset // self.granularity in self._bits

    def extents(self) -> Iterator[tuple[int, int]]:
        """Dirty ``(offset, length)`` ranges, ascending, clipped to the size."""
        with self._lock:
            bits = sorted(self._bits)
        g = self.granularity
        i = 0
        while i < len(bits):
            j = i
            while j + 1 < len(bits) and bits[j + 1] == bits[j] + 1:
                j += 1
            start = bits[i] * g
            yield start, min((bits[j] + 1) * g, self.size) - start
            i = j + 1

    @property
    def count(self) -> int:
        """Dirty bytes (QEMU's ``count``)."""
        return sum(n for _, n in self.extents())

    def snapshot(self) -> set[int]:
        with self._lock:
            return set(self._bits)

    def restore(self, bits: set[int]) -> None:
        with self._lock:
            self._bits = set(bits)

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR ``other`` into this bitmap (granularities may differ)."""
        if other is self:
            return
        for off, n in list(other.extents()):
            self.set_dirty(off, n)

    # --- recording (node hook) -----------------------------------------------------------
    def record(self, offset: int, length: int) -> None:
        if self.successor is not None:
            self.successor.record(offset, length)
        elif self.recording:
            self.set_dirty(offset, length)

    # --- freezing for jobs ---------------------------------------------------------------
    def freeze(self) -> None:
        """A job takes the bitmap: it becomes busy, new writes go to a successor."""
        self.busy = True
        self.successor = DirtyBitmap(self.name, self.size, self.granularity, self.recording)

    def abdicate(self) -> None:
        """Job succeeded (bitmap-mode on-success/always): the successor replaces the bits."""
        succ = self.successor
        self.successor = None
        self.busy = False
        if succ is not None:
            self.restore(succ.snapshot())

    def reclaim(self) -> None:
        """Job failed (or mode never): keep the bits and add the successor's."""
        succ = self.successor
        self.successor = None
        self.busy = False
        if succ is not None:
            self.merge_from(succ)

    def info(self) -> dict[str, Any]:
        """``BlockDirtyInfo`` as query-block shows it, members in QEMU's order."""
        return {"name": self.name, "recording": self.recording, "persistent": self.persistent,
                "busy": self.busy, "granularity": self.granularity, "count": self.count}

    def check_usable(self, allow_ro: bool = False) -> None:
        """QEMU's bdrv_dirty_bitmap_check for the default flags."""
        if self.busy:
            raise BitmapError(f"Bitmap '{self.name}' is currently in use by another operation "
                              "and cannot be used")


class _NodeBitmaps:
    """The bitmaps of one node and the write hook that feeds them."""

    def __init__(self, node: Any) -> None:
        self.bitmaps: list[DirtyBitmap] = []
        self.hook = self._on_write
        node.before_write.append(self.hook)

    def _on_write(self, offset: int, length: int) -> None:
        for bm in list(self.bitmaps):
            bm.record(offset, length)


_REGISTRY: "weakref.WeakKeyDictionary[Any, _NodeBitmaps]" = weakref.WeakKeyDictionary()
_REG_LOCK = threading.Lock()


def bitmaps_of(node: Any) -> list[DirtyBitmap]:
    """The node's bitmaps in creation order (empty if none)."""
    with _REG_LOCK:
        nb = _REGISTRY.get(node)
        return list(nb.bitmaps) if nb is not None else []


def find_bitmap(node: Any, name: str) -> DirtyBitmap | None:
    for bm in bitmaps_of(node):
        if bm.name == name:
            return bm
    return None


def lookup_bitmap(node: Any, name: str) -> DirtyBitmap:
    """:raises BitmapError: ``Dirty bitmap '…' not found``."""
    bm = find_bitmap(node, name)
    if bm is None:
        raise BitmapError(f"Dirty bitmap '{name}' not found")
    return bm


def default_granularity(node: Any) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size (at least 4 KiB)."""
    cs = getattr(node.impl, "cluster_size", None)
    return max(4096, cs) if cs else DEFAULT_GRANULARITY


def add_bitmap(node: Any, name: str, granularity: int | None = None, persistent: bool = False,
               disabled: bool = False, node_label: str = "") -> DirtyBitmap:
    """``block-dirty-bitmap-add`` on ``node`` with QEMU's checks and texts.

    :raises BitmapError: empty name, bad granularity, duplicate, persistent requested.
    """
    if not name:
        raise BitmapError("Bitmap name cannot be empty")
    if granularity is not None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise BitmapError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node)
    if persistent:
        # QEMU's text where the format cannot store bitmaps; emu stores none yet
        raise BitmapError(f"Can't store persistent bitmaps to {node_label or node.node_name}: "
                          "Operation not supported")
    if len(name) > 1023:
        raise BitmapError("Bitmap name is too long")
    with _REG_LOCK:
        nb = _REGISTRY.get(node)
        if nb is not None and any(b.name == name for b in nb.bitmaps):
            raise BitmapError(f"Bitmap already exists: {name}")
        bm = DirtyBitmap(name, node.size, granularity, recording=not disabled)
        if nb is None:
            nb = _REGISTRY[node] = _NodeBitmaps(node)
        nb.bitmaps.append(bm)
    return bm


def attach_bitmap(node: Any, bm: DirtyBitmap) -> None:
    """Put back a bitmap taken away by :func:`remove_bitmap` (transaction abort)."""
    with _REG_LOCK:
        nb = _REGISTRY.get(node)
        if nb is None:
            nb = _REGISTRY[node] = _NodeBitmaps(node)
        if bm not in nb.bitmaps:
            nb.bitmaps.append(bm)


def remove_bitmap(node: Any, bm: DirtyBitmap) -> None:
    """Drop ``bm`` from ``node`` (and the write hook with the last bitmap)."""
    with _REG_LOCK:
        nb = _REGISTRY.get(node)
        if nb is None:
            return
        if bm in nb.bitmaps:
            nb.bitmaps.remove(bm)
        if not nb.bitmaps:
            if nb.hook in node.before_write:
                node.before_write.remove(nb.hook)
            del _REGISTRY[node]


def bitmap_info_list(node: Any) -> list[dict[str, Any]]:
    """``dirty-bitmaps`` of query-block (newest first, as QEMU lists them)."""
    return [bm.info() for bm in reversed(bitmaps_of(node))]

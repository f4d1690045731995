"""Write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks).

QEMU's Qcow2Cache in miniature: tables are read on demand, modified in memory, marked
dirty and written back on flush or eviction.  Ordering between caches is the caller's
job: before a dirty L2 table is written, :attr:`TableCache.depends_on` (the refcount
cache) is flushed, so a crash never leaves an L2 entry pointing at a cluster whose
refcount is still 0 on disk (at worst clusters leak).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from emu.errors import ImageFormatError


class TableCache:
    """LRU write-back cache of tables keyed by host offset.

    :param read: ``read(offset, length) -> bytes`` on the image file.
    :param write: ``write(offset, data)`` on the image file.
    :param table_size: bytes per table (the cluster size).
    :param capacity: tables kept in memory.
    :param validate: called with the offset before a table is read or written; raises on
        offsets that are not valid metadata locations.
    """

    def __init__(self, name: str, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None],
                 table_size: int, capacity: int, validate: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._read, self._write = read, write
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.validate = validate
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends_on: TableCache | None = None
        #: set while a snapshot operation runs in shadow mode (see :mod:`.snapshot`): dirty
        #: tables stay in memory (never evicted, :meth:`flush` writes nothing) until the
        #: operation writes them itself, at new places
        self.hold = False

    def get(self, offset: int) -> bytearray:
        """The table at ``offset`` (loaded if needed); modify it, then :meth:`mark_dirty`."""
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            return t
        if self.validate:
            self.validate(offset)
        t = bytearray(self._read(offset, self.table_size))
        if len(t) != self.table_size:
            raise ImageFormatError(f"{self.name} at {offset:#x} is truncated")
        self._insert(offset, t)
        return t

    def put_new(self, offset: int, data: bytes | bytearray) -> bytearray:
        """Install a table that is not on disk yet (it is marked dirty)."""
        t = bytearray(data)
        self._insert(offset, t)
        self.dirty.add(offset)
        return t

    def _insert(self, offset: int, t: bytearray) -> None:
        self.tables[offset] = t
        self.tables.move_to_end(offset)
        while len(self.tables) > self.capacity:
            if self.hold:
                # Only clean tables may go; with none left the cache grows until the commit.
                old = next((o for o in self.tables if o not in self.dirty), None)
                if old is None:
                    return
                del self.tables[old]
                continue
            old, table = next(iter(self.tables.items()))
            if old in self.dirty:
                self._writeback(old)
            del self.tables[old]

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _writeback(self, offset: int) -> None:
        if self.depends_on is not None and self.depends_on.dirty:
            self.depends_on.flush()
        if self.validate:
            self.validate(offset)
        self._write(offset, bytes(self.tables[offset]))
        self.dirty.discard(offset)

    def flush(self) -> None:
        """Write every dirty table (dependencies first), in offset order (nothing while
        :attr:`hold` is set)."""
        if not self.dirty or self.hold:
            return
        if self.depends_on is not None and self.depends_on.dirty:
            self.depends_on.flush()
        for off in sorted(self.dirty):
            self._writeback(off)

    def forget(self, offset: int) -> None:
        """Drop a table without writing it (its cluster was freed)."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def invalidate(self) -> None:
        """Drop every clean table (after someone else rewrote metadata)."""
        for off in [o for o in self.tables if o not in self.dirty]:
            del self.tables[off]

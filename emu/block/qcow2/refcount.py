"""Refcounts: the refcount table, refcount blocks, cluster allocation and freeing.

Invariants kept here (so an interrupted process only ever leaks clusters):

- a cluster's refcount is raised on disk before any metadata pointing at it is written
  (the L2 cache depends on the refcount cache, see :mod:`.cache`);
- a new refcount block is written before the refcount table entry that points to it;
- a grown refcount table is complete on disk (and flushed) before the header points to it,
  and the old table is freed only after that.

Frees of clusters that active L2 tables stopped referencing are deferred until those L2
tables are on disk (:meth:`RefcountManager.defer_free`), so a freed cluster is never
reused while an on-disk table still points at it.

Shadow mode (:attr:`RefcountManager.shadow`, set by a snapshot operation, see
:mod:`.snapshot`): refcount blocks change in memory only (the cache holds them), clusters
allocated are recorded as *fresh*, a new refcount block only enters the in-memory table,
and a decrement that would reach 0 is not applied but recorded, to be applied after the
commit: a cluster the on-disk (committed) image still uses keeps a nonzero count, so it is
never handed out again before the header stops naming it.
"""

from __future__ import annotations

import struct
import sys
from bisect import bisect_left, bisect_right
from array import array
from typing import TYPE_CHECKING, Mapping

from emu.block.qcow2 import format as f
from emu.block.qcow2.cache import TableCache
from emu.errors import ImageFormatError

if TYPE_CHECKING:
    from emu.block.qcow2.driver import Qcow2Driver


class _Again(Exception):
    """Metadata was allocated while updating refcounts: search for free clusters again."""


def _runs(cl: list[int]) -> list[tuple[int, int]]:
    """Index ranges ``[a, b)`` of the runs of consecutive values in sorted, distinct ``cl``
    (``cl[k] - k`` is constant along a run and grows between runs: a bisection per run)."""
    runs = []
    a, n = 0, len(cl)
    idx = range(n)
    while a < n:
        b = bisect_right(idx, cl[a] - a, a, n, key=lambda k: cl[k] - k)
        runs.append((a, b))
        a = b
    return runs


class RefcountManager:
    """Refcount table + refcount block cache of one open image."""

    def __init__(self, drv: "Qcow2Driver", table: list[int]) -> None:
        self.drv = drv
        h = drv.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.order = h.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.block_entries = f.refcount_block_entries(h.cluster_bits, h.refcount_order)
        self.table = table
        self.free_hint = 0
        self.pending_free: list[tuple[int, int]] = []
        #: the open shadow session (:class:`emu.block.qcow2.snapshot.Shadow`) or ``None``
        self.shadow = None
        cap = max(4, (4 << 20) // self.cluster_size)
        self.cache = TableCache("Refcount block", drv.file_read, drv.file_write, self.cluster_size,
                                cap, validate=self._validate_block)

    def _validate_block(self, offset: int) -> None:
        if offset & (self.cluster_size - 1) or offset < self.cluster_size:
            raise ImageFormatError(f"Refblock offset {offset:#x} unaligned or inside the header")
        if offset >= self.drv.file_size_limit():
            raise ImageFormatError(f"Refblock at {offset:#x} is beyond the end of the image file")

    # --- lookup ---------------------------------------------------------------------------
    def get(self, cluster_index: int) -> int:
        """Refcount of host cluster ``cluster_index`` (0 where no block exists)."""
        ti, bi = divmod(cluster_index, self.block_entries)
        if ti >= len(self.table):
            return 0
        boff = self.table[ti] & f.REFT_OFFSET_MASK
        if not boff:
            return 0
        return f.read_refcount(self.cache.get(boff), bi, self.order)

    def _set(self, cluster_index: int, value: int) -> None:
        ti, bi = divmod(cluster_index, self.block_entries)
        boff = self.table[ti] & f.REFT_OFFSET_MASK
        block = self.cache.get(boff)
        f.write_refcount(block, bi, self.order, value)
        self.cache.mark_dirty(boff)

    def _covered(self, cluster_index: int) -> bool:
        ti = cluster_index // self.block_entries
        return ti < len(self.table) and bool(self.table[ti] & f.REFT_OFFSET_MASK)

    # --- update ---------------------------------------------------------------------------
    def update(self, offset: int, length: int, delta: int, allocating: bool = False,
               undo: bool = False) -> None:
        """Add ``delta`` to the refcount of every cluster touched by ``[offset, offset+length)``.

        :param allocating: the range was just allocated (it may lie past the end of the file);
            otherwise a range past the end comes from corrupt metadata and is refused.
        :param undo: takes back an increment of this call's caller (a count that returns to
            0 is applied at once, also in shadow mode).
        """
        if length <= 0:
            return
        # (The limit is rounded up to a cluster: the last compressed cluster of a file
        # qemu-img wrote is not padded, but its sectors count whole.)
        cs = self.drv.cluster_size
        if not allocating and offset + length > (self.drv.file_size_limit() + cs - 1) & ~(cs - 1):
            raise ImageFormatError(f"Cluster {offset:#x} referenced by metadata is beyond the end "
                                   "of the image file")
        while True:
            try:
                self._update(offset, length, delta, undo)
                return
            except _Again:
                continue

    def _update(self, offset: int, length: int, delta: int, undo: bool = False) -> None:
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if delta > 0 and last > first and self._raise_run(first, last, delta):
            return
        done = first
        try:
            for c in range(first, last + 1):
                if not self._covered(c):
                    if delta < 0:
                        raise ImageFormatError(f"Cannot decrease refcount of unreferenced cluster "
                                               f"{c << self.cluster_bits:#x}")
                    self._alloc_refcount_block(c)
                v = self.get(c) + delta
                if v < 0:
                    raise ImageFormatError(f"Refcount of cluster {c << self.cluster_bits:#x} would become negative")
                if v > self.max_refcount:
                    raise ImageFormatError(f"Refcount of cluster {c << self.cluster_bits:#x} would overflow")
                if v == 0 and self.shadow is not None and not undo:
                    # The committed image may still use it: free it after the commit.
                    self.shadow.zero.append((c, delta))
                    done = c + 1
                    continue
                self._set(c, v)
                done = c + 1
                if v == 0:
                    if c < self.free_hint:
                        self.free_hint = c
                    self.drv.on_cluster_freed(c << self.cluster_bits)
        except _Again:
            # Undo what this call changed so the caller's search starts over (QEMU's -EAGAIN).
            if done > first and delta > 0:
                self._update(first << self.cluster_bits, (done - first) << self.cluster_bits, -delta,
                             undo=True)
            raise

    def _raise_run(self, first: int, last: int, delta: int) -> bool:
        """Add ``delta > 0`` to clusters ``first..last`` a refcount block at a time (16-bit
        refcounts, every block already there); ``False`` (nothing changed) otherwise."""
        be = self.block_entries
        if self.order != 4 or sys.byteorder != "little":
            return False
        tis = range(first // be, last // be + 1)
        if tis[-1] >= len(self.table) or not all(self.table[ti] & f.REFT_OFFSET_MASK for ti in tis):
            return False
        staged = []
        for ti in tis:
            boff = self.table[ti] & f.REFT_OFFSET_MASK
            lo, hi = max(first, ti * be) - ti * be, min(last + 1, (ti + 1) * be) - ti * be
            vals = array("H", bytes(self.cache.get(boff)[lo * 2:hi * 2]))
            vals.byteswap()
            if max(vals) + delta > self.max_refcount:
                return False  # the per-cluster path names the cluster
            staged.append((boff, lo, hi, vals))
        for boff, lo, hi, vals in staged:
            new = array("H", map(delta.__add__, vals))
            new.byteswap()
            self.cache.get(boff)[lo * 2:hi * 2] = new.tobytes()
            self.cache.mark_dirty(boff)
        return True

    def update_clusters(self, counts: Mapping[int, int], delta: int, *,
                        end: int | None = None) -> dict[int, int]:
        """Add ``delta * n`` to the refcount of every host cluster ``c`` in ``counts`` (``c -> n``).

        The batch form QEMU's qcow2_update_snapshot_refcount amounts to: each refcount block
        is decoded once and every new value is computed and range-checked before any is
        stored, so a failure (overflow, negative count, cluster past the end of the file)
        changes nothing.  Clusters whose refcount block does not exist yet fall back to
        :meth:`update` (which allocates blocks) with the same all-or-nothing promise.

        :param end: the highest byte offset (+1) the references really use; by default the
            end of the highest cluster (a compressed cluster may end inside its last host
            cluster, at the end of the file).
        :returns: the new refcount of every cluster in ``counts``.
        :raises ImageFormatError: a count would leave its range, or a cluster lies beyond
            the end of the image file.
        """
        if not counts:
            return {}
        cb = self.cluster_bits
        if end is None:
            end = (max(counts) + 1) << cb
        if end > self.drv.file_size_limit():
            bad = min(c for c in counts if (c + 1) << cb > self.drv.file_size_limit())
            raise ImageFormatError(f"Cluster {bad << cb:#x} referenced by metadata is beyond the end "
                                   "of the image file")
        be = self.block_entries
        order = sorted(counts)
        # Split the sorted clusters at refcount block boundaries (one slice per block).
        groups: list[tuple[int, list[int]]] = []
        i = 0
        while i < len(order):
            ti = order[i] // be
            j = bisect_left(order, (ti + 1) * be, i)
            groups.append((ti, order[i:j]))
            i = j
        missing = [ti for ti, _ in groups
                   if ti >= len(self.table) or not self.table[ti] & f.REFT_OFFSET_MASK]
        if missing:
            if delta < 0:
                c = next(cl[0] for ti, cl in groups if ti == missing[0])
                raise ImageFormatError(f"Cannot decrease refcount of unreferenced cluster {c << cb:#x}")
            return self._update_clusters_slow(counts, delta)
        fast = self.order == 4 and sys.byteorder == "little"
        single = max(counts.values()) == 1
        staged: list[tuple[int, array | None, list[int], list[int]]] = []
        for ti, cl in groups:
            boff = self.table[ti] & f.REFT_OFFSET_MASK
            raw = bytes(self.cache.get(boff))
            base = ti * be
            vals: array | None = None
            if fast:
                vals = array("H", raw)
                vals.byteswap()
                lo = cl[0] - base
                if single and cl[-1] - cl[0] + 1 == len(cl):
                    # A contiguous run touched once each (the usual case): whole-slice math.
                    new = list(map(delta.__add__, vals[lo:lo + len(cl)]))
                elif single:
                    # A few contiguous runs (data clusters and their table elsewhere): per run.
                    new = []
                    for a, b in _runs(cl):
                        lo = cl[a] - base
                        new += map(delta.__add__, vals[lo:lo + b - a])
                else:
                    new = [vals[c - base] + delta * counts[c] for c in cl]
            else:
                new = [f.read_refcount(raw, c - base, self.order) + delta * counts[c] for c in cl]
            if min(new) < 0:
                c = cl[next(k for k, v in enumerate(new) if v < 0)]
                raise ImageFormatError(f"Refcount of cluster {c << cb:#x} would become negative")
            if max(new) > self.max_refcount:
                c = cl[next(k for k, v in enumerate(new) if v > self.max_refcount)]
                raise ImageFormatError(f"Refcount of cluster {c << cb:#x} would overflow")
            staged.append((boff, vals, cl, new))
        # Everything checked: store.  Blocks are looked up again because staging many of
        # them may have evicted (clean, hence unchanged) ones from the cache.
        result: dict[int, int] = {}
        shadow = self.shadow
        for boff, vals, cl, logical in staged:
            new = logical
            if shadow is not None and delta < 0 and 0 in new:
                # Shadow mode: counts reaching 0 keep their value until after the commit.
                new = list(logical)
                k = new.index(0)
                while True:
                    c = cl[k]
                    new[k] = -delta * counts[c]
                    shadow.zero.append((c, delta * counts[c]))
                    try:
                        k = new.index(0, k + 1)
                    except ValueError:
                        break
            block = self.cache.get(boff)
            base = (cl[0] // be) * be
            if vals is not None:
                lo = cl[0] - base
                if cl[-1] - cl[0] + 1 == len(cl):
                    vals[lo:lo + len(cl)] = array("H", new)
                else:
                    for a, b in _runs(cl):
                        lo = cl[a] - base
                        vals[lo:lo + b - a] = array("H", new[a:b])
                vals.byteswap()
                block[:] = vals.tobytes()
            else:
                for c, v in zip(cl, new):
                    f.write_refcount(block, c - base, self.order, v)
            self.cache.mark_dirty(boff)
            result.update(zip(cl, logical))
            if delta < 0 and 0 in new:
                for c, v in zip(cl, new):
                    if v == 0:
                        if c < self.free_hint:
                            self.free_hint = c
                        self.drv.on_cluster_freed(c << cb)
        return result

    def _update_clusters_slow(self, counts: Mapping[int, int], delta: int) -> dict[int, int]:
        cb, cs = self.cluster_bits, self.cluster_size
        done: list[tuple[int, int]] = []
        try:
            for c, n in counts.items():
                self.update(c << cb, cs, delta * n)
                done.append((c, n))
        except BaseException:
            for c, n in reversed(done):
                try:
                    self.update(c << cb, cs, -delta * n, undo=True)
                except ImageFormatError:
                    pass
            raise
        return {c: self.get(c) for c in counts}

    def defer_free(self, offset: int, length: int) -> None:
        """Decrement later, once the L2 tables that dropped the reference are on disk."""
        self.pending_free.append((offset, length))

    def apply_pending_frees(self) -> None:
        pend, self.pending_free = self.pending_free, []
        for off, length in pend:
            self.update(off, length, -1)

    # --- allocation -----------------------------------------------------------------------
    def _alloc_noref(self, n: int) -> int:
        """QEMU's alloc_clusters_noref: first run of ``n`` free clusters from the hint,
        leaving the hint just past it."""
        while True:
            c = self._next_free(self.free_hint)
            k = self._free_run(c + 1, n - 1) + 1 if n > 1 else 1
            if k == n:
                self.free_hint = c + n
                if self.shadow is not None:
                    self.shadow.fresh.update(range(c, c + n))
                return c
            self.free_hint = c + k + 1  # c + k is in use: search again after it

    def _free_run(self, c: int, n: int) -> int:
        """How many of the ``n`` clusters from ``c`` on have refcount 0, in a row."""
        be = self.block_entries
        k = 0
        while k < n:
            ti, bi = divmod(c + k, be)
            m = min(n - k, be - bi)
            covered = ti < len(self.table) and self.table[ti] & f.REFT_OFFSET_MASK
            if not covered:  # no block: all free
                k += m
                continue
            if self.order == 4:
                block = self.cache.get(self.table[ti] & f.REFT_OFFSET_MASK)
                z = block.count(0, bi * 2, (bi + m) * 2)
                if z != m * 2:  # a refcount in this stretch is not 0: find which
                    while self.get(c + k) == 0:
                        k += 1
                    return k
                k += m
                continue
            if self.get(c + k):
                return k
            k += 1
        return k

    def _next_free(self, c: int) -> int:
        """The first cluster at or after ``c`` with refcount 0 (uncovered ones count as 0)."""
        if self.get(c) == 0:
            return c
        be = self.block_entries
        fast = self.order == 4 and sys.byteorder == "little"
        while True:
            ti, bi = divmod(c, be)
            if ti >= len(self.table) or not self.table[ti] & f.REFT_OFFSET_MASK:
                return c
            block = self.cache.get(self.table[ti] & f.REFT_OFFSET_MASK)
            if fast:
                # Scan a whole block in C (the first allocation after open starts at 0).
                try:
                    return ti * be + array("H", bytes(block)).index(0, bi)
                except ValueError:
                    c = (ti + 1) * be
                    continue
            for i in range(bi, be):
                if f.read_refcount(block, i, self.order) == 0:
                    return ti * be + i
            c = (ti + 1) * be

    def _find_free(self, n: int) -> int:
        return self._alloc_noref(n)

    def alloc(self, nbytes: int) -> int:
        """Allocate clusters for ``nbytes`` bytes (refcount 1); returns the host offset."""
        n = max(1, (nbytes + self.cluster_size - 1) >> self.cluster_bits)
        while True:
            start = self._alloc_noref(n)
            try:
                self._update(start << self.cluster_bits, n << self.cluster_bits, 1)
            except _Again:
                continue  # metadata moved: search again, as QEMU does on -EAGAIN
            self.drv.note_allocated((start + n) << self.cluster_bits)
            return start << self.cluster_bits

    def _ensure_blocks(self, first: int, count: int) -> bool:
        """Make sure refcount blocks cover clusters ``first..first+count-1``.

        :returns: ``True`` if it had to allocate something (the caller re-searches).
        """
        for c in range(first, first + count):
            if not self._covered(c):
                try:
                    self._alloc_refcount_block(c)
                except _Again:
                    return True
        return False

    def _alloc_refcount_block(self, c: int) -> None:
        """Create the refcount block covering cluster ``c``; always ends with :class:`_Again`."""
        ti = c // self.block_entries
        if self.shadow is not None:
            self._alloc_refcount_block_shadow(ti)
        if ti >= len(self.table):
            self._grow_table(ti)
            raise _Again()
        fc = self._alloc_noref(1)
        boff = fc << self.cluster_bits
        block = bytearray(self.cluster_size)
        if fc // self.block_entries == ti:
            # The new block describes itself.
            f.write_refcount(block, fc % self.block_entries, self.order, 1)
        else:
            # Described elsewhere (may itself need a new block first: recursion ends
            # at a block that describes itself, as in QEMU).
            self._update(boff, self.cluster_size, 1)
            # Its own refcount reaches disk before the table points at it.
            self.cache.flush()
        self.drv.file_write(boff, bytes(block))
        self.drv.note_allocated(boff + self.cluster_size)
        # The block is on disk before the refcount table entry that points at it.
        self.table[ti] = boff
        self.drv.file_write(self.drv.header.refcount_table_offset + ti * 8, struct.pack(">Q", boff))
        self.cache.forget(boff)
        self.drv.invalidate_meta()
        raise _Again()

    def _alloc_refcount_block_shadow(self, ti: int) -> None:
        """Shadow mode: a new refcount block for table index ``ti`` (the in-memory table
        grows as needed), in memory only; the commit writes it and a new table.  Always
        ends with :class:`_Again`."""
        if ti >= len(self.table):
            self.table.extend([0] * (ti + 1 - len(self.table)))
        fc = self._alloc_noref(1)
        boff = fc << self.cluster_bits
        block = bytearray(self.cluster_size)
        if fc // self.block_entries == ti:
            f.write_refcount(block, fc % self.block_entries, self.order, 1)
        else:
            self._update(boff, self.cluster_size, 1)
        self.drv.note_allocated(boff + self.cluster_size)
        self.table[ti] = boff
        self.shadow.table_changed = True
        self.cache.put_new(boff, block)
        self.drv.invalidate_meta()
        raise _Again()

    def _grow_table(self, min_index: int) -> None:
        """Move the refcount table to the end of the image with room for ``min_index``."""
        cs = self.cluster_size
        entries_per_cluster = cs // 8
        # Everything from the first cluster the old table cannot describe is free, so the
        # new self-describing area goes there (QEMU's meta_offset); callers re-search after.
        start = max(len(self.table), min_index) * self.block_entries
        want = max(min_index + 1, len(self.table) * 3 // 2, len(self.table) + 1)
        while True:
            tc = (want + entries_per_cluster - 1) // entries_per_cluster
            nb = 0
            while True:
                end = start + tc + nb
                missing = [ti for ti in range(start // self.block_entries, (end - 1) // self.block_entries + 1)
                           if ti >= len(self.table) or not self.table[ti] & f.REFT_OFFSET_MASK]
                if len(missing) == nb:
                    break
                nb = len(missing)
            end = start + tc + nb
            need = (end - 1) // self.block_entries + 1
            if need <= tc * entries_per_cluster:
                break
            want = need
        if tc * cs > f.QCOW_MAX_REFTABLE_SIZE:
            raise ImageFormatError("Refcount table too large")
        new_table = self.table + [0] * (tc * entries_per_cluster - len(self.table))
        blocks: dict[int, bytearray] = {}
        for k, ti in enumerate(missing):
            new_table[ti] = (start + tc + k) << self.cluster_bits
            blocks[ti] = bytearray(cs)
        for c in range(start, end):
            ti, bi = divmod(c, self.block_entries)
            if ti in blocks:
                f.write_refcount(blocks[ti], bi, self.order, 1)
            else:
                self._set(c, 1)
        # Old blocks' new counts, then the new blocks and table, all reach the disk
        # before the header switches to the new table.
        self.cache.flush()
        for ti, b in blocks.items():
            self.drv.file_write(new_table[ti], bytes(b))
        self.drv.file_write(start << self.cluster_bits, f.serialize_table(new_table))
        self.drv.note_allocated(end << self.cluster_bits)
        self.drv.barrier()
        h = self.drv.header
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        h.refcount_table_offset, h.refcount_table_clusters = start << self.cluster_bits, tc
        self.drv.file_write(48, struct.pack(">QI", h.refcount_table_offset, tc))
        self.drv.barrier()
        self.table = new_table
        self.drv.invalidate_meta()
        # The header no longer points at the old table: free it.
        self.update(old_off, old_clusters * cs, -1)

    def flush(self) -> None:
        self.cache.flush()

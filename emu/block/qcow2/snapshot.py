"""Internal snapshots: create, delete, list, goto -- each atomic by one header write.

QEMU 7.2 changes refcount blocks, L1 and L2 tables in place; a data cluster's refcount
lives in a refcount block and its QCOW_OFLAG_COPIED flag in an active L2 table, so whichever
is written first, a kill between the two leaves ``qemu-img check`` an ``ERROR OFLAG_COPIED``
(refcount 1 with the flag clear, or 2 with it set).  No order of in-place writes closes
that window.  emu departs from QEMU's order: every snapshot operation runs as a *shadow
session* (:class:`Shadow`) and is committed by one header write:

* while the session is open nothing the on-disk header reaches is written: the refcount
  and L2 caches hold their dirty tables in memory, new clusters are taken only where the
  committed image has refcount 0 (recorded as *fresh*), and a refcount that would drop to
  0 keeps its value until after the commit, so no cluster the committed image uses is
  handed out again;
* the commit (:meth:`SnapshotMixin._shadow_switch`) copies every active L2 table that
  changed and is still at a committed offset to a new cluster (for a create: an eager
  copy-on-write -- the snapshot keeps the old tables, the active view gets copies with
  QCOW_OFLAG_COPIED cleared), writes the active L1, new snapshots' L1 copies, the snapshot
  table, every changed refcount block and a new refcount table to new clusters (the new
  blocks describe themselves and the table), fdatasync, then ONE write of header bytes
  36..71 (l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
  nb_snapshots, snapshots_offset; from 24 when a goto changes the size), fdatasync;
* only then are the old metadata clusters and the counts that reached 0 freed
  (:meth:`SnapshotMixin._shadow_release`; a crash before that only leaks).

A kill at any instant therefore leaves either the old consistent image (the new clusters
unreferenced, refcount 0) or the new one with at most leaked clusters.  A failure before
the header write of a delete or goto forgets the session and reads the metadata back.

Creation has two halves so a running guest is held only for the first (the monitor's
``transaction``):

* :meth:`SnapshotMixin.snapshot_create_begin` (inside the drained section, O(L1), no I/O
  beyond writing back the caches): opens the session (or joins the open one), takes the
  active L1 table as the snapshot's, and records every L2 table it references as *owed*
  its +1 (on the table and on each cluster it maps) and the loss of QCOW_OFLAG_COPIED;
* the guest then runs again.  The first write that needs an owed table settles it first
  (:meth:`SnapshotMixin._settle_l2`, called from ``_l2_for_write``; in memory): refcounts
  raised, flags cleared in the table and its L1 entries, so the ordinary copy-on-write path
  copies the table (to a fresh cluster) and its clusters instead of changing the
  snapshot's.  The guest's metadata stays in the session too; a guest flush commits the
  session first (:meth:`SnapshotMixin._settle_all` from ``_write_caches``), so no flush
  completes before its writes are reachable from the header;
* :meth:`SnapshotMixin.snapshot_create_finish` (guest running; the caller's reply waits for
  it) settles the remaining tables a few per hold of the node lock, makes what the guest
  wrote meanwhile durable without the lock, then commits (the lock is held from the copies
  to the header write, one fdatasync of those few clusters) and makes the header durable
  without the lock.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections import Counter
from functools import reduce
from operator import or_
from typing import Any

from emu.block.qcow2 import format as f
from emu.errors import BlockError, ImageFormatError


#: bytes.translate table clearing bit 7 (QCOW_OFLAG_COPIED in an entry's first byte).
_CLEAR_COPIED = bytes(b & 0x7F for b in range(256))
#: bytes.translate table keeping only bit 6 (QCOW_OFLAG_COMPRESSED in an entry's first byte).
_ONLY_COMPRESSED = bytes(b & 0x40 for b in range(256))
#: owed L2 tables a snapshot's finisher settles per hold of the node lock
_SETTLE_BATCH = 8
#: L2 tables whose walk result is remembered (content-checked) between snapshot operations.
_WALK_MEMO_TABLES = 64


class SnapshotNotFound(BlockError):
    """No snapshot matches the given id/name."""


class PendingSnapshot:
    """A snapshot between :meth:`SnapshotMixin.snapshot_create_begin` and its finish.
    (A plain class: importing dataclasses would cost every emu-img start-up ~15 ms.)"""

    def __init__(self, sn: f.QCowSnapshot, l1: list[int], saved_l1: list[int]) -> None:
        self.sn = sn
        #: the snapshot's L1 table (the active one at the cut, QCOW_OFLAG_COPIED cleared)
        self.l1 = l1
        #: the active L1 at the cut, restored by a cancel inside the drained section
        self.saved_l1 = saved_l1
        #: L2 tables this snapshot owes a reference (each table once per L1 entry naming it)
        self.tables: list[int] = []
        #: set when settling failed: the snapshot is abandoned and finish raises this
        self.failed: BaseException | None = None
        self.done = False


class Shadow:
    """An open shadow session: what the commit must write, and free after the header switch.

    While it is open nothing the on-disk header reaches is written (the caches hold their
    dirty tables); :meth:`SnapshotMixin._shadow_switch` writes the new state to clusters
    the committed image does not use and switches the header in one write.
    """

    def __init__(self) -> None:
        #: clusters allocated in this session (unused by the committed image)
        self.fresh: set[int] = set()
        #: (cluster, delta) refcount decrements to 0, applied after the switch
        self.zero: list[tuple[int, int]] = []
        #: (offset, length) of committed metadata the new state no longer uses: -1 after
        #: the switch (old L1, refcount table and blocks, snapshot table, copied L2 tables)
        self.after: list[tuple[int, int]] = []
        #: a refcount block was added to the in-memory refcount table
        self.table_changed = False
        #: the active L1 changed (it goes to a new place at the commit)
        self.l1_dirty = False
        #: the snapshot list changed (a new snapshot table at the commit)
        self.snapshots_dirty = False
        #: new virtual size (goto to a snapshot of another size)
        self.size: int | None = None
        #: the pending snapshot whose begin opened the session (None: delete/goto)
        self.owner: PendingSnapshot | None = None


class SnapshotMixin:
    """Snapshot logic of :class:`~emu.block.qcow2.driver.Qcow2Driver` (state lives there)."""

    #: L2 table offset -> active L1 indices naming it, for tables a pending snapshot still
    #: owes a reference (empty and shared until the first begin gives the image its own).
    _owed: dict[int, list[int]] = {}
    #: snapshots begun and not finished or cancelled, oldest first
    _pending: list[PendingSnapshot] = []
    #: the open shadow session, if any
    _shadow: Shadow | None = None

    # --- helpers ------------------------------------------------------------------------
    def _read_l1(self, offset: int, l1_size: int) -> list[int]:
        if not l1_size:
            return []
        if offset & (self.cluster_size - 1) or offset == 0 or offset + l1_size * 8 > self.file_size_limit():
            raise ImageFormatError(f"Snapshot L1 table offset {offset:#x} invalid")
        return f.parse_table(self.file_read(offset, l1_size * 8), l1_size)

    def _tree_clusters(self, l1: list[int]) -> Counter:
        """Host cluster -> number of references from the tree under ``l1`` (L2 tables,
        data clusters, every host cluster a compressed cluster touches).

        Also leaves in ``self._walked`` each L2 table's data clusters (in entry order) and
        whether it holds compressed clusters, for :meth:`_fix_copied_flags`.
        """
        cb = self.cluster_bits
        cs = self.cluster_size
        counts: Counter = Counter()
        walked: dict[int, tuple[list[int], bool]] = {}
        end = 0
        for i in range(len(l1)):
            l2off = self._l2_table_offset(i, l1)
            if not l2off:
                continue
            clusters, extra, tend = self._walk_l2_memo(l2off)
            counts.update(clusters)
            if extra:
                counts.update(extra)
            counts[l2off >> cb] += 1
            end = max(end, tend, l2off + cs)
            walked[l2off] = (clusters, bool(extra))
        self._walked = walked
        self._walk_end = end
        return counts

    def _walk_l2_memo(self, l2off: int) -> tuple[list[int], list[int], int]:
        """:meth:`_walk_l2` of the cached table, remembered between snapshot operations."""
        memo: dict[int, tuple[bytes, list[int], list[int], int]] = self.__dict__.setdefault("_walk_memo", {})
        raw = bytes(self.l2cache.get(l2off))
        # The walk depends only on the table's bytes without QCOW_OFLAG_COPIED (which
        # snapshots flip): reuse the last result for an unchanged table.
        norm = bytearray(raw)
        norm[0::8] = norm[0::8].translate(_CLEAR_COPIED)
        hit = memo.get(l2off)
        if hit is not None and hit[0] == norm:
            return hit[1], hit[2], hit[3]
        # The same content at another offset (a snapshot's table and the active copy of it).
        by_content: dict[bytes, tuple[list[int], list[int], int]] = self.__dict__.setdefault("_walk_by_content", {})
        norm = bytes(norm)
        done = by_content.get(norm)
        if done is not None:
            clusters, extra, tend = done
        else:
            clusters, extra, tend = self._walk_l2(l2off, raw)
        if len(memo) >= _WALK_MEMO_TABLES:
            memo.clear()
            by_content.clear()
        memo[l2off] = (norm, clusters, extra, tend)
        by_content[norm] = (clusters, extra, tend)
        return clusters, extra, tend

    def _walk_l2(self, l2off: int, raw: bytes) -> tuple[list[int], list[int], int]:
        """One L2 table: its data clusters (entry order), the host clusters its compressed
        clusters touch, and the highest byte (+1) they must find inside the file."""
        cb = self.cluster_bits
        cs = self.cluster_size
        mask = f.L2E_OFFSET_MASK
        comp = f.QCOW_OFLAG_COMPRESSED
        # Unallocated entries are 0: a table only partly used (a small disk, the image's
        # last table) is unpacked only up to its last nonzero entry.
        n = (len(raw.rstrip(b"\0")) + 7) >> 3
        entries = struct.unpack_from(f">{n}Q", raw)
        # Bit 62 (compressed) lives in each entry's first byte: count them in C.
        has_comp = raw[0::8].translate(_ONLY_COMPRESSED).count(0x40) > 0
        if has_comp:
            hosts = [e & mask for e in entries if e & mask and not e & comp]
        else:
            hosts = list(filter(None, map(mask.__and__, entries)))
        if reduce(or_, hosts, 0) & (cs - 1):
            h = next(h for h in hosts if h & (cs - 1))
            raise ImageFormatError(f"Cluster allocation offset {h:#x} unaligned "
                                   f"(L2 offset: {l2off:#x})")
        clusters = list(map(cb.__rrshift__, hosts))
        end = max(hosts) + cs if hosts else 0
        extra: list[int] = []
        for e in ([e for e in entries if e & comp] if has_comp else []):
            coff = (e & self.clayout.offset_mask) & ~511
            nb = ((e >> self.clayout.csize_shift) & self.clayout.csize_mask) + 1
            extra.extend(range(coff >> cb, ((coff + nb * 512 - 1) >> cb) + 1))
            # The sector count is rounded up and may run past the end of the file
            # (qemu-io/qemu-img write the last compressed cluster short): only its
            # first byte must lie inside.
            end = max(end, coff + 1)
        return clusters, extra, end

    def _update_tree_refcounts(self, l1: list[int], delta: int) -> dict[int, int]:
        """Add ``delta`` to every L2 table and data cluster reachable from ``l1``.

        One batch per call (each refcount block decoded and changed once, like QEMU's
        qcow2_update_snapshot_refcount with its refcount cache).  All or nothing: every new
        value is checked before any is stored, so a failure (overflow, corrupt entry)
        changes nothing.

        :returns: the new refcount of every cluster the tree references.
        """
        counts = self._tree_clusters(l1)
        return self.refs.update_clusters(counts, delta, end=self._walk_end)

    def _fix_copied_flags(self, changed: dict[int, int] | None = None) -> None:
        """Set QCOW_OFLAG_COPIED exactly where the active tree's refcount is 1.

        :param changed: new refcounts of the clusters whose count just changed (from
            :meth:`_update_tree_refcounts`); only entries pointing at those can change
            their flag.  ``None`` re-derives every flag from the refcount blocks.
        """
        cb = self.cluster_bits
        mask = f.L2E_OFFSET_MASK
        copied = f.QCOW_OFLAG_COPIED
        comp = f.QCOW_OFLAG_COMPRESSED
        st = struct.Struct(f">{self.l2_size}Q")
        refget = self.refs.get
        l1_changed = False
        get = changed.get if changed is not None else refget
        walked = getattr(self, "_walked", {}) if changed is not None else {}
        for i in range(len(self.l1)):
            l2off = self._l2_table_offset(i)
            if not l2off:
                continue
            l2 = self.l2cache.get(l2off)
            before = bytes(l2)
            seen = walked.get(l2off)
            if seen is None and changed is not None:
                # A table of the active tree only (a copy of the snapshot's): its walk, so
                # the whole-table cases below apply when every count it maps changed.
                clusters, extra, _ = self._walk_l2_memo(l2off)
                seen = (clusters, bool(extra))
            vals = list(map(changed.get, seen[0])) if seen and seen[0] else None
            if vals and None in vals:
                vals = None
            if vals and min(vals) >= 2:
                # Every data cluster of this table is shared: clear bit 63 of every entry
                # (compressed and unallocated entries never carry it).
                l2[0::8] = l2[0::8].translate(_CLEAR_COPIED)
            else:
                entries = st.unpack(before)
                if vals and max(vals) == 1 and not seen[1]:
                    new = [e | copied if e & mask else e for e in entries]
                else:
                    # rc is None for clusters whose count did not change: their flag stays.
                    new = [e if not e & mask or e & comp or (rc := get((e & mask) >> cb)) is None
                           else (e | copied) if rc == 1 else (e & ~copied) for e in entries]
                st.pack_into(l2, 0, *new)
            if l2 != before:
                self.l2cache.mark_dirty(l2off)
            c = l2off >> cb
            if changed is not None and c not in changed:
                continue
            rc = changed[c] if changed is not None else refget(c)
            ne = (self.l1[i] | copied) if rc == 1 else (self.l1[i] & ~copied)
            if ne != self.l1[i]:
                self.l1[i] = ne
                l1_changed = True
        if l1_changed:
            self._shadow.l1_dirty = True


    # --- shadow sessions ------------------------------------------------------------------
    def _shadow_open(self) -> Shadow:
        """Write back cached metadata (the committed image is complete on disk), then hold
        every later metadata change in memory until :meth:`_shadow_switch`."""
        self._write_caches()
        s = Shadow()
        self._shadow = s
        self.refs.shadow = s
        self.refs.cache.hold = self.l2cache.hold = True
        return s

    def _shadow_close(self) -> None:
        self._shadow = None
        self.refs.shadow = None
        self.refs.cache.hold = self.l2cache.hold = False

    def _shadow_abort(self) -> None:
        """Forget a session that has not switched the header (no guest request ran in it):
        the committed image on disk is intact, so its metadata is read back."""
        self._shadow_close()
        for cache in (self.refs.cache, self.l2cache):
            cache.tables.clear()
            cache.dirty.clear()
        self.refs.pending_free = []
        self.refs.free_hint = 0
        h, cs = self.header, self.cluster_size
        self.l1 = f.parse_table(self.file_read(h.l1_table_offset, h.l1_size * 8), h.l1_size) \
            if h.l1_size else []
        self.refs.table = f.parse_table(self.file_read(h.refcount_table_offset, h.refcount_table_clusters * cs),
                                        h.refcount_table_clusters * cs // 8)
        self.__dict__.pop("_walk_memo", None)
        self.__dict__.pop("_walk_by_content", None)
        self.invalidate_meta()

    def _settle_all(self) -> None:
        """Commit the open session (pending snapshots become durable) before anything that
        walks or rewrites the tree outside one."""
        if self._shadow is not None:
            post = self._shadow_switch(self.barrier)
            self.barrier()
            self._shadow_release(post)

    def _shadow_switch(self, barrier: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Commit the open session: settle what pending snapshots still owe, copy every
        changed active L2 table and refcount block to a new cluster, write the active L1,
        the new snapshots' L1 copies, the snapshot table and a refcount table to new
        clusters, ``barrier()``, then switch the header with one write.  The caller makes
        the header durable and calls :meth:`_shadow_release` with the result.

        A failure before the header write leaves the session open (nothing committed
        changed on disk)."""
        s = self._shadow
        cb, cs = self.cluster_bits, self.cluster_size
        refs, l2 = self.refs, self.l2cache
        h = self.header
        if self._owed:
            try:
                self._settle_tables(list(self._owed))
            except (BlockError, OSError) as err:
                self._abandon_pending(err)
        made = [p for p in self._pending if not p.failed]
        # Clusters the session's tables stopped using (copy-on-write): their counts drop now
        # (to 0 only after the switch), as the tables that dropped them are in this commit.
        refs.apply_pending_frees()
        # 1. Active L2 tables changed in place in memory but still at committed offsets go
        #    to new clusters (an eager copy-on-write: a snapshot keeps the old table).
        #    Moving a table leaves its data clusters' counts as they are (a count is the
        #    number of L1-entry paths reaching a cluster); the old table loses one per entry.
        mask = f.L1E_OFFSET_MASK
        active = Counter(e & mask for e in self.l1 if e & mask)
        moved: dict[int, int] = {}
        for off, n in active.items():
            if off in l2.dirty and (off >> cb) not in s.fresh:
                new = refs.alloc(cs)
                if n > 1:
                    refs.update(new, cs, n - 1, allocating=True)
                moved[off] = new
                s.after.extend([(off, cs)] * n)
        for off, new in moved.items():
            data = l2.tables[off]
            l2.forget(off)
            l2.put_new(new, data)
        if moved:
            copied = f.QCOW_OFLAG_COPIED
            for i, e in enumerate(self.l1):
                new = moved.get(e & mask)
                if new is not None:
                    self.l1[i] = new | (copied if active[e & mask] == 1 else 0)
            s.l1_dirty = True
        # Committed tables changed in memory that the active L1 no longer names were settled
        # (flags only) and then copied by a guest write: the on-disk version stays theirs.
        for off in [o for o in l2.dirty if (o >> cb) not in s.fresh]:
            l2.forget(off)
        writes: list[tuple[int, bytes]] = []
        # What the header names now and the new one will not: freed after the switch (kept
        # apart until then, so a commit retried after a failed write counts each once).
        old_meta: list[tuple[int, int]] = []
        # 2. The active L1 (new place when it changed).
        l1_off, l1_size = h.l1_table_offset, h.l1_size
        if s.l1_dirty or len(self.l1) != h.l1_size:
            l1_size = len(self.l1)
            l1_off = refs.alloc(l1_size * 8) if l1_size else 0
            if l1_size:
                writes.append((l1_off, f.serialize_table(self.l1)))
            if h.l1_size:
                old_meta.append((h.l1_table_offset, h.l1_size * 8))
        # 3. New snapshots' L1 copies and the snapshot table.
        snaps = self.snapshots + [p.sn for p in made]
        sn_off, sn_size = h.snapshots_offset, self.snapshots_size
        if made or s.snapshots_dirty:
            for p in made:
                if p.l1:
                    p.sn.l1_table_offset = refs.alloc(len(p.l1) * 8)
                    writes.append((p.sn.l1_table_offset, f.serialize_table(p.l1)))
            data = f.serialize_snapshot_table(snaps)
            if len(data) > f.QCOW_MAX_SNAPSHOTS_SIZE:
                raise BlockError("Snapshot table too large")
            sn_off, sn_size = (refs.alloc(len(data)) if data else 0), len(data)
            if data:
                writes.append((sn_off, data))
            if h.snapshots_offset and self.snapshots_size:
                old_meta.append((h.snapshots_offset, self.snapshots_size))
        # 4. Refcount blocks changed at committed offsets, and a new refcount table.
        rt_off, rt_clusters = self._shadow_refcount_layout(s)
        if rt_off != h.refcount_table_offset:
            old_meta.append((h.refcount_table_offset, h.refcount_table_clusters * cs))
        writes += [(o, bytes(l2.tables[o])) for o in sorted(l2.dirty)]
        writes += [(o, bytes(refs.cache.tables[o])) for o in sorted(refs.cache.dirty)]
        if rt_off != h.refcount_table_offset:
            writes.append((rt_off, f.serialize_table(refs.table)))
        for off, data in writes:
            self.file_write(off, data)
        l2.dirty.clear()
        refs.cache.dirty.clear()
        # Everything the new header reaches is on disk before the header names it.
        barrier()
        # 5. One write switches the image: l1_size .. snapshots_offset (bytes 36..71),
        #    from 24 when the virtual size changes too (all in the first sector).
        new_size = h.size if s.size is None else s.size
        fields = struct.pack(">IQQIIQ", l1_size, l1_off, rt_off, rt_clusters, len(snaps), sn_off)
        if new_size != h.size:
            self.file_write(24, struct.pack(">QI", new_size, h.crypt_method) + fields)
        else:
            self.file_write(36, fields)
        h.l1_size, h.l1_table_offset = l1_size, l1_off
        h.refcount_table_offset, h.refcount_table_clusters = rt_off, rt_clusters
        h.nb_snapshots, h.snapshots_offset, h.size = len(snaps), sn_off, new_size
        s.after += old_meta
        self.snapshots, self.snapshots_size = snaps, sn_size
        for p in self._pending:
            p.done = True
        self._pending = []
        self._owed = {}
        self._shadow_close()
        self.invalidate_meta()
        return s.after, s.zero

    def _shadow_refcount_layout(self, s: Shadow) -> tuple[int, int]:
        """Give every refcount block changed at a committed offset a new cluster and write
        a new refcount table: all in one run of free clusters (a hole left by earlier
        metadata, else at the end of the file), which the blocks describe themselves (as the
        refcount-table growth code); returns the table's offset and clusters
        (``self.refs.table`` becomes the new table)."""
        refs = self.refs
        cb, cs = self.cluster_bits, self.cluster_size
        be = refs.block_entries
        mask = f.REFT_OFFSET_MASK
        table = refs.table
        stale = set()
        for o in refs.cache.dirty:
            if (o >> cb) not in s.fresh and o in table:     # (entries carry no flag bits)
                stale.add(table.index(o))
        h = self.header
        if not refs.cache.dirty and not s.table_changed:
            return h.refcount_table_offset, h.refcount_table_clusters    # nothing changed

        def committed(ti: int) -> bool:
            return ti < len(table) and bool(table[ti] & mask) and ((table[ti] & mask) >> cb) not in s.fresh

        def free_run(n: int) -> int:
            """The first run of ``n`` clusters with refcount 0 (free in the committed image
            too: counts reaching 0 wait for the commit), a hole first, else the file's end."""
            c = 0
            while True:
                c = refs._next_free(c)
                k = refs._free_run(c, n)
                if k == n:
                    return c
                c += k + 1

        # The run holds the moved blocks, new blocks for itself where no block covers it, and
        # the table; every block covering it is written (moved or new), so it describes itself.
        n = 0
        while True:
            start = free_run(n) if n else 0
            tis = {c // be for c in range(start, start + n)}
            reloc = stale | {ti for ti in tis if committed(ti)}
            new_blocks = {ti for ti in tis if ti >= len(table) or not table[ti] & mask}
            tlen = max([len(table)] + [ti + 1 for ti in tis])
            need = len(reloc) + len(new_blocks) + max(1, (tlen * 8 + cs - 1) // cs)
            if need <= n:
                break
            n = need
        tc = n - len(reloc) - len(new_blocks)      # a run longer than needed: a bigger table
        if tc * cs > f.QCOW_MAX_REFTABLE_SIZE:
            raise ImageFormatError("Refcount table too large")
        clusters = iter(range(start, start + n))
        new_table = list(table) + [0] * (tc * cs // 8 - len(table))
        for ti in sorted(reloc):
            old = table[ti] & mask
            new = next(clusters) << cb
            data = refs.cache.get(old)
            refs.cache.forget(old)
            refs.cache.put_new(new, data)
            new_table[ti] = new
            s.after.append((old, cs))
        for ti in sorted(new_blocks):
            new = next(clusters) << cb
            refs.cache.put_new(new, bytes(cs))
            new_table[ti] = new
        rt_off = next(clusters) << cb
        refs.table = new_table
        for c in range(start, start + n):
            refs._set(c, 1)
        s.fresh.update(range(start, start + n))
        self.note_allocated((start + n) << cb)
        return rt_off, tc

    def _shadow_release(self, post: tuple[list[tuple[int, int]], list[tuple[int, int]]]) -> None:
        """After the switch is durable: free the old metadata and the counts that reached 0
        in the session (a crash before this only leaks them), then write back."""
        after, zero = post
        for off, length in after:
            if length:
                self.refs.update(off, length, -1)
        if zero:
            counts: Counter = Counter()
            for c, d in zero:
                counts[c] -= d
            self.refs.update_clusters(counts, -1)
        if self._shadow is None:
            self._write_caches()

    def _barrier_unlocked(self) -> None:
        """:meth:`barrier` for callers that released the node lock: a plain file's
        fdatasync needs no lock, so guest requests on the image go on meanwhile."""
        if self.bs.cache_no_flush:
            return
        file = self.bs.file
        if file.drv == "file":
            file.impl.flush()
        else:
            file.flush()

    # --- pending snapshots ----------------------------------------------------------------
    def _settle_l2(self, l2off: int) -> None:
        """Give owed table ``l2off`` its snapshot references (caller holds the node lock).

        If the refcounts cannot be raised (overflow, corrupt table) every pending snapshot
        is abandoned: nothing of the failing table changed, so the image stays consistent
        (tables settled before leak a reference) and the caller's write goes on.
        """
        try:
            self._settle_tables([l2off])
        except (BlockError, OSError) as err:
            self._abandon_pending(err)

    def _settle_tables(self, offs: list[int]) -> None:
        """Give owed tables ``offs`` their snapshot references, all or nothing.

        Raises each table's refcount and every refcount of what it maps by the number of
        L1 entries that named it at the cut (summed over pending snapshots), clears
        QCOW_OFLAG_COPIED in the table and in those L1 entries (everything is shared now),
        so the next write copies on write.  Only in memory: a pending snapshot's shadow
        session writes the result (copies of the tables) at its commit.

        :raises ImageFormatError: a refcount would overflow or a table is corrupt; then
            nothing changed and the tables are still owed.
        """
        cb = self.cluster_bits
        counts: Counter = Counter()
        end = 0
        owed = [(off, self._owed[off]) for off in dict.fromkeys(offs) if self._owed.get(off)]
        for off, idx in owed:
            clusters, extra, tend = self._walk_l2_memo(off)
            one = Counter(clusters)
            if extra:
                one.update(extra)
            one[off >> cb] += 1
            for _ in idx:
                counts.update(one)
            end = max(end, tend, off + self.cluster_size)
        if not owed:
            return
        self.refs.update_clusters(counts, 1, end=end)
        copied = f.QCOW_OFLAG_COPIED
        for off, idx in owed:
            del self._owed[off]
            l2 = self.l2cache.get(off)
            before = bytes(l2[0::8])
            l2[0::8] = before.translate(_CLEAR_COPIED)
            if l2[0::8] != before:
                self.l2cache.mark_dirty(off)
            for i in set(idx):
                if self.l1[i] & f.L1E_OFFSET_MASK == off and self.l1[i] & copied:
                    self.l1[i] &= ~copied
                    self._shadow.l1_dirty = True

    def _abandon_pending(self, err: BaseException) -> None:
        """Settling failed: drop every pending snapshot (finish raises ``err``)."""
        for p in self._pending:
            p.failed = p.failed or err
        self._owed = {}

    def _snapshot_names(self) -> list[f.QCowSnapshot]:
        return self.snapshots + [p.sn for p in self._pending if not p.failed]

    def _find(self, snapshot_id: str | None, name: str | None) -> f.QCowSnapshot:
        for sn in self.snapshots:
            if (snapshot_id is None or sn.id_str == snapshot_id) and (name is None or sn.name == name):
                return sn
        raise SnapshotNotFound("Can't find the snapshot")

    def _find_id_or_name(self, id_or_name: str) -> f.QCowSnapshot:
        for sn in self.snapshots:
            if sn.id_str == id_or_name:
                return sn
        for sn in self.snapshots:
            if sn.name == id_or_name:
                return sn
        raise SnapshotNotFound("Can't find the snapshot")

    # --- public ---------------------------------------------------------------------------
    def snapshot_list(self) -> list[dict]:
        return [sn.info() for sn in self._snapshot_names()]

    def snapshot_create(self, name: str, *, vm_clock_ns: int = 0, date: float | None = None,
                        vm_state_size: int = 0, snapshot_id: str | None = None,
                        icount: int | None = None, unique_name: bool = True) -> dict:
        """Create a snapshot in one go (begin and finish under the caller's node lock)."""
        p = self.snapshot_create_begin(name, vm_clock_ns=vm_clock_ns, date=date,
                                       vm_state_size=vm_state_size, snapshot_id=snapshot_id,
                                       icount=icount, unique_name=unique_name)
        return self.snapshot_create_finish(p)

    def snapshot_create_begin(self, name: str, *, vm_clock_ns: int = 0, date: float | None = None,
                              vm_state_size: int = 0, snapshot_id: str | None = None,
                              icount: int | None = None, unique_name: bool = True) -> PendingSnapshot:
        """The cut: the snapshot holds exactly the active tree as it is now.

        ``unique_name=False`` lets a name repeat, as ``qemu-img snapshot -c`` does (QEMU's
        qcow2 driver only keeps ids unique; the QMP commands refuse a duplicate name).

        Call with the node lock held and no request in flight (drained).  No I/O beyond
        writing back cached metadata when no session is open; the work is O(L1 entries).
        Opens a shadow session (or joins the open one).  Then
        :meth:`snapshot_create_finish` (or :meth:`snapshot_create_cancel` before any
        request ran) must follow.
        """
        names = self._snapshot_names()
        if unique_name and any(sn.name == name for sn in names):
            raise BlockError(f"Snapshot with name '{name}' already exists")
        if len(names) >= f.QCOW_MAX_SNAPSHOTS:
            raise BlockError("Too many snapshots")
        if snapshot_id is None:
            ids = [int(sn.id_str) for sn in names if sn.id_str.isdigit()]
            snapshot_id = str(max(ids, default=0) + 1)
        elif any(sn.id_str == snapshot_id for sn in names):
            raise BlockError(f"Snapshot with id '{snapshot_id}' already exists")
        now = time.time() if date is None else date
        sec = int(now)
        sn = f.QCowSnapshot(0, len(self.l1), snapshot_id, name, date_sec=sec,
                            date_nsec=int((now - sec) * 1_000_000) * 1000, vm_clock_nsec=vm_clock_ns,
                            vm_state_size=vm_state_size, disk_size=self.size, icount=icount)
        tables = [self._l2_table_offset(i) for i in range(len(self.l1))]  # validates entries
        # The copy carries no QCOW_OFLAG_COPIED: everything in it is shared from now on,
        # and a later goto then never exposes stale flags.
        p = PendingSnapshot(sn, [e & ~f.QCOW_OFLAG_COPIED for e in self.l1], list(self.l1))
        if self._shadow is None:
            self._shadow_open().owner = p
        if "_pending" not in self.__dict__:     # the first begin on this image
            self._owed = {}
            self._pending = []
        for i, off in enumerate(tables):
            if off:
                self._owed.setdefault(off, []).append(i)
                p.tables.append(off)
        self._pending.append(p)
        return p

    def snapshot_create_cancel(self, p: PendingSnapshot) -> None:
        """Undo a begin while still drained (no request ran since): nothing was written."""
        if p.done or p not in self._pending:
            return
        self._pending.remove(p)
        p.done = True
        if p.failed:
            return
        for off in p.tables:
            idx = self._owed.get(off)
            if idx:
                idx.pop()
                if not idx:
                    del self._owed[off]
        if not self._pending:
            self._owed = {}
            s = self._shadow
            if s is not None and s.owner is p and not (s.fresh or s.zero or s.after or s.l1_dirty
                                                      or self.l2cache.dirty or self.refs.cache.dirty
                                                      or self.refs.pending_free):
                self._shadow_close()

    def snapshot_create_finish(self, p: PendingSnapshot, lock: Any = None) -> dict:
        """Settle what the guest has not, commit the session, make it durable.

        :param lock: the node lock; when given it is released between settle batches and
            for the last fdatasync, so guest requests keep running.  Without it the caller
            holds it.
        :raises BlockError: the snapshot could not be made (the image may leak clusters).
        """
        with self.__dict__.setdefault("_finish_lock", threading.Lock()):
            return self._snapshot_create_finish(p, lock)

    def _snapshot_create_finish(self, p: PendingSnapshot, lock: Any) -> dict:
        hold = lock if lock is not None else contextlib.nullcontext()
        barrier = self._barrier_unlocked if lock is not None else self.barrier
        # 1. Settle the owed tables a few per lock hold (in memory: refcounts raised, flags
        #    cleared); guest requests run between the batches.
        while lock is not None:
            with hold:
                todo = [off for off in p.tables if off in self._owed] if not p.done else []
                if not todo:
                    break
                try:
                    self._settle_tables(todo[:_SETTLE_BATCH])
                except (BlockError, OSError) as err:
                    self._abandon_pending(err)
        if lock is None and not p.done:
            # One-shot: all or nothing, as QEMU (a refcount that would overflow changes nothing).
            try:
                self._settle_tables([off for off in p.tables if off in self._owed])
            except (BlockError, OSError):
                self.snapshot_create_cancel(p)
                raise
        if lock is not None and not p.done:
            # Most of what the commit's fdatasync must cover (the guest's data, tables the
            # guest copied) is made durable first without the lock, so the one taken with
            # the lock held below covers only the commit's own few clusters.
            barrier()
        # 2. Commit (unless a guest flush did it meanwhile): new clusters, one header write.
        post = None
        with hold:
            if not p.done:
                s = self._shadow
                try:
                    post = self._shadow_switch(self.barrier)
                except BaseException as err:
                    if lock is None and s is self._shadow and s.owner is p and self._pending == [p]:
                        # Nothing ran in between (one-shot): forget the session.
                        self._shadow_abort()
                        self._drop_pending(p)
                    elif not p.done:
                        # The session stays open (it holds guest writes) and a later commit
                        # retries it, without this snapshot: the caller reports its failure.
                        p.failed = p.failed or err
                    raise
        if post is not None:
            # The header is durable (the snapshot exists; the caller may report it) before
            # the old metadata is freed.
            barrier()
            with hold:
                self._shadow_release(post)
        if p.failed:
            raise BlockError(f"Could not create snapshot '{p.sn.name}': {p.failed}")
        return p.sn.info()

    def _drop_pending(self, p: PendingSnapshot) -> None:
        p.done = True
        if p in self._pending:
            self._pending.remove(p)
        if not self._pending:
            self._owed = {}

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> dict:
        if snapshot_id is None and name is None:
            raise BlockError("One of the snapshot id or name must be given")
        sn = self._find(snapshot_id, name)
        self._settle_all()
        s = self._shadow_open()
        try:
            l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
            self.snapshots.remove(sn)
            s.snapshots_dirty = True
            # Its tree loses a reference (counts reaching 0 are freed after the switch),
            # its L1 copy goes after the switch, active clusters no longer shared get
            # QCOW_OFLAG_COPIED back (their tables are copied at the commit).
            changed = self._update_tree_refcounts(l1, -1)
            if sn.l1_size:
                s.after.append((sn.l1_table_offset, sn.l1_size * 8))
            self._fix_copied_flags(changed)
            post = self._shadow_switch(self.barrier)
        except BaseException:
            if self._shadow is s:
                self._shadow_abort()
                if sn not in self.snapshots:
                    self.snapshots.append(sn)
            raise
        self.barrier()
        self._shadow_release(post)
        return sn.info()

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None) -> None:
        """Make a read-only image read as one of its snapshots until closed (QEMU's
        qcow2_snapshot_load_tmp, for ``qemu-img convert -l``): the snapshot's L1 table
        replaces the active one in memory; the virtual size stays.  Nothing is written."""
        if not self.bs.read_only:
            raise BlockError("Device is not readonly")
        sn = next((sn for sn in self.snapshots
                   if (snapshot_id is None or sn.id_str == snapshot_id)
                   and (name is None or sn.name == name)), None)
        if sn is None or (snapshot_id is None and name is None):
            raise SnapshotNotFound("Can't find snapshot")
        l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        self.l1 = l1 + [0] * (len(self.l1) - len(l1)) if len(l1) < len(self.l1) else l1

    def snapshot_goto(self, id_or_name: str) -> dict:
        sn = self._find_id_or_name(id_or_name)
        self._settle_all()
        s = self._shadow_open()
        try:
            # Entries of the new active table start without QCOW_OFLAG_COPIED (their refcount
            # is at least 2 until the old tree is released); _fix_copied_flags sets them.
            sn_l1 = [e & ~f.QCOW_OFLAG_COPIED for e in self._read_l1(sn.l1_table_offset, sn.l1_size)]
            if sn.l1_size > len(self.l1):
                if sn.l1_size * 8 > f.QCOW_MAX_L1_SIZE:
                    raise BlockError("Active L1 table too large")
                self.l1 = self.l1 + [0] * (sn.l1_size - len(self.l1))
            new_l1 = sn_l1 + [0] * (len(self.l1) - len(sn_l1))
            # The snapshot's tree gets its extra reference, the old active tree loses one
            # (counts reaching 0 are freed after the switch), flags follow the counts; the
            # new active L1 and every table whose flags changed go to new clusters.
            changed = self._update_tree_refcounts(new_l1, +1)
            old_l1 = self.l1
            self.l1 = new_l1
            s.l1_dirty = True
            changed.update(self._update_tree_refcounts(old_l1, -1))
            self._fix_copied_flags(changed)
            if sn.disk_size is not None and sn.disk_size != self.header.size:
                s.size = sn.disk_size
            post = self._shadow_switch(self.barrier)
        except BaseException:
            if self._shadow is s:
                self._shadow_abort()
            raise
        self.barrier()
        self._shadow_release(post)
        return sn.info()

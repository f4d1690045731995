"""Internal snapshots: create, delete, list, goto — in QEMU's order of writes.

Each step's ordering invariant is written next to its flush.  Refcounts are always raised
before anything new points at clusters and lowered only after nothing does, so an
interrupted operation leaves an image that ``qemu-img check`` finds clean or leaking.

Creation has two halves so a running guest is held only for the first (the monitor's
``transaction``):

* :meth:`SnapshotMixin.snapshot_create_begin` (inside the drained section, O(L1), no I/O):
  takes the active L1 table as the snapshot's, and records every L2 table it references as
  *owed* its +1 (on the table and on each cluster it maps) and the loss of
  QCOW_OFLAG_COPIED;
* the guest then runs again.  The first write that needs an owed table settles it first
  (:meth:`SnapshotMixin._settle_l2`, called from ``_l2_for_write``): refcounts raised, flags
  cleared in the table and its L1 entries, so the ordinary copy-on-write path copies the
  table and its clusters instead of changing the snapshot's;
* :meth:`SnapshotMixin.snapshot_create_finish` (guest running; the caller's reply waits for
  it) settles the remaining tables one per lock hold, writes the L1 copy, the raised
  refcounts, the flags and the new snapshot table, makes them durable, then switches the
  header and makes that durable (two fdatasyncs, taken without the node lock so guest I/O
  continues).

Every settle is written back at once with the refcounts first (the guest's copy-on-write
flushes the refcounts and moves the L1 entry off the table; the finisher writes refcount
blocks, L1 and L2 tables back to back), so the window where flags and refcounts differ on
disk stays the few microseconds of one burst, as in the one-shot creation.
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


class SnapshotMixin:
    """Snapshot logic of :class:`~emu.block.qcow2.driver.Qcow2Driver` (state lives there)."""

    #: L2 table offset -> active L1 indices naming it, for tables a pending snapshot still
    #: owes a reference (empty and shared until the first begin gives the image its own).
    _owed: dict[int, list[int]] = {}
    #: snapshots begun and not finished or cancelled, oldest first
    _pending: list[PendingSnapshot] = []

    # --- helpers ------------------------------------------------------------------------
    def _flush_for_snapshot(self) -> None:
        self._write_caches()

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
        clusters, extra, tend = self._walk_l2(l2off, raw)
        if len(memo) >= _WALK_MEMO_TABLES:
            memo.clear()
        memo[l2off] = (bytes(norm), clusters, extra, tend)
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
            vals = list(map(changed.__getitem__, seen[0])) if seen and seen[0] else None
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
        self._l1_flags_dirty = getattr(self, "_l1_flags_dirty", False) or l1_changed

    def _write_tree_metadata(self) -> None:
        """Write refcount blocks, then the active L1 and L2 tables, back to back.

        Refcounts and QCOW_OFLAG_COPIED live in different clusters, so no write order keeps
        them equal at every instant (QEMU has the same window); building every buffer first
        and issuing the writes in one burst keeps that window to a few microseconds.
        Refcounts go first, so a crash can never leave a reference without its refcount.
        """
        for cache in (self.refs.cache, self.l2cache):
            if cache.validate:
                for off in cache.dirty:
                    cache.validate(off)
        writes = [(o, bytes(self.refs.cache.tables[o])) for o in sorted(self.refs.cache.dirty)]
        if getattr(self, "_l1_flags_dirty", False):
            writes.append((self.header.l1_table_offset, f.serialize_table(self.l1)))
        writes += [(o, bytes(self.l2cache.tables[o])) for o in sorted(self.l2cache.dirty)]
        for off, data in writes:
            self.file_write(off, data)
        self.refs.cache.dirty.clear()
        self.l2cache.dirty.clear()
        self._l1_flags_dirty = False

    def _write_snapshot_table(self) -> None:
        """QEMU's qcow2_write_snapshots: new table, then header, then free the old one."""
        new_off, old = self._stage_snapshot_table()
        # The new table and its refcounts reach the disk before the header points to it.
        self.barrier()
        self._switch_snapshot_table(new_off)
        # The header is durable before the old table may be freed (and reused).
        self.barrier()
        self._free_old_snapshot_table(old)

    def _stage_snapshot_table(self) -> tuple[int, tuple[int, int]]:
        """Write ``self.snapshots`` as a new table (and its refcount); the header still
        names the old one.  Returns the new offset and the old table's (offset, size)."""
        data = f.serialize_snapshot_table(self.snapshots)
        if len(data) > f.QCOW_MAX_SNAPSHOTS_SIZE:
            raise BlockError("Snapshot table too large")
        new_off = self.refs.alloc(len(data)) if data else 0
        if data:
            self.file_write(new_off, data)
        self.refs.flush()
        self._staged_table_size = len(data)
        return new_off, (self.header.snapshots_offset, self.snapshots_size)

    def _switch_snapshot_table(self, new_off: int) -> None:
        h = self.header
        h.nb_snapshots, h.snapshots_offset = len(self.snapshots), new_off
        self.file_write(60, struct.pack(">IQ", h.nb_snapshots, new_off))
        self.snapshots_size = self._staged_table_size
        self.invalidate_meta()

    def _free_old_snapshot_table(self, old: tuple[int, int]) -> None:
        # Only once the header no longer points at the old table may it be freed; its
        # refcount block goes out with the next flush (a crash before that leaks it).
        old_off, old_size = old
        if old_off and old_size:
            self.refs.update(old_off, old_size, -1)
            self.refs.flush()

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
        so the next write copies on write.  The caller writes the result back before
        releasing the lock.

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
                    self._l1_flags_dirty = True

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
        writing back cached metadata; the work is O(L1 entries).  Then
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
        self._flush_for_snapshot()
        tables = [self._l2_table_offset(i) for i in range(len(self.l1))]  # validates entries
        # The copy carries no QCOW_OFLAG_COPIED: everything in it is shared from now on,
        # and a later goto then never exposes stale flags.
        p = PendingSnapshot(sn, [e & ~f.QCOW_OFLAG_COPIED for e in self.l1], list(self.l1))
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

    def snapshot_create_finish(self, p: PendingSnapshot, lock: Any = None) -> dict:
        """Settle what the guest has not, write the snapshot, make it durable.

        :param lock: the node lock; when given it is taken per step and released for the
            fdatasyncs, so guest requests keep running.  Without it the caller holds it.
        :raises BlockError: the snapshot could not be made (the image may leak clusters).
        """
        # Finishes of one image take turns (a transaction may snapshot a device twice):
        # each stages a snapshot table and switches the header to it.
        with self.__dict__.setdefault("_finish_lock", threading.Lock()):
            return self._snapshot_create_finish(p, lock)

    def _snapshot_create_finish(self, p: PendingSnapshot, lock: Any) -> dict:
        hold = lock if lock is not None else contextlib.nullcontext()
        barrier = self._barrier_unlocked if lock is not None else self.barrier
        # 1. Settle the remaining owed tables, a few per lock hold (a millisecond or two), each
        #    batch written back in one burst (guest requests run between the batches).
        #    Without a lock to release, all at once: all or nothing, as QEMU.
        todo = list(p.tables)
        while todo and not p.failed:
            with hold:
                cut = len(todo) if lock is None else _SETTLE_BATCH
                batch, todo = todo[:cut], todo[cut:]
                try:
                    self._settle_tables(batch)
                except (BlockError, OSError) as err:
                    if lock is None:
                        self.snapshot_create_cancel(p)
                        raise
                    self._abandon_pending(err)
                self._write_tree_metadata()
        with hold:
            if p.failed:
                self._drop_pending(p)
                raise BlockError(f"Could not create snapshot '{p.sn.name}': {p.failed}")
            sn = p.sn
            try:
                # 2. The L1 copy, then (with its refcount) the new snapshot table.
                if p.l1:
                    sn.l1_table_offset = self.refs.alloc(len(p.l1) * 8)
                    self.file_write(sn.l1_table_offset, f.serialize_table(p.l1))
                self._write_tree_metadata()
                self._drop_pending(p)
                self.snapshots.append(sn)
                new_off, old = self._stage_snapshot_table()
            except BaseException:
                self._drop_pending(p)
                if sn in self.snapshots:
                    self.snapshots.remove(sn)
                raise
        try:
            # The L1 copy, every raised refcount and the new snapshot table reach the disk
            # before the header points at the table (nothing on disk refers to them yet, so a
            # crash up to here only leaks).
            barrier()
            with hold:
                self._switch_snapshot_table(new_off)
            # The header is durable (the snapshot exists; the caller may report it) before the
            # old table is freed.
            barrier()
        except BaseException:
            with hold:
                if sn in self.snapshots and self.header.snapshots_offset != new_off:
                    self.snapshots.remove(sn)
            raise
        with hold:
            self._free_old_snapshot_table(old)
        return sn.info()

    def _drop_pending(self, p: PendingSnapshot) -> None:
        p.done = True
        if p in self._pending:
            self._pending.remove(p)
        if not self._pending:
            self._owed = {}

    def _settle_all(self) -> None:
        """Settle every owed table now (before anything that walks or rewrites the tree)."""
        if self._owed:
            for off in list(self._owed):
                self._settle_l2(off)
            self._write_tree_metadata()

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> dict:
        if snapshot_id is None and name is None:
            raise BlockError("One of the snapshot id or name must be given")
        sn = self._find(snapshot_id, name)
        self._settle_all()
        self._flush_for_snapshot()
        l1 = self._read_l1(sn.l1_table_offset, sn.l1_size)
        # 1. Drop the snapshot from the table: after this nothing refers to its tree.
        self.snapshots.remove(sn)
        try:
            self._write_snapshot_table()
        except BaseException:
            self.snapshots.append(sn)
            raise
        # 2. Lower refcounts of its tree and free its L1 copy (a crash before this leaks only).
        changed = self._update_tree_refcounts(l1, -1)
        if sn.l1_size:
            self.refs.update(sn.l1_table_offset, sn.l1_size * 8, -1)
        # 3. Active clusters that are no longer shared get QCOW_OFLAG_COPIED back.
        self._fix_copied_flags(changed)
        # No fdatasync here: the header dropped the snapshot durably above; until these
        # writes are durable a power cut leaks what they free (or, if only part of the burst
        # lands, leaves the refcount/QCOW_OFLAG_COPIED window check -r all repairs).
        self._write_tree_metadata()
        self.invalidate_meta()
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
        self._flush_for_snapshot()
        # Entries of the new active table start without QCOW_OFLAG_COPIED (their refcount is
        # at least 2 until the old tree is released); _fix_copied_flags sets them afterwards.
        sn_l1 = [e & ~f.QCOW_OFLAG_COPIED for e in self._read_l1(sn.l1_table_offset, sn.l1_size)]
        if sn.l1_size > len(self.l1):
            self.grow_l1(sn.l1_size)
        new_l1 = sn_l1 + [0] * (len(self.l1) - len(sn_l1))
        # 1. The snapshot's tree gets its extra reference before the active L1 points to it.
        changed = self._update_tree_refcounts(new_l1, +1)
        self._write_caches()
        self.barrier()
        # 2. Overwrite the active L1 table in place.
        old_l1 = self.l1
        self.file_write(self.header.l1_table_offset, f.serialize_table(new_l1))
        self.barrier()
        self.l1 = new_l1
        self.invalidate_meta()
        # 3. Only now that nothing points at the old active tree, lower its refcounts.
        # Lower refcounts and recompute flags in memory, then write refcounts, L1 and L2
        # tables back to back (refcounts first, as everywhere).
        changed.update(self._update_tree_refcounts(old_l1, -1))
        self._fix_copied_flags(changed)
        self._write_tree_metadata()
        if sn.disk_size is not None and sn.disk_size != self.header.size:
            self.header.size = sn.disk_size
            self.file_write(24, struct.pack(">Q", sn.disk_size))
        self.barrier()
        return sn.info()

"""Internal snapshots: create, delete, list, goto — in QEMU's order of writes.

Each step's ordering invariant is written next to its flush.  Refcounts are always raised
before anything new points at clusters and lowered only after nothing does, so an
interrupted operation leaves an image that ``qemu-img check`` finds clean or leaking.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from functools import reduce
from operator import or_

from emu.block.qcow2 import format as f
from emu.errors import BlockError, ImageFormatError


#: bytes.translate table clearing bit 7 (QCOW_OFLAG_COPIED in an entry's first byte).
_CLEAR_COPIED = bytes(b & 0x7F for b in range(256))
#: bytes.translate table keeping only bit 6 (QCOW_OFLAG_COMPRESSED in an entry's first byte).
_ONLY_COMPRESSED = bytes(b & 0x40 for b in range(256))
#: L2 tables whose walk result is remembered (content-checked) between snapshot operations.
_WALK_MEMO_TABLES = 64


class SnapshotNotFound(BlockError):
    """No snapshot matches the given id/name."""


class SnapshotMixin:
    """Snapshot logic of :class:`~emu.block.qcow2.driver.Qcow2Driver` (state lives there)."""

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
        memo: dict[int, tuple[bytes, list[int], list[int], int]] = self.__dict__.setdefault("_walk_memo", {})
        for i in range(len(l1)):
            l2off = self._l2_table_offset(i, l1)
            if not l2off:
                continue
            raw = bytes(self.l2cache.get(l2off))
            # The walk depends only on the table's bytes without QCOW_OFLAG_COPIED (which
            # snapshots flip): reuse the last result for an unchanged table.
            norm = bytearray(raw)
            norm[0::8] = norm[0::8].translate(_CLEAR_COPIED)
            hit = memo.get(l2off)
            if hit is not None and hit[0] == norm:
                _, clusters, extra, tend = hit
            else:
                clusters, extra, tend = self._walk_l2(l2off, raw)
                if len(memo) >= _WALK_MEMO_TABLES:
                    memo.clear()
                memo[l2off] = (bytes(norm), clusters, extra, tend)
            counts.update(clusters)
            if extra:
                counts.update(extra)
            counts[l2off >> cb] += 1
            end = max(end, tend, l2off + cs)
            walked[l2off] = (clusters, bool(extra))
        self._walked = walked
        self._walk_end = end
        return counts

    def _walk_l2(self, l2off: int, raw: bytes) -> tuple[list[int], list[int], int]:
        """One L2 table: its data clusters (entry order), the host clusters its compressed
        clusters touch, and the highest byte (+1) they must find inside the file."""
        cb = self.cluster_bits
        cs = self.cluster_size
        mask = f.L2E_OFFSET_MASK
        comp = f.QCOW_OFLAG_COMPRESSED
        entries = struct.unpack(f">{self.l2_size}Q", raw)
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
        h = self.header
        data = f.serialize_snapshot_table(self.snapshots)
        if len(data) > f.QCOW_MAX_SNAPSHOTS_SIZE:
            raise BlockError("Snapshot table too large")
        new_off = self.refs.alloc(len(data)) if data else 0
        if data:
            self.file_write(new_off, data)
        # The new table and its refcounts reach the disk before the header points to it.
        self.refs.flush()
        self.barrier()
        old_off, old_size = h.snapshots_offset, self.snapshots_size
        h.nb_snapshots, h.snapshots_offset = len(self.snapshots), new_off
        self.file_write(60, struct.pack(">IQ", h.nb_snapshots, new_off))
        self.barrier()
        self.snapshots_size = len(data)
        self.invalidate_meta()
        # Only now that the header no longer points at the old table may it be freed.
        if old_off and old_size:
            self.refs.update(old_off, old_size, -1)
            self.refs.flush()

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
        return [sn.info() for sn in self.snapshots]

    def snapshot_create(self, name: str, *, vm_clock_ns: int = 0, date: float | None = None,
                        vm_state_size: int = 0, snapshot_id: str | None = None,
                        icount: int | None = None) -> dict:
        if any(sn.name == name for sn in self.snapshots):
            raise BlockError(f"Snapshot with name '{name}' already exists")
        if len(self.snapshots) >= f.QCOW_MAX_SNAPSHOTS:
            raise BlockError("Too many snapshots")
        if snapshot_id is None:
            ids = [int(sn.id_str) for sn in self.snapshots if sn.id_str.isdigit()]
            snapshot_id = str(max(ids, default=0) + 1)
        elif any(sn.id_str == snapshot_id for sn in self.snapshots):
            raise BlockError(f"Snapshot with id '{snapshot_id}' already exists")
        now = time.time() if date is None else date
        sec = int(now)
        sn = f.QCowSnapshot(0, len(self.l1), snapshot_id, name, date_sec=sec,
                            date_nsec=int((now - sec) * 1_000_000) * 1000, vm_clock_nsec=vm_clock_ns,
                            vm_state_size=vm_state_size, disk_size=self.size, icount=icount)
        self._flush_for_snapshot()
        # 1. A copy of the active L1 table.
        if self.l1:
            sn.l1_table_offset = self.refs.alloc(len(self.l1) * 8)
            # The copy carries no QCOW_OFLAG_COPIED: everything in it is shared from now on,
            # and a later goto then never exposes stale flags.
            self.file_write(sn.l1_table_offset,
                            f.serialize_table([e & ~f.QCOW_OFLAG_COPIED for e in self.l1]))
        # 2. Every cluster the snapshot shares gets one more reference; the active tree
        #    loses QCOW_OFLAG_COPIED where clusters are now shared.
        try:
            changed = self._update_tree_refcounts(self.l1, +1)
        except BaseException:
            if self.l1:
                self.refs.update(sn.l1_table_offset, len(self.l1) * 8, -1)
            raise
        self._fix_copied_flags(changed)
        # Raised refcounts and the L1 copy reach the disk before the snapshot table that uses them.
        self._write_tree_metadata()
        self.barrier()
        self.snapshots.append(sn)
        try:
            self._write_snapshot_table()
        except BaseException:
            self.snapshots.remove(sn)
            raise
        self.invalidate_meta()
        return sn.info()

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> dict:
        if snapshot_id is None and name is None:
            raise BlockError("One of the snapshot id or name must be given")
        sn = self._find(snapshot_id, name)
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
        self._write_tree_metadata()
        self.barrier()
        self.invalidate_meta()
        return sn.info()

    def snapshot_goto(self, id_or_name: str) -> dict:
        sn = self._find_id_or_name(id_or_name)
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

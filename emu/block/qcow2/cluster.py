"""Guest offset -> host cluster mapping: L1/L2 lookup, allocation with copy-on-write,
zero and compressed clusters, discard.

Write ordering (each step's data reaches the file before the next step's pointer):
guest data is written to a freshly allocated cluster, then its L2 entry is changed in the
L2 cache; the L2 cache flushes the refcount cache first; a new L2 table is written before
the L1 entry that points to it.  Clusters an L2 entry stops using are freed only after the
L2 table is on disk (deferred frees), so they are never reused while still referenced.
"""

from __future__ import annotations

import struct

from emu.block.qcow2 import format as f
from emu.errors import BlockError, ImageFormatError

UNALLOCATED, ZERO, NORMAL, COMPRESSED = "unallocated", "zero", "normal", "compressed"


class ClusterMixin:
    """L1/L2 logic of :class:`~emu.block.qcow2.driver.Qcow2Driver` (state lives there)."""

    # --- lookup -------------------------------------------------------------------------
    def _l2_table_offset(self, l1_index: int, l1: list[int] | None = None) -> int:
        l1 = self.l1 if l1 is None else l1
        if l1_index >= len(l1):
            return 0
        off = l1[l1_index] & f.L1E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise ImageFormatError(f"L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})")
        return off

    def _validate_l2(self, off: int) -> None:
        if off < self.cluster_size or off & (self.cluster_size - 1):
            raise ImageFormatError(f"L2 table offset {off:#x} invalid (points into the header or unaligned)")
        if off >= self.file_size_limit():
            raise ImageFormatError(f"L2 table offset {off:#x} is beyond the end of the image file")

    def _classify(self, e: int, l2off: int = 0, idx: int = 0) -> tuple[str, int]:
        if e & f.QCOW_OFLAG_COMPRESSED:
            return COMPRESSED, e
        if e & f.QCOW_OFLAG_ZERO:
            return ZERO, e & f.L2E_OFFSET_MASK
        host = e & f.L2E_OFFSET_MASK
        if not host:
            return UNALLOCATED, 0
        if host & (self.cluster_size - 1):
            raise ImageFormatError(f"Cluster allocation offset {host:#x} unaligned "
                                   f"(L2 offset: {l2off:#x}, L2 index: {idx:#x})")
        return NORMAL, host

    def _entry(self, l2: bytearray, i: int) -> int:
        return struct.unpack_from(">Q", l2, i * 8)[0]

    def _set_entry(self, l2: bytearray, i: int, v: int) -> None:
        struct.pack_into(">Q", l2, i * 8, v)

    def map_run(self, pos: int, maxlen: int) -> tuple[str, int, int]:
        """Map guest ``pos``: ``(kind, host_offset_or_entry, nbytes)`` for the longest run of
        same-kind (and, for data, host-contiguous) clusters within one L2 table."""
        cb = self.cluster_bits
        cs = self.cluster_size
        l1i = pos >> (cb + self.l2_bits)
        in_cluster = pos & (cs - 1)
        l2off = self._l2_table_offset(l1i)
        table_end = (l1i + 1) << (cb + self.l2_bits)
        limit = min(pos + maxlen, table_end)
        if not l2off:
            return UNALLOCATED, 0, limit - pos
        l2 = self.l2cache.get(l2off)
        i = (pos >> cb) & (self.l2_size - 1)
        kind, host = self._classify(self._entry(l2, i), l2off, i)
        if kind == COMPRESSED:
            return kind, host, min(limit, (pos | (cs - 1)) + 1) - pos
        n = cs - in_cluster
        nxt = host + cs
        j = i + 1
        while pos + n < limit:
            k2, h2 = self._classify(self._entry(l2, j), l2off, j)
            if k2 != kind or (kind == NORMAL and h2 != nxt):
                break
            n += cs
            nxt += cs
            j += 1
        return kind, (host + in_cluster if kind == NORMAL else host), min(n, limit - pos)

    # --- read ---------------------------------------------------------------------------
    def _decompress(self, entry: int) -> bytes:
        off, size = self.clayout.decode(entry)
        fsize = self.file_size_limit()
        if off >= fsize:
            raise ImageFormatError(f"Compressed cluster at {off:#x} is beyond the end of the image file")
        size = min(size, fsize - off)
        raw = self.file_read(off, size)
        import zlib  # here: loading it costs every emu-img start-up ~5 ms
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw, self.cluster_size)
        except zlib.error as err:
            raise ImageFormatError(f"Could not decompress cluster at {off:#x}: {err}") from err
        if len(out) != self.cluster_size:
            raise ImageFormatError(f"Could not decompress cluster at {off:#x}: short data")
        return out

    def read(self, offset: int, length: int) -> bytes:
        out = []
        pos, end = offset, offset + length
        while pos < end:
            kind, host, n = self.map_run(pos, end - pos)
            if kind == NORMAL:
                out.append(self.file_read(host, n))
            elif kind == ZERO:
                out.append(bytes(n))
            elif kind == UNALLOCATED:
                out.append(self.bs.read_backing(pos, n))
            else:
                ic = pos & (self.cluster_size - 1)
                out.append(self._decompress(host)[ic:ic + n])
            pos += n
        return b"".join(out)

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        kind, host, n = self.map_run(offset, length)
        if kind == NORMAL:
            return "data", n, host
        if kind == COMPRESSED:
            return "data", n, None
        if kind == ZERO:
            return "zero", n, None
        return ("unallocated" if self.bs.backing is not None else "zero-unallocated"), n, None

    # --- write --------------------------------------------------------------------------
    def _old_cluster(self, e: int, guest_cluster: int) -> bytes:
        kind, host = self._classify(e)
        if kind == NORMAL:
            return self.file_read(host, self.cluster_size)
        if kind == COMPRESSED:
            return self._decompress(host)
        if kind == ZERO:
            return bytes(self.cluster_size)
        return self.bs.read_backing(guest_cluster, self.cluster_size)

    def _free_entry_later(self, e: int) -> None:
        if e & f.QCOW_OFLAG_COMPRESSED:
            coff = e & self.clayout.offset_mask
            nb = ((e >> self.clayout.csize_shift) & self.clayout.csize_mask) + 1
            self.refs.defer_free(coff & ~511, nb * 512)
        elif e & f.L2E_OFFSET_MASK:
            self.refs.defer_free(e & f.L2E_OFFSET_MASK, self.cluster_size)

    def _l2_for_write(self, l1i: int) -> tuple[int, bytearray]:
        old = self._l2_table_offset(l1i)
        if old in self._owed:
            # A snapshot begun at the last cut still owes this table its references: settle
            # it (flags cleared) so the copy-on-write below keeps the snapshot's data.
            self._settle_l2(old)
        l1e = self.l1[l1i]
        if old and l1e & f.QCOW_OFLAG_COPIED:
            return old, self.l2cache.get(old)
        content = bytes(self.l2cache.get(old)) if old else bytes(self.cluster_size)
        new = self.refs.alloc(self.cluster_size)
        # The new table's refcount is on disk before anything points at the table.
        self.refs.flush()
        self.check_metadata_overlap(new, self.cluster_size, allow_l2=True)
        self.file_write(new, content)
        # The L2 table is on disk before the L1 entry that points to it.
        self.l1[l1i] = new | f.QCOW_OFLAG_COPIED
        if self._shadow is not None:
            self._shadow.l1_dirty = True    # a snapshot session writes a new L1 at its commit
        else:
            self.file_write(self.header.l1_table_offset + l1i * 8, struct.pack(">Q", self.l1[l1i]))
        self.invalidate_meta()
        if old:
            self.refs.defer_free(old, self.cluster_size)
        t = self.l2cache.put_new(new, content)
        self.l2cache.dirty.discard(new)
        return new, t

    def write(self, offset: int, data: bytes) -> None:
        self.mark_dirty_for_write()
        cs, cb = self.cluster_size, self.cluster_bits
        pos, end = offset, offset + len(data)
        view = memoryview(data)
        while pos < end:
            l1i = pos >> (cb + self.l2_bits)
            if l1i >= len(self.l1):
                raise BlockError("Write beyond the L1 table")
            seg_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            l2off, l2 = self._l2_for_write(l1i)
            while pos < seg_end:
                i = (pos >> cb) & (self.l2_size - 1)
                e = self._entry(l2, i)
                kind, host = self._classify(e, l2off, i)
                if kind == NORMAL and e & f.QCOW_OFLAG_COPIED:
                    # In place: extend over following in-place, contiguous clusters.
                    n = cs - (pos & (cs - 1))
                    j = i + 1
                    while pos + n < seg_end:
                        e2 = self._entry(l2, j)
                        k2, h2 = self._classify(e2, l2off, j)
                        if not (k2 == NORMAL and e2 & f.QCOW_OFLAG_COPIED and h2 == host + (j - i) * cs):
                            break
                        n += cs
                        j += 1
                    n = min(n, seg_end - pos)
                    hpos = host + (pos & (cs - 1))
                    if host + (j - i) * cs > self.file_size_limit():
                        # A valid image never maps data past its end; refuse to scatter writes.
                        raise ImageFormatError(f"Cluster at {host:#x} (L2 index {i:#x}) is beyond the "
                                               "end of the image file")
                    self.check_metadata_overlap(hpos, n)
                    self.file_write(hpos, view[pos - offset:pos - offset + n])
                    pos += n
                    continue
                # Allocation: a run of clusters that are not in-place writable.
                j = i + 1
                jmax = i + (((seg_end - 1) >> cb) - (pos >> cb)) + 1
                if l2.count(0, (i + 1) * 8, jmax * 8) == (jmax - i - 1) * 8:
                    j = jmax  # all unallocated (a fresh image): no per-cluster look
                while j < jmax:
                    e2 = self._entry(l2, j)
                    if e2 & f.QCOW_OFLAG_COPIED and self._classify(e2, l2off, j)[0] == NORMAL:
                        break
                    j += 1
                k = j - i
                first_cluster = pos & ~(cs - 1)
                run_end = min(seg_end, first_cluster + k * cs)
                new = self.refs.alloc(k * cs)
                self.check_metadata_overlap(new, k * cs)
                head = pos - first_cluster
                parts = []
                if head:
                    parts.append(self._old_cluster(e, first_cluster)[:head])
                parts.append(view[pos - offset:run_end - offset])
                tail_cluster = (run_end - 1) & ~(cs - 1)
                if run_end & (cs - 1):
                    old_tail = self._entry(l2, i + k - 1)
                    parts.append(self._old_cluster(old_tail, tail_cluster)[run_end & (cs - 1):])
                buf = b"".join(bytes(p) if isinstance(p, memoryview) else p for p in parts) \
                    if len(parts) > 1 else parts[0]
                self.file_write(new, buf)
                l2 = self.l2cache.get(l2off)
                if l2.count(0, i * 8, (i + k) * 8) != k * 8:
                    for m in range(k):
                        self._free_entry_later(self._entry(l2, i + m))
                first = new | f.QCOW_OFLAG_COPIED
                struct.pack_into(f">{k}Q", l2, i * 8, *range(first, first + k * cs, cs))
                self.l2cache.mark_dirty(l2off)
                pos = run_end
        if self.writethrough:
            self.flush()

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster (the image's last one may be short) compressed, as
        ``qemu-img convert -c`` does; incompressible data is written normally."""
        cs = self.cluster_size
        if offset & (cs - 1) or len(data) > cs or (len(data) < cs and offset + len(data) != self.size):
            raise BlockError("Compressed writes must cover exactly one cluster")
        data = bytes(data) + bytes(cs - len(data))
        import zlib
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        comp = c.compress(data) + c.flush()
        if len(comp) >= cs - 512:
            self.write(offset, data[:min(cs, self.size - offset)])
            return
        self.mark_dirty_for_write()
        l1i = offset >> (self.cluster_bits + self.l2_bits)
        l2off, l2 = self._l2_for_write(l1i)
        host = self._alloc_bytes(len(comp))
        self.check_metadata_overlap(host, len(comp))
        self.file_write(host, comp)
        l2 = self.l2cache.get(l2off)
        i = (offset >> self.cluster_bits) & (self.l2_size - 1)
        self._free_entry_later(self._entry(l2, i))
        self._set_entry(l2, i, self.clayout.encode(host, len(comp)))
        self.l2cache.mark_dirty(l2off)

    def _alloc_bytes(self, size: int) -> int:
        """Byte-granular allocation for compressed data (QEMU's qcow2_alloc_bytes)."""
        cs = self.cluster_size
        refs = self.refs
        off = self.free_byte_offset
        if off and refs.get(off >> self.cluster_bits) >= refs.max_refcount:
            off = 0
        free_in = cs - (off & (cs - 1)) if off else 0
        if not off or free_in < size:
            while True:
                cand = refs._alloc_noref(1)
                if refs._ensure_blocks(cand, 1):
                    continue
                break
            cand <<= self.cluster_bits
            if not off or ((off + cs - 1) & ~(cs - 1)) != cand:
                off = cand
        self.note_allocated(off + size)
        refs.update(off, size, 1, allocating=True)
        self.free_byte_offset = off + size if (off + size) & (cs - 1) else 0
        return off

    # --- zeroes and discard --------------------------------------------------------------
    def _zero_clusters(self, offset: int, length: int, zero_flag: bool) -> None:
        """Set whole clusters to zero-flag (or unallocated) entries and free their data."""
        cs, cb = self.cluster_size, self.cluster_bits
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos >> (cb + self.l2_bits)
            seg_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            if not self._l2_table_offset(l1i) and not zero_flag:
                pos = seg_end
                continue
            l2off, l2 = self._l2_for_write(l1i)
            for c in range(pos, seg_end, cs):
                i = (c >> cb) & (self.l2_size - 1)
                e = self._entry(l2, i)
                new = f.QCOW_OFLAG_ZERO if zero_flag else 0
                if e == new:
                    continue
                self._free_entry_later(e)
                self._set_entry(l2, i, new)
            self.l2cache.mark_dirty(l2off)
            pos = seg_end

    def _split_aligned(self, offset: int, length: int) -> tuple[int, int, int]:
        cs = self.cluster_size
        end = offset + length
        a = (offset + cs - 1) & ~(cs - 1)
        b = end & ~(cs - 1)
        if end == self.size:
            b = (end + cs - 1) & ~(cs - 1)  # the image's short last cluster counts as whole
        return a, max(a, b), end

    def write_zeroes(self, offset: int, length: int) -> None:
        a, b, end = self._split_aligned(offset, length)
        if b <= a or (self.version < 3 and self.bs.backing is not None):
            self.write(offset, bytes(length))
            return
        self.mark_dirty_for_write()
        if a > offset:
            self.write(offset, bytes(a - offset))
        zero_flag = self.version >= 3
        self._zero_clusters(a, min(b, self.l1_coverage()) - a, zero_flag)
        if end > b:
            self.write(b, bytes(end - b))

    def discard(self, offset: int, length: int) -> None:
        """A guest discard as QEMU 7.2's qcow2_co_pdiscard / discard_in_l2_slice
        (full_discard=false): partial clusters are ignored (the image's short last cluster
        counts as whole); refused on a v2 image with a backing file (it cannot read as zeroes
        there).  Every whole cluster that is allocated (data, compressed, preallocated
        zero) -- or any cluster when there is a backing file -- becomes a zero cluster on v3
        and unallocated on v2; the rest stay as they are.  As QEMU's get_cluster_table, each
        L2 table touched is allocated (or copied from a snapshot's) even when no entry
        changes.  Host clusters whose refcount drops to 0 are discarded in the image file
        (punched) when ``pass-discard-request`` is on (QEMU's default under discard=unmap,
        the only way a discard reaches the driver)."""
        a, b, _ = self._split_aligned(offset, length)
        if b <= a:
            return
        backing = self.bs.backing is not None
        if backing and self.version < 3:
            return
        self.mark_dirty_for_write()
        cs, cb = self.cluster_size, self.cluster_bits
        new = f.QCOW_OFLAG_ZERO if self.version >= 3 else 0
        freed: list[int] = []
        pos, end = a, min(b, self.l1_coverage())
        while pos < end:
            l1i = pos >> (cb + self.l2_bits)
            seg_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            l2off, l2 = self._l2_for_write(l1i)
            changed = False
            for c in range(pos, seg_end, cs):
                i = (c >> cb) & (self.l2_size - 1)
                e = self._entry(l2, i)
                if e == new:
                    continue
                compressed = bool(e & f.QCOW_OFLAG_COMPRESSED)
                if not backing and not compressed and not e & f.L2E_OFFSET_MASK:
                    continue        # unallocated or a plain zero cluster: reads as zeroes already
                self._set_entry(l2, i, new)
                self._free_entry_later(e)
                freed.append(e & self.clayout.offset_mask & ~(cs - 1) if compressed
                             else e & f.L2E_OFFSET_MASK)
                changed = True
            if changed:
                self.l2cache.mark_dirty(l2off)
            pos = seg_end
        freed = [h for h in freed if h]
        if freed and self.pass_discard_request and self._shadow is None:
            # The L2 tables reach the file before the refcounts drop (as every free here),
            # then the clusters now unused are punched, merged into runs as QEMU's
            # update_refcount_discard; none can be reused in between.
            self._write_caches()
            runs: list[list[int]] = []
            for h in sorted(set(freed)):
                if self.refs.get(h >> cb):
                    continue
                if runs and runs[-1][1] == h:
                    runs[-1][1] = h + cs
                else:
                    runs.append([h, h + cs])
            for s0, s1 in runs:
                self.bs.file.discard(s0, s1 - s0)

    def preallocate_metadata(self) -> None:
        """Allocate every L2 table and data cluster (preallocation=metadata); data reads as zero."""
        cs, cb = self.cluster_size, self.cluster_bits
        pos, end = 0, self.size
        last = 0
        while pos < end:
            l1i = pos >> (cb + self.l2_bits)
            seg_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            l2off, l2 = self._l2_for_write(l1i)
            i0 = (pos >> cb) & (self.l2_size - 1)
            k = (seg_end - pos + cs - 1) >> cb
            new = self.refs.alloc(k * cs)
            l2 = self.l2cache.get(l2off)
            for m in range(k):
                self._set_entry(l2, i0 + m, (new + m * cs) | f.QCOW_OFLAG_COPIED)
            self.l2cache.mark_dirty(l2off)
            last = max(last, new + k * cs)
            pos = seg_end
        if last > self.bs.file.size:
            self.bs.file.truncate(last)

"""qcow2 consistency check and repair, as ``qemu-img check [-r leaks|all]`` does it.

The check works on the image *file* alone (no driver state): it reads the header, the
active and snapshot L1/L2 tables, the snapshot table and the refcount table/blocks,
builds an in-memory refcount table (the "IMRT") from every reference it finds, and
compares it with the refcounts stored on disk.  Messages (stderr) and counters follow
QEMU 7.2's ``block/qcow2-refcount.c`` so that ``emu-img check`` prints what
``qemu-img check`` prints for the same image.

Repair order (each step only runs when the previous left no internal error):

1. refcount mismatches are fixed in place (``-r leaks``: refcount too high;
   ``-r all``: also too low but non-zero);
2. if a referenced cluster has no refcount at all, or a refblock itself is broken,
   and ``-r all`` was given, the refcount structure is *rebuilt*: new refblocks and a
   new reftable are written after the end of the file, then the header is switched to
   them (one 12-byte write: "new refcounts reach the disk before the header points at
   them"), and the old structures become leaks that step 1 frees;
3. OFLAG_COPIED is made to agree with the refcounts (L1 entries, then L2 entries);
4. with no corruption left, the dirty and corrupt header bits are cleared.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from emu.errors import ImageFormatError, ImageOpenError

from emu.block.qcow2 import format as fmt
from emu.block.qcow2.format import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                                    L2E_STD_RESERVED_MASK, QCOW2_INCOMPAT_CORRUPT,
                                    QCOW2_INCOMPAT_DIRTY, QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE,
                                    QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE, QCOW_OFLAG_COMPRESSED,
                                    QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, REFT_OFFSET_MASK)

#: Header field offsets rewritten by repairs.
REFCOUNT_TABLE_OFFSET_FIELD = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
INCOMPAT_FEATURES_FIELD = 72
REFT_RESERVED_MASK = 0x1FF

#: ``fix`` bits, as QEMU's BdrvCheckMode.
FIX_LEAKS = 1
FIX_ERRORS = 2

_EIO = "Input/output error"


def _hx(v: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x..`` otherwise."""
    return f"{v:#x}" if v else "0"


@dataclass
class CheckResult:
    """Counters of one check run, as QEMU's BdrvCheckResult + BlockFragInfo."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclass
class _Snapshot:
    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int


@dataclass
class _Image:
    """Header fields the check needs, parsed from the file."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    refcount_order: int = 4
    snapshots_size: int = 0
    snapshots: list[_Snapshot] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _open_error(path: str, msg: str) -> ImageFormatError:
    return ImageFormatError(f"Could not open '{path}': {msg}")


def read_header(io: "FileIO | NodeIO", path: str, snapshots: bool = True) -> _Image:
    """Parse and validate the header, as QEMU's qcow2_do_open does before a check.

    :param io: the image bytes (:class:`FileIO` or :class:`NodeIO`).
    :param snapshots: also read the snapshot table (a check reads it itself, as QEMU's
        check mode does, so that its errors are check errors rather than open errors).
    :param path: the file name, for messages.
    :raises ImageFormatError: with QEMU's text when the image cannot be opened.
    """
    file_size = io.length()
    # bdrv_pread semantics: a short file reads as zeros past its end (QEMU's messages follow).
    first = io.pread(0, max(min(file_size, 1 << fmt.MAX_CLUSTER_BITS), 4096))
    try:
        h = fmt.parse_header(first)
        fmt.check_features(h)
    except ImageFormatError as err:
        raise _open_error(path, str(err)) from None
    img = _Image(h.version, h.cluster_bits, h.size, h.l1_size, h.l1_table_offset,
                 h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                 h.snapshots_offset, h.incompatible_features, h.refcount_order)
    cs = img.cluster_size
    rt_off, rt_clusters, l1_off, l1_size = (h.refcount_table_offset, h.refcount_table_clusters,
                                            h.l1_table_offset, h.l1_size)
    # Table checks as QEMU's qcow2_validate_table (size limit, then offset sanity).
    if rt_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
        raise _open_error(path, "Reference count table too large")
    if rt_clusters == 0:
        raise _open_error(path, "Image does not contain a reference count table")
    if rt_off % cs or rt_off > (1 << 63) - 1 - rt_clusters * cs:
        raise _open_error(path, "Reference count table offset invalid")
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS and snapshots:
        raise _open_error(path, "Snapshot table too large")
    if l1_size > QCOW_MAX_L1_SIZE // 8:
        raise _open_error(path, "Active L1 table too large")
    if l1_size and (l1_off % cs or l1_off > (1 << 63) - 1 - l1_size * 8):
        raise _open_error(path, "Active L1 table offset invalid")
    # The L1 table must cover the virtual size (QEMU: "L1 table is too small").
    l2_bits = h.cluster_bits - 3
    need = -(-h.size // (1 << (h.cluster_bits + l2_bits))) if h.size else 0
    if need > 0x7FFFFFFF:
        raise _open_error(path, "Image is too big")
    if l1_size < need:
        raise _open_error(path, "L1 table is too small")
    if h.extension_error:     # QEMU reads the header extensions after the tables
        raise _open_error(path, h.extension_error)
    if h.nb_snapshots and snapshots:
        snap_off = h.snapshots_offset
        if snap_off % cs or snap_off >= file_size:
            raise _open_error(path, "Snapshot table offset invalid")
        # Reads past EOF see zeros (bdrv_pread): the last entry need not be padded on disk.
        buf = io.pread(snap_off, min(QCOW_MAX_SNAPSHOTS_SIZE, file_size - snap_off)) + bytes(8)
        try:
            snaps = fmt.parse_snapshot_table(buf, h.nb_snapshots)
        except ImageFormatError as err:
            raise _open_error(path, f"Failed to read snapshot table: {err}") from None
        img.snapshots = [_Snapshot(s.id_str, s.name, s.l1_table_offset, s.l1_size) for s in snaps]
        img.snapshots_size = sum(
            (fmt.SNAPSHOT_HEADER.size + s.extra_data_size + len(s.id_str.encode()) + len(s.name.encode()) + 7) & ~7
            for s in snaps)
    return img


class FileIO:
    """Image bytes through a Python file object (emu-img check works on the file alone)."""

    def __init__(self, f) -> None:
        self.f = f
        self.f.seek(0, os.SEEK_END)
        #: Cached size: the check asks for it once per reference.
        self._len = self.f.tell()

    def length(self) -> int:
        return self._len

    def pread(self, offset: int, length: int) -> bytes:
        """Read like bdrv_pread: zeros past the end of the file."""
        if offset >= self.length():
            return bytes(length)
        self.f.seek(offset)
        data = self.f.read(length)
        return data + bytes(length - len(data))

    def pwrite(self, offset: int, data: bytes) -> None:
        self.f.seek(offset)
        self.f.write(data)
        self._len = max(self._len, offset + len(data))

    def truncate(self, size: int) -> None:
        self.f.truncate(size)
        self._len = size

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())


class NodeIO:
    """Image bytes through the protocol node of an open qcow2 driver (repair on open)."""

    def __init__(self, node) -> None:
        self.node = node
        self._len = node.size

    def length(self) -> int:
        return self._len

    def pread(self, offset: int, length: int) -> bytes:
        size = self.node.size
        n = max(0, min(length, size - offset))
        data = self.node.read(offset, n) if n else b""
        return data + bytes(length - n)

    def pwrite(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self._len:
            self.truncate(offset + len(data))
        self.node.write(offset, data)

    def truncate(self, size: int) -> None:
        self.node.truncate(size)
        self._len = size

    def sync(self) -> None:
        self.node.flush()


class _Checker:
    """One check (and optional repair) pass over an open image file."""

    def __init__(self, io: FileIO | NodeIO, img: _Image, log: Callable[[str], None]) -> None:
        self.io = io
        self.img = img
        self.log = log
        self.cs = img.cluster_size
        self.cbits = img.cluster_bits
        self.l2_size = self.cs // 8
        self.refcount_bits = 1 << img.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.refblock_bits = self.cbits - (img.refcount_order - 3)
        self.refblock_entries = 1 << self.refblock_bits
        self.reftable: list[int] = self._read_u64s(img.refcount_table_offset,
                                                   img.refcount_table_clusters * self.cs // 8)
        self._refblock_cache: dict[int, bytearray] = {}
        self._decoded_cache: dict[int, list[int]] = {}
        self._corruption_signaled = False
        #: Program name for the lines QEMU prints through error_report.
        self.prog = "emu-img"
        #: Set by :meth:`run` when repairing (the image is open read/write).
        self.writable = False

    def signal_corruption(self, msg: str) -> None:
        """QEMU's qcow2_signal_corruption: reported once; a writable image gets the corrupt bit."""
        if self._corruption_signaled:
            return
        self._corruption_signaled = True
        if self.writable and self.img.version >= 3:
            self.log(f"qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed\n")
            self.img.incompatible |= QCOW2_INCOMPAT_CORRUPT
            self.pwrite(INCOMPAT_FEATURES_FIELD, struct.pack(">Q", self.img.incompatible))
        else:
            self.log(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed\n")

    # -- raw I/O -------------------------------------------------------------------
    def file_length(self) -> int:
        return self.io.length()

    def pread(self, offset: int, length: int) -> bytes:
        return self.io.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.io.pwrite(offset, data)

    def _read_u64s(self, offset: int, count: int) -> list[int]:
        data = self.pread(offset, count * 8)
        return list(struct.unpack(f">{count}Q", data))

    # -- refcounts on disk -------------------------------------------------------------
    def _refblock(self, offset: int) -> bytearray:
        blk = self._refblock_cache.get(offset)
        if blk is None:
            blk = bytearray(self.pread(offset, self.cs))
            self._refblock_cache[offset] = blk
        return blk

    def _decoded(self, offset: int) -> list[int]:
        """All entries of a refblock as ints (decoded once; per-entry decoding is slow)."""
        vals = self._decoded_cache.get(offset)
        if vals is None:
            blk = self._refblock(offset)
            width = {4: "H", 5: "I", 6: "Q", 3: "B"}.get(self.img.refcount_order)
            if width is not None:
                vals = list(struct.unpack(f">{self.refblock_entries}{width}", bytes(blk)))
            else:
                vals = [self._get_entry(blk, i) for i in range(self.refblock_entries)]
            self._decoded_cache[offset] = vals
        return vals

    def _get_entry(self, blk: bytes | bytearray, index: int) -> int:
        return fmt.read_refcount(blk, index, self.img.refcount_order)

    def _set_entry(self, blk: bytearray, index: int, value: int) -> None:
        fmt.write_refcount(blk, index, self.img.refcount_order, value)

    def get_refcount(self, cluster: int) -> int | None:
        """The refcount stored on disk; ``None`` (after logging nothing) on an I/O-level error."""
        rt_index = cluster >> self.refblock_bits
        if rt_index >= len(self.reftable):
            return 0
        rb_off = self.reftable[rt_index] & REFT_OFFSET_MASK
        if not rb_off:
            return 0
        if rb_off & (self.cs - 1):
            self.signal_corruption(f"Refblock offset {_hx(rb_off)} unaligned (reftable index: {_hx(rt_index)})")
            return None  # QEMU: -EIO ("Can't get refcount for cluster N")
        if rb_off > (1 << 63) - 1 - self.cs:
            return None
        return self._decoded(rb_off)[cluster & (self.refblock_entries - 1)]

    def set_refcount(self, cluster: int, value: int) -> bool:
        """Write one refcount into its existing refblock; False when there is none."""
        rt_index = cluster >> self.refblock_bits
        if rt_index >= len(self.reftable):
            return False
        rb_off = self.reftable[rt_index] & REFT_OFFSET_MASK
        if not rb_off or rb_off & (self.cs - 1):
            return False
        blk = self._refblock(rb_off)
        index = cluster & (self.refblock_entries - 1)
        self._set_entry(blk, index, value)
        if rb_off in self._decoded_cache:
            self._decoded_cache[rb_off][index] = value
        width_bytes = max(self.refcount_bits // 8, 1)
        byte = (index * self.refcount_bits) // 8
        self.pwrite(rb_off + byte, bytes(blk[byte:byte + width_bytes]))
        return True

    # -- the in-memory refcount table ----------------------------------------------------------
    def inc_refcounts(self, res: CheckResult, imrt: list[int], offset: int, size: int) -> None:
        """QEMU's qcow2_inc_refcounts_imrt: count one reference for each cluster of a range."""
        if size <= 0:
            return
        file_len = self.file_length()
        if offset + size - file_len >= self.cs:
            self.log("ERROR: counting reference for region exceeding the end of the file by one "
                     f"cluster or more: offset 0x{offset:x} size 0x{size:x}\n")
            res.corruptions += 1
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        if last >= len(imrt):
            imrt.extend([0] * (last + 1 - len(imrt)))
        for k in range(first, last + 1):
            if imrt[k] == self.refcount_max:
                self.log(f"ERROR: overflow cluster offset=0x{k << self.cbits:x}\n")
                self.log("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for writing\n")
                res.corruptions += 1
                continue
            imrt[k] += 1

    def check_l2(self, res: CheckResult, imrt: list[int], l2_offset: int, frag: bool, fix: int) -> None:
        """QEMU's check_refcounts_l2."""
        entries = self._read_u64s(l2_offset, self.l2_size)
        next_contiguous = 0
        compressed_shift = 62 - (self.cbits - 8)
        offset_mask = (1 << compressed_shift) - 1
        for i, entry in enumerate(entries):
            if entry & QCOW_OFLAG_COMPRESSED:
                if entry & QCOW_OFLAG_COPIED:
                    self.log(f"ERROR: coffset=0x{entry & offset_mask:x}: copied flag must never be "
                             "set for compressed clusters\n")
                    entry &= ~QCOW_OFLAG_COPIED
                    res.corruptions += 1
                coffset = entry & offset_mask
                nb_sectors = ((entry & ~QCOW_OFLAG_COMPRESSED) >> compressed_shift) + 1
                csize = nb_sectors * 512 - (coffset & 511)
                self.inc_refcounts(res, imrt, coffset, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.log(f"ERROR found l2 entry with reserved bits set: {entry:x}\n")
                res.corruptions += 1
            offset = entry & L2E_OFFSET_MASK
            if not offset:
                continue  # unallocated or plain zero cluster
            if offset & (self.cs - 1):
                res.corruptions += 1
                if entry & QCOW_OFLAG_ZERO:
                    self.log(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                             "Preallocated cluster is not properly aligned; L2 entry corrupted.\n")
                    if fix & FIX_ERRORS:
                        # Make it a plain zero cluster; the offset is then no reference.
                        self.pwrite(l2_offset + i * 8, struct.pack(">Q", QCOW_OFLAG_ZERO))
                        self.io.sync()
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        continue
                else:
                    self.log(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.\n")
            if frag:
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + self.cs
            self.inc_refcounts(res, imrt, offset, self.cs)

    def check_l1(self, res: CheckResult, imrt: list[int], l1_offset: int, l1_size: int,
                 frag: bool, fix: int) -> None:
        """QEMU's check_refcounts_l1."""
        if not l1_size:
            return
        self.inc_refcounts(res, imrt, l1_offset, l1_size * 8)
        for entry in self._read_u64s(l1_offset, l1_size):
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.log(f"ERROR found L1 entry with reserved bits set: {entry:x}\n")
                res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc_refcounts(res, imrt, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.log(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted\n")
                res.corruptions += 1
            self.check_l2(res, imrt, l2_offset, frag, fix)

    def check_refblocks(self, res: CheckResult, imrt: list[int], fix: int) -> bool:
        """QEMU's check_refblocks; returns whether the refcount structure needs a rebuild."""
        rebuild = False
        for i, raw in enumerate(self.reftable):
            offset = raw & REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if raw & REFT_RESERVED_MASK:
                self.log(f"ERROR refcount table entry {i} has reserved bits set\n")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.log(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted\n")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(imrt) and cluster >= self._nb_clusters():
                res.corruptions += 1
                self.log(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image\n")
                if fix & FIX_ERRORS:
                    # Grow the file so that the refblock is inside it (it then reads as zeros).
                    # A hostile offset far past the end is not followed: that would make a huge
                    # file and an in-memory table to match (QEMU fails with ENOMEM/EFBIG there).
                    flen = self.file_length()
                    if offset + self.cs > flen + max(flen, 64 << 20):
                        self.log(f"{self.prog}: Could not resize file: File too large\n")
                        self.log("ERROR could not resize image: File too large\n")
                        rebuild = True
                        continue
                    self.io.truncate(offset + self.cs)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc_refcounts(res, imrt, offset, self.cs)
                continue
            if offset:
                self.inc_refcounts(res, imrt, offset, self.cs)
                if cluster < len(imrt) and imrt[cluster] != 1:
                    self.log(f"ERROR refcount block {i} refcount={imrt[cluster]}\n")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def _nb_clusters(self) -> int:
        return -(-self.file_length() // self.cs)

    def calculate(self, res: CheckResult, fix: int) -> tuple[list[int], bool]:
        """QEMU's calculate_refcounts: the IMRT and whether a rebuild is needed."""
        img = self.img
        imrt = [0] * self._nb_clusters()
        self.inc_refcounts(res, imrt, 0, self.cs)  # header
        self.check_l1(res, imrt, img.l1_table_offset, img.l1_size, True, fix)
        for sn in img.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.log(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table "
                         "is not cluster aligned; snapshot table entry corrupted\n")
                res.corruptions += 1
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                self.log(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too "
                         "large; snapshot table entry corrupted\n")
                res.corruptions += 1
                continue
            self.check_l1(res, imrt, sn.l1_table_offset, sn.l1_size, False, fix)
        self.inc_refcounts(res, imrt, img.snapshots_offset, img.snapshots_size)
        self.inc_refcounts(res, imrt, img.refcount_table_offset, len(self.reftable) * 8)
        rebuild = self.check_refblocks(res, imrt, fix)
        return imrt, rebuild

    def compare(self, res: CheckResult, fix: int, imrt: list[int]) -> tuple[int, bool]:
        """QEMU's compare_refcounts; returns (highest used cluster, rebuild needed)."""
        highest = 0
        rebuild = False
        nb = max(len(imrt), self._nb_clusters())
        per = self.refblock_entries
        i = 0
        while i < nb:
            # Fast path: a whole refblock whose stored counts equal the computed ones.
            if i % per == 0 and i + per <= len(imrt):
                rt_index = i // per
                rb = self.reftable[rt_index] & REFT_OFFSET_MASK if rt_index < len(self.reftable) else 0
                disk = None
                if rb and not rb & (self.cs - 1) and rb <= (1 << 63) - 1 - self.cs:
                    disk = self._decoded(rb)
                elif not rb:
                    disk = [0] * per
                comp = imrt[i:i + per]
                if disk is not None and disk == comp:
                    for j in range(per - 1, -1, -1):
                        if comp[j]:
                            highest = i + j
                            break
                    i += per
                    continue
            i_msg = i
            i += 1
            on_disk = self.get_refcount(i_msg)
            if on_disk is None:
                self.log(f"Can't get refcount for cluster {i_msg}: {_EIO}\n")
                res.check_errors += 1
                continue
            computed = imrt[i_msg] if i_msg < len(imrt) else 0
            if on_disk or computed:
                highest = i_msg
            if on_disk == computed:
                continue
            fixing = None
            if on_disk == 0:
                rebuild = True
            elif on_disk > computed and fix & FIX_LEAKS:
                fixing = "leaks_fixed"
            elif on_disk < computed and fix & FIX_ERRORS:
                fixing = "corruptions_fixed"
            tag = "Repairing" if fixing else ("ERROR" if on_disk < computed else "Leaked")
            self.log(f"{tag} cluster {i_msg} refcount={on_disk} reference={computed}\n")
            if fixing and self.set_refcount(i_msg, computed):
                setattr(res, fixing, getattr(res, fixing) + 1)
                continue
            if on_disk < computed:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest, rebuild

    def rebuild(self, imrt: list[int]) -> None:
        """Write a complete new refcount structure after the end of the file.

        The new refblocks and reftable are placed at the end of the image, so nothing
        the old structures describe is overwritten; the header switches to them last.
        """
        end = len(imrt)
        while end and not imrt[end - 1]:
            end -= 1
        file_clusters = self._nb_clusters()
        base = max(end, file_clusters)
        # Find how many refblocks/reftable clusters are needed to cover themselves too.
        n_rb, n_rt = 1, 1
        while True:
            total = base + n_rb + n_rt
            need_rb = -(-total // self.refblock_entries)
            need_rt = max(1, -(-need_rb * 8 // self.cs))
            if need_rb <= n_rb and need_rt <= n_rt:
                break
            n_rb, n_rt = max(n_rb, need_rb), max(n_rt, need_rt)
        counts = imrt[:base] + [0] * (base - min(base, len(imrt)))
        counts = counts[:base]
        rb_start = base
        rt_start = base + n_rb
        counts.extend([1] * (n_rb + n_rt))
        reftable = [0] * (n_rt * self.cs // 8)
        for b in range(n_rb):
            chunk = counts[b * self.refblock_entries:(b + 1) * self.refblock_entries]
            blk = bytearray(self.cs)
            for j, v in enumerate(chunk):
                if v:
                    self._set_entry(blk, j, min(v, self.refcount_max))
            off = (rb_start + b) << self.cbits
            self.pwrite(off, bytes(blk))
            reftable[b] = off
        rt_off = rt_start << self.cbits
        self.pwrite(rt_off, struct.pack(f">{len(reftable)}Q", *reftable))
        self.io.sync()
        # Ordering: refblocks and reftable are on disk before the header points at them.
        self.pwrite(REFCOUNT_TABLE_OFFSET_FIELD, struct.pack(">QI", rt_off, n_rt))
        self.io.sync()
        self.img.refcount_table_offset = rt_off
        self.img.refcount_table_clusters = n_rt
        self.reftable = reftable
        self._refblock_cache.clear()
        self._decoded_cache.clear()

    def check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_oflag_copied (active L1 only)."""
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        img = self.img
        l1 = self._read_u64s(img.l1_table_offset, img.l1_size) if img.l1_size else []
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            rc = self.get_refcount(l2_offset >> self.cbits)
            if rc is None:
                continue
            if (rc == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.log(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                         f"l1_entry={l1_entry:x} refcount={rc}\n")
                if repair:
                    new = l1_entry | QCOW_OFLAG_COPIED if rc == 1 else l1_entry & ~QCOW_OFLAG_COPIED
                    self.pwrite(img.l1_table_offset + 8 * i, struct.pack(">Q", new))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if l2_offset & (self.cs - 1):
                continue
            l2 = self._read_u64s(l2_offset, self.l2_size)
            dirty = 0
            for j, e in enumerate(l2):
                if e & QCOW_OFLAG_COMPRESSED:
                    continue
                data = e & L2E_OFFSET_MASK
                if not data:
                    continue
                rc = self.get_refcount(data >> self.cbits)
                if rc is None:
                    continue
                if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.log(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                             f"l2_entry={e:x} refcount={rc}\n")
                    if repair:
                        l2[j] = e | QCOW_OFLAG_COPIED if rc == 1 else e & ~QCOW_OFLAG_COPIED
                        dirty += 1
            if dirty:
                self.pwrite(l2_offset, struct.pack(f">{len(l2)}Q", *l2))
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    def mark_clean(self) -> None:
        """Clear the dirty and corrupt bits (v3 only), after everything else is on disk."""
        if self.img.version < 3 or not self.img.incompatible & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT):
            return
        self.io.sync()
        new = self.img.incompatible & ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)
        self.pwrite(INCOMPAT_FEATURES_FIELD, struct.pack(">Q", new))
        self.img.incompatible = new

    def read_snapshot_table(self, res: CheckResult) -> None:
        """QEMU's qcow2_check_read_snapshot_table (detection; entries are never rewritten).

        :raises _CheckFailed: the table cannot be read; ``reports`` carries QEMU's error lines.
        """
        img = self.img
        nb, off = img.nb_snapshots, img.snapshots_offset
        if nb * fmt.SNAPSHOT_HEADER.size > fmt.SNAPSHOT_HEADER.size * QCOW_MAX_SNAPSHOTS:
            res.check_errors += 1
            raise _CheckFailed(res, "File too large", [
                "ERROR snapshot table too large\nYou can force-remove all "
                f"{nb - QCOW_MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all"])
        if off % self.cs or off > (1 << 63) - 1 - nb * fmt.SNAPSHOT_HEADER.size:
            res.check_errors += 1
            raise _CheckFailed(res, "Invalid argument", ["ERROR snapshot table offset invalid"])
        snaps = []
        pos = off
        for i in range(nb):
            hdr = self.pread(pos, fmt.SNAPSHOT_HEADER.size)
            (l1_off, l1_size, id_len, name_len, _ds, _dns, _vmc, _vms,
             extra) = fmt.SNAPSHOT_HEADER.unpack(hdr)
            pos += fmt.SNAPSHOT_HEADER.size
            if extra > fmt.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                res.check_errors += 1
                raise _CheckFailed(res, "File too large", [
                    "ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
                    f"table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"])
            if img.version >= 3 and extra < 16:
                res.corruptions += 1
                self.log(f"ERROR snapshot table entry {i} is incomplete\n")
            pos += extra
            id_str = self.pread(pos, id_len).split(b"\0", 1)[0].decode("utf-8", "replace")
            name = self.pread(pos + id_len, name_len).split(b"\0", 1)[0].decode("utf-8", "replace")
            pos = (pos + id_len + name_len + 7) & ~7
            if pos - off > QCOW_MAX_SNAPSHOTS_SIZE:
                res.check_errors += 1
                raise _CheckFailed(res, "File too large", [
                    "ERROR failed to read the snapshot table: Snapshot table exceeds the maximum size"])
            snaps.append(_Snapshot(id_str, name, l1_off, l1_size))
        img.snapshots = snaps
        img.snapshots_size = pos - off if nb else 0

    def run(self, fix: int) -> CheckResult:
        """QEMU's qcow2_check_refcounts followed by the clean-marking of qcow2_co_check."""
        res = CheckResult()
        self.writable = bool(fix)
        if self.img.nb_snapshots and not self.img.snapshots:
            self.read_snapshot_table(res)
        res.total_clusters = -(-self.img.size // self.cs)
        imrt, rebuild = self.calculate(res, fix)
        pre_compare = CheckResult(**vars(res))
        highest, rebuild2 = self.compare(res, 0, imrt)
        rebuild = rebuild or rebuild2
        if rebuild and fix & FIX_ERRORS:
            old = CheckResult(**vars(res))
            self.log("Rebuilding refcount structure\n")
            self.rebuild(imrt)
            res.corruptions = 0
            res.leaks = 0
            imrt, rebuild = self.calculate(res, 0)
            fresh_leaks = 0
            if fix & FIX_LEAKS:
                scratch = CheckResult()
                highest, again = self.compare(scratch, FIX_LEAKS, imrt)
                if again:
                    self.log("ERROR rebuilt refcount structure is still broken\n")
                fresh_leaks = scratch.leaks
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.log("ERROR need to rebuild refcount structures\n")
                res.check_errors += 1
                raise _CheckFailed(res)
            if res.leaks or res.corruptions:
                res = pre_compare
                highest, _ = self.compare(res, fix, imrt)
        self.check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs
        if fix and not res.check_errors and not res.corruptions:
            self.mark_clean()
        self.io.sync() if fix else None
        return res


class _CheckFailed(Exception):
    def __init__(self, res: CheckResult, errno_text: str = _EIO, reports: list[str] | None = None) -> None:
        super().__init__("check failed")
        self.res = res
        self.errno_text = errno_text
        self.reports = reports or []


class CheckError(ImageFormatError):
    """The check could not complete (QEMU: "Check failed: <errno text>"); carries partial counters.

    :param msg: the errno text.
    :param result: what was counted before the failure.
    """

    def __init__(self, msg: str, result: CheckResult, reports: list[str] | None = None) -> None:
        super().__init__(msg)
        self.result = result
        #: Error lines QEMU prints with its program-name prefix before "Check failed".
        self.reports = reports or []


def check_qcow2(path: str, fix: int = 0, log: TextIO | None = None, force_share: bool = False,
                prog: str = "emu-img") -> CheckResult:
    """Check (and with ``fix`` repair) a qcow2 image file, as ``qemu-img check`` does.

    :param path: the image file.
    :param fix: ``0``, or a combination of :data:`FIX_LEAKS` and :data:`FIX_ERRORS`.
    :param log: where the per-cluster messages go (QEMU writes them to stderr).
    :param force_share: ``-U``: take no image locks (read-only checks only).
    :param prog: program name for the few messages QEMU prefixes with it.
    :returns: the counters of the run.
    :raises ImageOpenError: the file cannot be opened.
    :raises ImageFormatError: the header is unusable (QEMU's open-time message).
    :raises CheckError: the check had to stop (e.g. a rebuild is needed but was not allowed).
    """
    out = log if log is not None else sys.stderr
    try:
        f = open(path, "r+b" if fix else "rb")
    except OSError as err:
        raise ImageOpenError(f"Could not open '{path}': {err.strerror}") from err
    with f:
        if not force_share:
            # The same permission locks qemu-img takes, so a running VM's image is refused.
            from emu.block import node as _node
            perm = _node.BLK_PERM_CONSISTENT_READ
            if fix:
                perm |= _node.BLK_PERM_WRITE | _node.BLK_PERM_RESIZE
            shared = _node.BLK_PERM_CONSISTENT_READ | _node.BLK_PERM_WRITE_UNCHANGED
            try:
                _node.apply_perm_locks(f.fileno(), path, perm, shared)
            except ImageOpenError as err:
                raise ImageOpenError(f"Could not open '{path}': {err}") from None
        io = FileIO(f)
        img = read_header(io, path, snapshots=False)
        checker = _Checker(io, img, out.write)
        checker.prog = prog
        try:
            return checker.run(fix)
        except _CheckFailed as err:
            raise CheckError(err.errno_text, err.res, err.reports) from None
        except OSError as err:
            raise CheckError(err.strerror or str(err), CheckResult(check_errors=1)) from err


def repair_refcounts(drv, log: TextIO | None = None) -> CheckResult:
    """Repair an image opened read/write with the dirty bit set (lazy refcounts), as QEMU's
    qcow2_do_open runs ``qcow2_check(BDRV_FIX_ERRORS | BDRV_FIX_LEAKS)``.

    Works through the driver's protocol node; the driver's cached metadata is written
    back first.  When the repair leaves no corruption the dirty bit is cleared and the
    driver is re-opened from the repaired file (so its refcount state is current).

    :param drv: the qcow2 driver instance (``bs.impl``) during open.
    :param log: where QEMU's per-cluster messages go (default: nowhere, as QEMU is silent here
        unless corruption remains).
    :raises ImageFormatError: the image could not be repaired.
    """
    import io as _io
    out = log if log is not None else _io.StringIO()
    node = drv.bs.file
    flush = getattr(drv, "_write_caches", None)
    if flush is not None:
        flush()
    nio = NodeIO(node)
    img = read_header(nio, drv.bs.filename)
    try:
        res = _Checker(nio, img, out.write).run(FIX_LEAKS | FIX_ERRORS)
    except _CheckFailed as err:
        raise ImageFormatError("Could not repair dirty image: Input/output error") from None
    if res.corruptions or res.check_errors:
        raise ImageFormatError("Could not repair dirty image: corruption remains")
    node.flush()
    drv.open({})
    return res

"""Read the data area of what a transaction produced: an image's active layer (through its
backing chain: external overlays, backup targets, raw or qcow2) or an internal qcow2 snapshot.

The active layer is read through emu's block layer, opened read-only and shared (``qemu-img -U``
semantics), so a running emulator may still hold the image.  An internal snapshot is read
straight from its L1/L2 tables (QEMU ``docs/interop/qcow2.txt``, "Snapshots"), read-only: the
snapshot's clusters never change after it was taken, whatever the active layer does.

Hostile or damaged images raise :class:`ImageReadError` with what and where, never another
exception.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from emu.block.qcow2 import format as q
from emu.errors import EmuError
from emu.oracle.records import SECTOR_SIZE

__all__ = ["ImageReadError", "read_region", "snapshot_names"]


class ImageReadError(EmuError):
    """The image (or the snapshot in it) cannot be read."""


def read_region(path: str | os.PathLike, start: int, count: int, *, snapshot: str | None = None,
                fmt: str | None = None) -> bytes:
    """Sectors ``start .. start+count-1`` of an image as the guest would see them.

    :param path: the image file.
    :param start: first LBA.
    :param count: number of sectors.
    :param snapshot: an internal qcow2 snapshot's name (or id); None reads the active layer.
    :param fmt: ``qcow2`` or ``raw``; probed when None.
    :raises ImageReadError: unreadable image, unknown snapshot, or a region past the end.
    """
    if start < 0 or count < 0:
        raise ImageReadError(f"bad region: start {start} count {count}")
    if snapshot is not None:
        return _read_snapshot(os.fspath(path), snapshot, start * SECTOR_SIZE, count * SECTOR_SIZE)
    return _read_active(os.fspath(path), fmt, start * SECTOR_SIZE, count * SECTOR_SIZE)


def _read_active(path: str, fmt: str | None, offset: int, length: int) -> bytes:
    from emu.block.node import BlockGraph

    graph = BlockGraph()
    try:
        bs = graph.open_image(path, fmt, read_only=True, force_share=True)
        size = bs.size
        if offset >= size:
            return bytes(length)
        data = bs.read(offset, min(length, size - offset))
        return data.ljust(length, b"\0")
    except EmuError as err:
        raise ImageReadError(f"{path}: {err}") from err
    except OSError as err:
        raise ImageReadError(f"{path}: {err.strerror or err}") from err
    finally:
        try:
            graph.close_all()
        except EmuError:
            pass


class _Snapshot:
    """Read-only view of one internal snapshot (its own L1 table)."""

    def __init__(self, f: BinaryIO, path: str, name: str) -> None:
        self.f, self.path = f, path
        self.file_size = os.fstat(f.fileno()).st_size
        head = self._pread(0, 65536)
        try:
            h = q.parse_header(head)
        except EmuError as err:
            raise ImageReadError(f"{path}: {err}") from err
        if h.incompatible_features & q.QCOW2_INCOMPAT_EXTL2:
            raise ImageReadError(f"{path}: extended L2 entries are not supported by the oracle")
        if h.incompatible_features & q.QCOW2_INCOMPAT_DATA_FILE or h.crypt_method:
            raise ImageReadError(f"{path}: external data files and encryption are not supported")
        self.h = h
        self.cluster_size = h.cluster_size
        self.l2_entries = self.cluster_size // 8
        table = self._pread(h.snapshots_offset, q.QCOW_MAX_SNAPSHOTS_SIZE) if h.nb_snapshots else b""
        try:
            snaps = q.parse_snapshot_table(table, h.nb_snapshots)
        except EmuError as err:
            raise ImageReadError(f"{path}: {err}") from err
        match = [s for s in snaps if s.name == name] or [s for s in snaps if s.id_str == name]
        if not match:
            have = ", ".join(s.name for s in snaps) or "none"
            raise ImageReadError(f"{path}: no snapshot named '{name}' (snapshots: {have})")
        self.snap = match[0]
        if self.snap.l1_size > q.QCOW_MAX_L1_SIZE // 8:
            raise ImageReadError(f"{path}: snapshot '{name}' L1 table too large")
        raw = self._pread(self.snap.l1_table_offset, self.snap.l1_size * 8, exact=True)
        self.l1 = struct.unpack(f">{self.snap.l1_size}Q", raw)
        self.size = self.snap.disk_size if self.snap.disk_size is not None else h.size
        self._l2: dict[int, tuple[int, ...]] = {}

    def _pread(self, offset: int, length: int, exact: bool = False) -> bytes:
        self.f.seek(offset)
        data = self.f.read(length)
        if exact and len(data) != length:
            raise ImageReadError(f"{self.path}: metadata at {offset:#x} lies past the end of the file")
        return data

    def _l2_table(self, offset: int) -> tuple[int, ...]:
        if offset not in self._l2:
            if offset % self.cluster_size:
                raise ImageReadError(f"{self.path}: L2 table offset {offset:#x} is not cluster aligned")
            raw = self._pread(offset, self.cluster_size, exact=True)
            self._l2[offset] = struct.unpack(f">{self.l2_entries}Q", raw)
        return self._l2[offset]

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            in_cluster = offset % self.cluster_size
            n = min(length, self.cluster_size - in_cluster)
            out += self._cluster_bytes(offset - in_cluster, in_cluster, n)
            offset += n
            length -= n
        return bytes(out)

    def _cluster_bytes(self, guest: int, within: int, n: int) -> bytes:
        if guest >= self.size:
            return bytes(n)
        index = guest // self.cluster_size
        l1_index, l2_index = divmod(index, self.l2_entries)
        l1e = self.l1[l1_index] & q.L1E_OFFSET_MASK if l1_index < len(self.l1) else 0
        l2e = self._l2_table(l1e)[l2_index] if l1e else 0
        if l2e & q.QCOW_OFLAG_COMPRESSED:
            raise ImageReadError(f"{self.path}: compressed cluster at guest offset {guest:#x} "
                                 "(convert the snapshot with qemu-img first)")
        host = l2e & q.L2E_OFFSET_MASK
        if l2e & q.QCOW_OFLAG_ZERO or not host:
            if not host and not l2e & q.QCOW_OFLAG_ZERO and self.h.backing_file:
                return self._backing(guest + within, n)
            return bytes(n)
        if host >= self.file_size:
            raise ImageReadError(f"{self.path}: data cluster {host:#x} lies past the end of the file")
        return self._pread(host + within, n).ljust(n, b"\0")

    def _backing(self, offset: int, n: int) -> bytes:
        from emu.block.node import resolve_backing_path

        backing = resolve_backing_path(self.path, self.h.backing_file or "")
        return _read_active(backing, self.h.backing_format, offset, n)


def _read_snapshot(path: str, name: str, offset: int, length: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return _Snapshot(f, path, name).read(offset, length)
    except OSError as err:
        raise ImageReadError(f"{path}: {err.strerror or err}") from err
    except (struct.error, ValueError) as err:  # hostile sizes in the tables
        raise ImageReadError(f"{path}: damaged qcow2 metadata ({err})") from err


def snapshot_names(path: str | os.PathLike) -> list[str]:
    """Names of the internal snapshots of a qcow2 image, in table order.

    :raises ImageReadError: not a readable qcow2 image.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
            h = q.parse_header(head)
            if not h.nb_snapshots:
                return []
            f.seek(h.snapshots_offset)
            return [s.name for s in q.parse_snapshot_table(f.read(q.QCOW_MAX_SNAPSHOTS_SIZE),
                                                            h.nb_snapshots)]
    except OSError as err:
        raise ImageReadError(f"{path}: {err.strerror or err}") from err
    except EmuError as err:
        raise ImageReadError(f"{path}: {err}") from err

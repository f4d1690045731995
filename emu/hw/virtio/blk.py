"""virtio-blk (VIRTIO 1.x §5.2), with QEMU 7.2's ``virtio-blk-pci`` defaults.

Offered features (what QEMU 7.2 offers for a writable disk, one queue): SEG_MAX,
GEOMETRY, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE, DISCARD, WRITE_ZEROES (+ RO for a
read-only backend; + SCSI and without ANY_LAYOUT when the device is legacy-only); no
SIZE_MAX, no MQ.  Configuration (57 bytes, up to ``write_zeroes_may_unmap``): capacity in
512-byte sectors, seg_max = queue size - 2, QEMU's CHS guess, blk_size 512, topology 0,
writeback, num_queues 1, discard and write-zeroes limits of 0x3fffff sectors and one segment.

A request is a chain: a 16-byte header (type, ioprio, sector) in the device-readable
buffers, then data, then the status byte as the last device-writable byte.  The status
byte is written last, after the data, and the used ring after that.

Request types as QEMU's ``virtio_blk_handle_request`` dispatches them (``type`` without
the OUT and BARRIER bits): IN/OUT (sector-aligned, inside the disk, else IOERR), FLUSH,
GET_ID (the serial, NUL-terminated only when shorter than 20 bytes), SCSI_CMD (IOERR or
UNSUPP as QEMU with ``scsi=off``), DISCARD and
WRITE_ZEROES (one 16-byte segment; more is UNSUPP; unknown flags UNSUPP; UNMAP on
DISCARD is UNSUPP; past the end IOERR), anything else UNSUPP.  WRITE_ZEROES with UNMAP
goes to the backend's ``write_zeroes``, which may deallocate (the range reads as zeroes
either way).

Host I/O runs on the BlockBackend's workers (``aio_*``); the completion, on the worker
thread, copies read data into guest RAM and invalidates translated code there (outside
the device lock, before the driver can see the completion), writes the status,
pushes the used ring and raises the interrupt unless event-idx / NO_INTERRUPT suppress
it.  Completions from before a device reset are dropped.  Without FLUSH negotiated the
device is write-through (each write is flushed before it completes), as QEMU.

Guest faults: a malformed chain (loop, too long, bad index, nested indirect, zero-sized
buffer, writable before readable, missing header or status) is QEMU's ``virtio_error``
(DEVICE_NEEDS_RESET, queue stopped); a well-formed chain whose data buffers lie outside
RAM gets VIRTIO_BLK_S_IOERR in its status byte when that byte is in RAM.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any, Callable

from emu.hw.virtio.device import VirtioDevice
from emu.hw.virtio.virtqueue import Element, GuestMemory, VirtQueue, VirtQueueError

if TYPE_CHECKING:
    from emu.block.api import BlockBackend

log = logging.getLogger(__name__)

_STATUS_BYTES = [bytes([i]) for i in range(256)]

VIRTIO_ID_BLOCK = 2

# Feature bits (§5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7  # legacy
VIRTIO_BLK_F_FLUSH = 9  # legacy name: WCE
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_F_ANY_LAYOUT = 27

# Request types (§5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_SCSI_CMD = 2
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_BARRIER = 0x80000000

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# Status byte values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512
SECTOR_BITS = 9
#: QEMU's BDRV_REQUEST_MAX_SECTORS (INT_MAX >> 9): default discard / write-zeroes limit
BDRV_REQUEST_MAX_SECTORS = 0x3FFFFF

_OUTHDR = struct.Struct("<IIQ")  # type, ioprio, sector
_DWZ = struct.Struct("<QII")  # sector, num_sectors, flags
#: struct virtio_blk_config (§5.2.4) up to write_zeroes_may_unmap, as QEMU 7.2 sizes it
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB")
VIRTIO_BLK_CONFIG_SIZE = _CONFIG.size  # 57
CONFIG_WRITEBACK_OFFSET = 32


def guess_geometry(blk: "BlockBackend") -> tuple[int, int, int]:
    """CHS as QEMU's ``hd_geometry_guess`` (no translation): from the MBR's partition ends
    when they describe <= 16 heads, else 16 heads / 63 sectors and cylinders from the size."""
    nb_sectors = blk.size >> SECTOR_BITS
    try:
        mbr = blk.read(0, SECTOR_SIZE) if blk.size >= SECTOR_SIZE else b""
    except Exception:  # an unreadable first sector just means no guess
        mbr = b""
    if len(mbr) == SECTOR_SIZE and mbr[510] == 0x55 and mbr[511] == 0xAA:
        for i in range(4):
            p = 0x1BE + 16 * i
            nr_sects = int.from_bytes(mbr[p + 12 : p + 16], "little")
            end_head, end_sector = mbr[p + 5], mbr[p + 6] & 63
            if nr_sects and end_head and end_sector:
                heads = end_head + 1
                cyls = nb_sectors // (heads * end_sector)
                if 1 <= cyls <= 16383:
                    if heads <= 16:
                        return cyls, heads, end_sector
                    break  # LBA translation was in use: a standard physical geometry
    cyls = min(max(nb_sectors // (16 * 63), 2), 16383)
    return cyls, 16, 63


class VirtioBlk(VirtioDevice):
    """A virtio block device on a :class:`~emu.block.api.BlockBackend`.

    :param blk: the backend (the only storage the device touches).
    :param memory: guest RAM.
    :param serial: what GET_ID returns (QEMU's ``serial=``; default none: an empty string).
    :param queue_size: QEMU's ``queue-size`` (256).
    :param write_cache: initial guest-visible write cache (QEMU: on unless cache=writethrough).
    :param discard: offer VIRTIO_BLK_F_DISCARD (QEMU's ``discard=on``).
    :param write_zeroes: offer VIRTIO_BLK_F_WRITE_ZEROES (QEMU's ``write-zeroes=on``).
    :param on_write_cache: told ``(enabled)`` when the guest changes the write cache (so
        the machine can show it in query-block).
    """

    def __init__(self, blk: "BlockBackend", memory: GuestMemory, serial: str | None = None,
                 queue_size: int = 256, write_cache: bool = True, discard: bool = True,
                 write_zeroes: bool = True, on_write_cache: Callable[[bool], None] | None = None) -> None:
        self.blk = blk
        self.serial = serial or ""
        self.offer_discard = discard
        self.offer_write_zeroes = write_zeroes
        self.original_wce = write_cache
        self.writeback = write_cache
        self.on_write_cache = on_write_cache
        self.geometry = guess_geometry(blk)
        #: requests completed to the driver since creation (the consistency oracle's counter)
        self.completed = 0
        super().__init__(VIRTIO_ID_BLOCK, memory, 1, queue_size, VIRTIO_BLK_CONFIG_SIZE)

    # ---- features and configuration ------------------------------------------------------
    def device_features(self, modern: bool) -> int:
        f = (1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_GEOMETRY | 1 << VIRTIO_BLK_F_TOPOLOGY
             | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_CONFIG_WCE)
        if self.offer_discard:
            f |= 1 << VIRTIO_BLK_F_DISCARD
        if self.offer_write_zeroes:
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        if self.blk.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        if not modern:
            f |= 1 << VIRTIO_BLK_F_SCSI  # QEMU offers it to legacy-only devices (and refuses it)
        return f

    def set_interfaces(self, legacy: bool, modern: bool) -> None:
        super().set_interfaces(legacy, modern)
        if not modern:
            self.host_features &= ~(1 << VIRTIO_F_ANY_LAYOUT)  # QEMU: legacy-only blk has no ANY_LAYOUT

    def get_config(self) -> bytes:
        cyls, heads, secs = self.geometry
        return _CONFIG.pack(
            self.blk.size >> SECTOR_BITS,  # capacity
            0,  # size_max (not offered)
            self.queues[0].max_size - 2,  # seg_max (QEMU's seg-max-adjust)
            cyls, heads, secs,
            SECTOR_SIZE,  # blk_size
            0, 0, 0, 0,  # physical_block_exp, alignment_offset, min_io_size, opt_io_size
            int(self.writeback), 0,  # writeback, unused0
            len(self.queues),  # num_queues
            BDRV_REQUEST_MAX_SECTORS if self.offer_discard else 0,  # max_discard_sectors
            1 if self.offer_discard else 0,  # max_discard_seg
            1 if self.offer_discard else 0,  # discard_sector_alignment (blk_size / 512)
            BDRV_REQUEST_MAX_SECTORS if self.offer_write_zeroes else 0,  # max_write_zeroes_sectors
            1 if self.offer_write_zeroes else 0,  # max_write_zeroes_seg
            1 if self.offer_write_zeroes else 0,  # write_zeroes_may_unmap
        )

    def set_config(self, offset: int, data: bytes) -> None:
        # only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE); QEMU applies it as is
        if offset <= CONFIG_WRITEBACK_OFFSET < offset + len(data):
            self._set_writeback(bool(data[CONFIG_WRITEBACK_OFFSET - offset]))

    def _set_writeback(self, on: bool) -> None:
        if on != self.writeback:
            self.writeback = on
            if self.on_write_cache is not None:
                self.on_write_cache(on)

    def driver_ok(self) -> None:
        # a driver that cannot flush gets a write-through device (QEMU's virtio_blk_set_status)
        if not self.has_feature(VIRTIO_BLK_F_FLUSH):
            self._set_writeback(False)

    def device_reset(self) -> None:
        self._set_writeback(self.original_wce)

    # ---- requests -----------------------------------------------------------------------
    def handle_queue(self, vq: VirtQueue) -> None:
        while not self.broken:
            try:
                elem = vq.pop()
            except VirtQueueError as err:
                self.virtio_error(str(err))
                return
            if elem is None:
                break
            self._request(vq, elem)
        if not self.broken:
            try:
                vq.set_avail_event()
            except VirtQueueError as err:
                self.virtio_error(str(err))

    def _gather(self, sg: list[tuple[int, int]], skip: int = 0, limit: int | None = None) -> bytes:
        if len(sg) == 1 and not skip and limit is None:
            return self.memory.read(*sg[0])    # one buffer: one copy
        out = bytearray()
        for addr, n in sg:
            if skip >= n:
                skip -= n
                continue
            take = n - skip if limit is None else min(n - skip, limit - len(out))
            out += self.memory.read(addr + skip, take)
            skip = 0
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)

    def _scatter(self, sg: list[tuple[int, int]], data: bytes | memoryview,
                 invalidate: bool = True) -> list[tuple[int, int]]:
        """Copy ``data`` into the buffers; returns the ranges written."""
        view = memoryview(data)
        off = 0
        written = []
        for addr, n in sg:
            if off >= len(view):
                break
            take = min(n, len(view) - off)
            self.memory.write(addr, view[off : off + take], invalidate)
            written.append((addr, take))
            off += take
        return written

    def _request(self, vq: VirtQueue, elem: Element) -> None:
        if elem.out_len < _OUTHDR.size or elem.in_len < 1:
            self.virtio_error("virtio-blk missing headers")
            return
        status_addr = elem.in_sg[-1][0] + elem.in_sg[-1][1] - 1
        # the data part of the writable buffers: all but the status byte
        in_data = list(elem.in_sg)
        last_addr, last_len = in_data.pop()
        if last_len > 1:
            in_data.append((last_addr, last_len - 1))
        in_data_len = elem.in_len - 1
        in_len = elem.in_len
        gen = self.generation
        if elem.fault is not None:
            if not self.memory.valid(status_addr, 1):
                self.virtio_error(f"virtio-blk request: {elem.fault}")
                return
            log.warning("virtio-blk: request fails: %s", elem.fault)
            self._complete(vq, elem, gen, VIRTIO_BLK_S_IOERR, 1, status_addr)  # only the status written
            return
        first_addr, first_len = elem.out_sg[0]
        if first_len >= _OUTHDR.size:     # the usual layout: the header is a buffer of its own
            rtype, _ioprio, sector = _OUTHDR.unpack(self.memory.read(first_addr, _OUTHDR.size))
        else:
            rtype, _ioprio, sector = _OUTHDR.unpack(self._gather(elem.out_sg, 0, _OUTHDR.size))
        out_data = self._skip(elem.out_sg, _OUTHDR.size)
        out_data_len = elem.out_len - _OUTHDR.size
        kind = rtype & ~(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER)

        def done(status: int) -> None:
            self._complete(vq, elem, gen, status, in_len, status_addr)

        if kind == VIRTIO_BLK_T_IN:
            write = bool(rtype & VIRTIO_BLK_T_OUT)
            length = out_data_len if write else in_data_len
            if not self._range_ok(sector, length):
                done(VIRTIO_BLK_S_IOERR)
                return
            offset = sector << SECTOR_BITS
            if write:
                data = self._gather(out_data)
                self._write(offset, data, gen, done)
            else:
                def read_done(result: Any) -> None:
                    if isinstance(result, BaseException):
                        log.warning("virtio-blk: read at sector %d failed: %s", sector, result)
                        done(VIRTIO_BLK_S_IOERR)
                        return
                    with self.lock:
                        if gen != self.generation:
                            return
                        try:
                            ranges = self._scatter(in_data, result, invalidate=False)
                        except VirtQueueError:
                            done(VIRTIO_BLK_S_IOERR)
                            return
                    # Drop translated code before the driver can see the completion, but
                    # without the device lock: from this worker thread the invalidation
                    # waits for the vCPU, which may itself be waiting for the lock in a
                    # register access.
                    for addr, n in ranges:
                        self.memory.invalidate_range(addr, n)
                    done(VIRTIO_BLK_S_OK)
                self.blk.aio_read(offset, length, read_done)
        elif kind == VIRTIO_BLK_T_FLUSH:
            self.blk.aio_flush(lambda r: done(self._status_of(r, "flush")))
        elif kind == VIRTIO_BLK_T_GET_ID:
            serial = self.serial.encode("latin-1", "replace")
            n = min(len(serial) + 1, in_data_len, VIRTIO_BLK_ID_BYTES)
            self._scatter(in_data, (serial + b"\0")[:n])
            done(VIRTIO_BLK_S_OK)
        elif kind in (VIRTIO_BLK_T_DISCARD & ~VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES & ~VIRTIO_BLK_T_OUT):
            wz = kind == VIRTIO_BLK_T_WRITE_ZEROES & ~VIRTIO_BLK_T_OUT
            if not (self.offer_write_zeroes if wz else self.offer_discard):
                done(VIRTIO_BLK_S_UNSUPP)
                return
            if out_data_len > _DWZ.size:
                done(VIRTIO_BLK_S_UNSUPP)  # one segment only (max_*_seg = 1)
                return
            if out_data_len < _DWZ.size:
                self.virtio_error("virtio-blk discard/write_zeroes header too short")
                return
            dsector, nsectors, flags = _DWZ.unpack(self._gather(out_data))
            if nsectors > BDRV_REQUEST_MAX_SECTORS or not self._range_ok(dsector, nsectors << SECTOR_BITS):
                done(VIRTIO_BLK_S_IOERR)
                return
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (not wz and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
                done(VIRTIO_BLK_S_UNSUPP)
                return
            offset, length = dsector << SECTOR_BITS, nsectors << SECTOR_BITS
            if wz:
                self.blk.aio_write_zeroes(offset, length, lambda r: done(self._status_of(r, "write-zeroes")))
            else:
                self.blk.aio_discard(offset, length, lambda r: done(self._status_of(r, "discard")))
        elif kind == VIRTIO_BLK_T_SCSI_CMD:
            # QEMU 7.2 (scsi=off): malformed SCSI requests are IOERR, well-formed ones UNSUPP
            # with 255 in the errors field of the virtio_scsi_inhdr before the status byte
            if len(elem.out_sg) < 2 or len(elem.in_sg) < 3:
                done(VIRTIO_BLK_S_IOERR)
                return
            addr, n = elem.in_sg[-2]
            self.memory.write(addr, (255).to_bytes(4, "little")[: min(n, 4)])
            done(VIRTIO_BLK_S_UNSUPP)
        else:
            done(VIRTIO_BLK_S_UNSUPP)

    @staticmethod
    def _skip(sg: list[tuple[int, int]], skip: int) -> list[tuple[int, int]]:
        out = []
        for addr, n in sg:
            if skip >= n:
                skip -= n
                continue
            out.append((addr + skip, n - skip))
            skip = 0
        return out

    def _range_ok(self, sector: int, length: int) -> bool:
        """QEMU's virtio_blk_sect_range_ok: whole sectors, inside the disk."""
        total = self.blk.size >> SECTOR_BITS
        nb = length >> SECTOR_BITS
        return (nb <= BDRV_REQUEST_MAX_SECTORS and length % SECTOR_SIZE == 0
                and sector <= total and nb <= total - sector)

    @staticmethod
    def _status_of(result: Any, what: str) -> int:
        if isinstance(result, BaseException):
            log.warning("virtio-blk: %s failed: %s", what, result)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _write(self, offset: int, data: bytes, gen: int, done: Callable[[int], None]) -> None:
        writethrough = not self.writeback

        def written(result: Any) -> None:
            if isinstance(result, BaseException) or not writethrough:
                done(self._status_of(result, "write"))
                return
            self.blk.aio_flush(lambda r: done(self._status_of(r, "flush")))
        self.blk.aio_write(offset, data, written)

    def _complete(self, vq: VirtQueue, elem: Element, gen: int, status: int, in_len: int,
                  status_addr: int) -> None:
        """Status byte, then the used ring, then (maybe) the interrupt; any thread."""
        with self.lock:
            if gen != self.generation:
                return  # the device was reset meanwhile: the driver forgot this request
            try:
                self.memory.write(status_addr, _STATUS_BYTES[status], invalidate=False)
                vq.push(elem, in_len)
            except VirtQueueError as err:
                self.virtio_error(str(err))
                return
            self.completed += 1
            self.notify_queue(vq)

"""An IDE channel (QEMU's IDEBus): two devices, the task file, the ATA command set, PIO.

:class:`IdeDrive` is one device's state (QEMU's IDEState): its task-file registers with
their HOB copies, status/error, the PIO buffer and the transfer in progress.  A drive
without a :class:`~emu.block.api.BlockBackend` is the "absent" device of a channel; QEMU
keeps register state for it, and so do we.

:class:`IdeChannel` owns the two drives and the registers they share on the wire (the
selected unit, the device control register), decodes the command block (8 ports) and the
control block (1 port) and executes commands from one table (:data:`COMMANDS`).

Threads.  Port accesses come from the vCPU thread; every disk access is an ``aio_*``
request whose completion runs on a block-layer worker thread, so the guest keeps running
(BSY set meanwhile, as QEMU's asynchronous PIO and DMA).  ``self.lock`` serialises command
execution, register writes and completions.  The 16/32-bit data-port path takes no lock:
it only moves through a buffer that no completion touches while DRQ is set.  A completion
that arrives after a reset (``generation`` changed) is dropped, as QEMU cancels requests
on SRST.  Guest RAM is written by DMA completions outside the lock, because the vCPU's
code invalidation waits for the vCPU, which may be waiting for the lock.

Guest errors (LBA past the end, bad PRDs, unknown commands) end as ERR/ABRT in the status
and error registers with an interrupt; host errors (``BlockError`` from the backend) too
(QEMU's ``rerror=report``/``werror=report`` behaviour).  Nothing raises into the vCPU.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable

from emu.errors import ConfigError
from emu.hw.ide.ata import (
    ABRT_ERR,
    ATA_DEV_ALWAYS_ON,
    ATA_DEV_HS,
    ATA_DEV_LBA,
    ATA_DEV_LBA_MSB,
    ATA_DEV_SELECT,
    BUSY_STAT,
    DEFAULT_MODEL,
    DRQ_STAT,
    ERR_STAT,
    IDE_CTRL_DISABLE_IRQ,
    IDE_CTRL_HOB,
    IDE_CTRL_RESET,
    MAX_MULT_SECTORS,
    QEMU_HW_VERSION,
    READY_STAT,
    SECTOR_BITS,
    SECTOR_SIZE,
    SEEK_STAT,
    SETFEATURES_DIS_WCACHE,
    SETFEATURES_EN_WCACHE,
    SETFEATURES_IGNORED,
    SETFEATURES_XFER,
    Geometry,
    guess_geometry,
    identify_words,
    words_to_bytes,
)
from emu.hw.ide import ata
from emu.hw.irq import IrqLine

if TYPE_CHECKING:
    from emu.block.api import BlockBackend
    from emu.hw.ide.bmdma import BmDma

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_P16 = struct.Struct("<H").pack_into
_P32 = struct.Struct("<I").pack_into

# Command-block register offsets (from 0x1F0 / 0x170)
ATA_REG_DATA = 0
ATA_REG_ERROR = 1  # write: features
ATA_REG_NSECTOR = 2
ATA_REG_SECTOR = 3  # LBA 7-0
ATA_REG_LCYL = 4  # LBA 15-8
ATA_REG_HCYL = 5  # LBA 23-16
ATA_REG_SELECT = 6
ATA_REG_STATUS = 7  # write: command

# DMA command kinds
IDE_DMA_READ = "read"
IDE_DMA_WRITE = "write"
IDE_DMA_TRIM = "trim"
DSM_TRIM = 0x01


class IdeDrive:
    """One ATA device position on a channel (master or slave).

    :param blk: the disk, or None for an absent device.
    :param serial: IDENTIFY serial number (QEMU: ``QM00001`` for the first IDE disk).
    :param model: IDENTIFY model string.
    :param version: IDENTIFY firmware revision.
    :param write_cache: the guest-visible write cache (``cache=writethrough`` turns it off).
    :param media: ``"disk"``; ``"cdrom"`` is refused (no ATAPI here).
    :param discard: pass TRIM on to the backend (QEMU's ``discard=unmap``); by default TRIM
        is checked and acknowledged but changes nothing, as QEMU's ``discard=ignore``.
    :raises ConfigError: for ``media="cdrom"`` or a read-only backend (QEMU's texts).
    """

    def __init__(
        self,
        blk: "BlockBackend | None",
        serial: str = "QM00001",
        model: str = DEFAULT_MODEL,
        version: str = QEMU_HW_VERSION,
        write_cache: bool = True,
        media: str = "disk",
        discard: bool = False,
    ) -> None:
        if media == "cdrom":
            raise ConfigError("'ide-cd' is not supported by emu (no ATAPI): use media=disk")
        if media != "disk":
            raise ConfigError(f"invalid media '{media}'")
        if blk is not None and blk.read_only:
            raise ConfigError("Block node is read-only")
        self.blk = blk
        self.discard = discard
        self.serial = serial
        self.model = model
        self.version = version
        self.write_cache = write_cache
        self.nb_sectors = (blk.size >> SECTOR_BITS) if blk is not None else 0
        self.geometry = Geometry(0, 0, 0, ata.BIOS_ATA_TRANSLATION_NONE)
        if blk is not None:
            mbr = None
            if self.nb_sectors:
                try:
                    mbr = blk.read(0, SECTOR_SIZE)
                except Exception as err:  # unreadable sector 0: geometry from the size alone
                    log.warning("IDE: cannot read sector 0 of '%s' for geometry: %s", blk.name, err)
            self.geometry = guess_geometry(self.nb_sectors, mbr)
        self.identify_data: bytearray | None = None  # built once, then patched (as QEMU)
        # CHS translation for CHS-addressed commands; INITIALIZE DEVICE PARAMETERS changes it
        # and, as in QEMU, no reset restores it.
        self.heads = self.geometry.heads
        self.sectors = self.geometry.sectors
        if blk is not None and hasattr(blk, "add_resize_notifier"):
            blk.add_resize_notifier(self.resized)
        self.reset()

    @property
    def present(self) -> bool:
        return self.blk is not None

    def reset(self) -> None:
        """Power-on / SRST register state (QEMU's ide_reset + ide_set_signature)."""
        self.mult_sectors = MAX_MULT_SECTORS
        self.feature = self.hob_feature = 0
        self.error = 0
        self.nsector = self.hob_nsector = 0
        self.sector = self.hob_sector = 0
        self.lcyl = self.hob_lcyl = 0
        self.hcyl = self.hob_hcyl = 0
        self.select = 0xA0
        self.status = READY_STAT | SEEK_STAT
        self.lba48 = False
        self.req_nb_sectors = 0
        self.set_signature()
        # PIO transfer state: buf[ptr:end] is what the data port moves; end_fn runs at the end.
        self.buf: bytes | bytearray = bytearray(b"\xff" * 4)
        self.ptr = 0
        self.end = 0
        self.end_fn: Callable[[], None] | None = None
        self.pio_out = True  # data flows device -> host (reads allowed, writes ignored)

    def set_signature(self) -> None:
        self.select &= ~ATA_DEV_HS & 0xFF
        self.nsector = 1
        self.sector = 1
        if self.blk is not None:
            self.lcyl = self.hcyl = 0
        else:
            self.lcyl = self.hcyl = 0xFF

    # ---- addressing -----------------------------------------------------------------
    def get_sector(self) -> int:
        """The LBA the task file addresses (LBA48, LBA28 or CHS)."""
        if self.select & ATA_DEV_LBA:
            if self.lba48:
                return (self.hob_hcyl << 40 | self.hob_lcyl << 32 | self.hob_sector << 24
                        | self.hcyl << 16 | self.lcyl << 8 | self.sector)
            return (self.select & ATA_DEV_LBA_MSB) << 24 | self.hcyl << 16 | self.lcyl << 8 | self.sector
        return ((self.hcyl << 8 | self.lcyl) * self.heads * self.sectors
                + (self.select & ATA_DEV_HS) * self.sectors + (self.sector - 1))

    def set_sector(self, num: int) -> None:
        """Write ``num`` back to the task file (the address after the last sector done)."""
        if self.select & ATA_DEV_LBA:
            if self.lba48:
                self.sector = num & 0xFF
                self.lcyl = (num >> 8) & 0xFF
                self.hcyl = (num >> 16) & 0xFF
                self.hob_sector = (num >> 24) & 0xFF
                self.hob_lcyl = (num >> 32) & 0xFF
                self.hob_hcyl = (num >> 40) & 0xFF
            else:
                self.select = (self.select & ~ATA_DEV_LBA_MSB & 0xFF) | ((num >> 24) & ATA_DEV_LBA_MSB)
                self.hcyl = (num >> 16) & 0xFF
                self.lcyl = (num >> 8) & 0xFF
                self.sector = num & 0xFF
        else:
            per_cyl = self.heads * self.sectors
            if per_cyl <= 0 or self.sectors <= 0:
                return  # INITIALIZE DEVICE PARAMETERS with 0 sectors: no CHS to report
            cyl, r = divmod(num, per_cyl)
            self.hcyl = (cyl >> 8) & 0xFF
            self.lcyl = cyl & 0xFF
            self.select = (self.select & ~ATA_DEV_HS & 0xFF) | ((r // self.sectors) & ATA_DEV_HS)
            self.sector = (r % self.sectors + 1) & 0xFF

    def lba48_transform(self, lba48: bool) -> None:
        """Fold the sector count (0 means 256 / 65536) into ``nsector``."""
        self.lba48 = lba48
        if not lba48:
            if not self.nsector:
                self.nsector = 256
        elif not self.nsector and not self.hob_nsector:
            self.nsector = 65536
        else:
            self.nsector = (self.hob_nsector << 8) | (self.nsector & 0xFF)

    def range_ok(self, sector: int, count: int) -> bool:
        # the backend's current size, as QEMU's ide_sect_range_ok (after a block_resize it
        # is the new one even where nb_sectors and IDENTIFY keep the old)
        total = (self.blk.size >> SECTOR_BITS) if self.blk is not None else 0
        return not (sector > total or count > total - sector)

    # ---- IDENTIFY -------------------------------------------------------------------
    def identify(self) -> bytes:
        """IDENTIFY DEVICE data; built at the first call and kept (QEMU's identify_set)."""
        if self.identify_data is None:
            words = identify_words(self.nb_sectors, self.geometry, self.serial, self.model,
                                   self.version, self.mult_sectors, self.write_cache)
            self.identify_data = bytearray(words_to_bytes(words))
        return bytes(self.identify_data)

    def resized(self) -> None:
        """The backend's size changed (block_resize): QEMU's ide_resize_cb.  Once IDENTIFY
        data exists, the sector count and its capacity words (60-61 LBA28, capped; 100-103
        LBA48) follow the new size, with no interrupt; the CHS geometry (words 1-6, 54-58)
        stays.  Before the first IDENTIFY nothing changes (QEMU returns early the same way;
        the first IDENTIFY then shows the start-up size).  Range checks need nothing from
        here: :meth:`range_ok` reads the backend's size."""
        if self.identify_data is None or self.blk is None:
            return
        n = self.nb_sectors = self.blk.size >> SECTOR_BITS
        lba28 = min(n, (1 << 28) - 1)
        for word, value in ((60, lba28), (61, lba28 >> 16), (100, n), (101, n >> 16),
                            (102, n >> 32), (103, n >> 48)):
            self.patch_identify(word, value)

    def patch_identify(self, word: int, value: int) -> None:
        if self.identify_data is None:
            self.identify()
        assert self.identify_data is not None
        self.identify_data[2 * word : 2 * word + 2] = (value & 0xFFFF).to_bytes(2, "little")


Handler = Callable[["IdeChannel", IdeDrive, int], bool]
#: opcode -> (handler, set DSC on success); handlers return True when the command completed.
COMMANDS: dict[int, tuple[Handler, bool]] = {}


def command(*opcodes: int, dsc: bool = False) -> Callable[[Handler], Handler]:
    """Register a command handler for ``opcodes`` in :data:`COMMANDS`."""

    def deco(fn: Handler) -> Handler:
        for op in opcodes:
            COMMANDS[op] = (fn, dsc)
        return fn

    return deco


class IdeChannel:
    """One IDE channel: command block, control block, two drives, one IRQ.

    :param irq: the channel's interrupt line (ISA IRQ 14 / 15).
    :param master: device 0.
    :param slave: device 1.
    :param name: label for logs (``ide0``).
    """

    def __init__(self, irq: IrqLine, master: IdeDrive | None, slave: IdeDrive | None, name: str = "ide") -> None:
        self.irq = irq
        self.name = name
        self.drives = [master or IdeDrive(None), slave or IdeDrive(None)]
        self.lock = threading.RLock()
        self.bmdma: "BmDma | None" = None
        self.unit = 0
        self.ctrl = 0  # device control register (QEMU's bus->cmd)
        self.generation = 0
        #: A DMA command waiting for the bus master: (drive, kind), or None.
        self.dma_pending: tuple[IdeDrive, str] | None = None
        self.dma_running = False
        #: The backend of the last request this channel submitted, until the guest next
        #: reads a status register: a guest polling status rather than halting gets its
        #: request from the block workers at once instead of waiting for an idle vCPU.
        self.poll_handoff: "BlockBackend | None" = None
        self.data_port = _DataPort(self)
        self.cmd_block = _CommandBlock(self)
        self.ctrl_block = _ControlBlock(self)

    # ---- helpers --------------------------------------------------------------------
    @property
    def active(self) -> IdeDrive:
        return self.drives[self.unit]

    def _empty(self) -> bool:
        return self.drives[0].blk is None and self.drives[1].blk is None

    def _hidden(self, d: IdeDrive) -> bool:
        """Registers of a channel without disks, or of an absent slave, read as 0."""
        return self._empty() or (d is not self.drives[0] and d.blk is None)

    def submitted(self, blk: "BlockBackend") -> None:
        """A request of this channel went to ``blk`` (see :attr:`poll_handoff`)."""
        self.poll_handoff = blk

    def polled(self) -> None:
        """The guest read a status register: it is running, maybe polling for us."""
        blk = self.poll_handoff
        if blk is not None:
            self.poll_handoff = None
            blk.idle_handoff()

    def set_irq(self) -> None:
        """Assert the channel interrupt unless nIEN (the bus master sees it as BM INT)."""
        if not self.ctrl & IDE_CTRL_DISABLE_IRQ:
            if self.bmdma is not None:
                self.bmdma.interrupt()
            self.irq.raise_()

    def reset(self) -> None:
        """Bus reset (machine reset; QEMU's ide_bus_reset): both drives to power-on state."""
        with self.lock:
            self.generation += 1
            self.unit = 0
            self.ctrl = 0
            self.dma_pending = None
            self.dma_running = False
            for d in self.drives:
                d.reset()
            self.irq.lower()

    # ---- register reads ---------------------------------------------------------------
    def read_reg(self, reg: int) -> int:
        d = self.drives[self.unit]
        if reg == ATA_REG_STATUS:
            with self.lock:
                ret = 0 if self._hidden(d) else d.status
                if self.irq.level:      # a guest reads status a few times per command
                    self.irq.lower()
            if self.poll_handoff is not None:
                self.polled()
            return ret
        if reg == ATA_REG_DATA:
            return 0xFF
        if self._empty():
            return 0
        hob = self.ctrl & IDE_CTRL_HOB
        if reg == ATA_REG_SELECT:
            return d.select
        if reg == ATA_REG_ERROR:
            if self._hidden(d):
                return 0
            return d.hob_feature if hob else d.error
        if reg == ATA_REG_NSECTOR:
            return d.hob_nsector if hob else d.nsector & 0xFF
        if reg == ATA_REG_SECTOR:
            return d.hob_sector if hob else d.sector
        if reg == ATA_REG_LCYL:
            return d.hob_lcyl if hob else d.lcyl
        return d.hob_hcyl if hob else d.hcyl  # ATA_REG_HCYL

    def read_alt_status(self) -> int:
        d = self.drives[self.unit]
        if self.poll_handoff is not None:
            self.polled()
        return 0 if self._hidden(d) else d.status

    # ---- register writes --------------------------------------------------------------
    def write_reg(self, reg: int, val: int) -> None:
        with self.lock:
            d = self.drives[self.unit]
            # a busy device ignores writes to the command block other than the command
            if reg != ATA_REG_STATUS and d.status & (BUSY_STAT | DRQ_STAT):
                return
            self.ctrl &= ~IDE_CTRL_HOB
            a, b = self.drives
            if reg == ATA_REG_ERROR:
                a.hob_feature, b.hob_feature = a.feature, b.feature
                a.feature = b.feature = val
            elif reg == ATA_REG_NSECTOR:
                a.hob_nsector, b.hob_nsector = a.nsector & 0xFF, b.nsector & 0xFF
                a.nsector = b.nsector = val
            elif reg == ATA_REG_SECTOR:
                a.hob_sector, b.hob_sector = a.sector, b.sector
                a.sector = b.sector = val
            elif reg == ATA_REG_LCYL:
                a.hob_lcyl, b.hob_lcyl = a.lcyl, b.lcyl
                a.lcyl = b.lcyl = val
            elif reg == ATA_REG_HCYL:
                a.hob_hcyl, b.hob_hcyl = a.hcyl, b.hcyl
                a.hcyl = b.hcyl = val
            elif reg == ATA_REG_SELECT:
                a.select = b.select = val | ATA_DEV_ALWAYS_ON
                self.unit = 1 if val & ATA_DEV_SELECT else 0
            elif reg == ATA_REG_STATUS:
                if self.irq.level:
                    self.irq.lower()
                self.exec_cmd(val)

    def write_ctrl(self, val: int) -> None:
        with self.lock:
            edge = not self.ctrl & IDE_CTRL_RESET and val & IDE_CTRL_RESET
            self.ctrl = val
            if edge:
                # SRST rising edge: QEMU resets from a bottom half right away (then forgets
                # SRST, so setting it again resets again); so do we.
                self.generation += 1
                self.dma_pending = None
                self.dma_running = False
                if self.bmdma is not None:
                    self.bmdma.set_inactive(False)
                for d in self.drives:
                    d.status |= BUSY_STAT
                    d.reset()
                    self._diagnostic(d)
                self.ctrl &= ~IDE_CTRL_RESET

    # ---- command execution ------------------------------------------------------------
    def exec_cmd(self, val: int) -> None:
        d = self.drives[self.unit]
        if d is not self.drives[0] and d.blk is None:
            return  # commands to a non-existent slave are ignored
        if d.status & (BUSY_STAT | DRQ_STAT):
            return  # only DEVICE RESET (ATAPI) is allowed while busy
        entry = COMMANDS.get(val)
        if entry is None:
            self.abort(d)
            self.set_irq()
            return
        handler, dsc = entry
        d.status = READY_STAT | BUSY_STAT
        d.error = 0
        if handler(self, d, val):
            d.status &= ~BUSY_STAT
            if dsc and not d.error:
                d.status |= SEEK_STAT
            self.set_irq()

    def abort(self, d: IdeDrive) -> None:
        """ABRT: transfer stopped, DRDY|ERR, error ABRT."""
        d.error = ABRT_ERR
        self.transfer_stop(d, READY_STAT | ERR_STAT)

    def rw_error(self, d: IdeDrive) -> None:
        self.abort(d)
        self.set_irq()

    def _diagnostic(self, d: IdeDrive) -> bool:
        d.set_signature()
        d.status = READY_STAT | SEEK_STAT
        d.error = 0x01  # diagnostic code: device 0 passed, device 1 passed or absent
        self.set_irq()
        return False

    # ---- PIO --------------------------------------------------------------------------
    def transfer_start(self, d: IdeDrive, buf: "bytes | bytearray", size: int, end_fn: Callable[[], None],
                       out: bool, status: int | None = None) -> None:
        """Open the data port on ``buf[:size]``; ``end_fn`` runs when it has all moved.

        :param out: device-to-host (the guest reads) when True.
        :param status: the new status (default: the current one), DRQ added.  It is stored
            last and in one go, so a guest polling the lock-free alternate status from the
            vCPU never sees BSY gone before DRQ is there.
        """
        d.buf = buf
        d.ptr = 0
        d.end = size
        d.end_fn = end_fn
        d.pio_out = out
        st = d.status if status is None else status
        d.status = st if st & ERR_STAT else st | DRQ_STAT

    def transfer_stop(self, d: IdeDrive, status: int | None = None) -> None:
        """Close the data port; ``status`` (default: the current one) without DRQ, in one store."""
        d.end_fn = None
        d.ptr = d.end = 0
        d.pio_out = True
        d.status = (d.status if status is None else status) & ~DRQ_STAT

    def data_read(self, size: int) -> int:
        """16/32-bit read of the data port (hot path: no lock, see module docstring)."""
        d = self.drives[self.unit]
        if not d.status & DRQ_STAT or not d.pio_out:
            return 0
        p = d.ptr
        e = p + size
        end = d.end
        if e > end:
            return 0
        d.ptr = e
        v = (_U16(d.buf, p) if size == 2 else _U32(d.buf, p))[0]
        if e >= end:
            self._end_transfer(d)
        return v

    def data_port_read(self, offset: int, size: int) -> int:
        """The data port's ``io_read``: bound straight onto the bus (one call per access)."""
        if size == 1:  # not a driver's access; QEMU widens it to a word read
            return self.data_read(2) & 0xFF
        return self.data_read(size)

    def data_write(self, size: int, value: int) -> None:
        """16/32-bit write of the data port."""
        d = self.drives[self.unit]
        if not d.status & DRQ_STAT or d.pio_out:
            return
        p = d.ptr
        e = p + size
        end = d.end
        if e > end:
            return
        d.ptr = e
        if size == 2:
            _P16(d.buf, p, value & 0xFFFF)
        else:
            _P32(d.buf, p, value & 0xFFFFFFFF)
        if e >= end:
            self._end_transfer(d)

    def data_port_write(self, offset: int, size: int, value: int) -> None:
        """The data port's ``io_write`` (byte writes are ignored)."""
        if size != 1:
            self.data_write(size, value)

    def _end_transfer(self, d: IdeDrive) -> None:
        with self.lock:
            d.status &= ~DRQ_STAT
            fn = d.end_fn
            if fn is None:
                self.transfer_stop(d)
            else:
                fn()

    def _stop_fn(self, d: IdeDrive) -> Callable[[], None]:
        return lambda: self.transfer_stop(d)

    # PIO read: one aio read per block (1 sector, or the multiple count), DRQ when it lands.
    def sector_read(self, d: IdeDrive) -> None:
        d.status = READY_STAT | SEEK_STAT
        d.error = 0
        n = d.nsector
        if n == 0:
            self.transfer_stop(d)
            return
        d.status |= BUSY_STAT
        n = min(n, d.req_nb_sectors)
        sector = d.get_sector()
        if not d.range_ok(sector, n):
            self.rw_error(d)
            return
        gen = self.generation
        assert d.blk is not None

        def done(result: Any) -> None:
            with self.lock:
                if gen != self.generation:
                    return
                if isinstance(result, BaseException):
                    log.warning("%s: read error at sector %d: %s", self.name, sector, result)
                    self.rw_error(d)
                    return
                d.set_sector(sector + n)
                d.nsector -= n
                self.transfer_start(d, result, n * SECTOR_SIZE, lambda: self.sector_read(d), True,
                                    d.status & ~BUSY_STAT)
                self.set_irq()

        self.submitted(d.blk)
        d.blk.aio_read(sector << SECTOR_BITS, n * SECTOR_SIZE, done)

    # PIO write: the guest fills the buffer, then one aio write per block.
    def start_write_block(self, d: IdeDrive, status: int | None = None) -> None:
        n = min(d.nsector, d.req_nb_sectors)
        self.transfer_start(d, bytearray(n * SECTOR_SIZE), n * SECTOR_SIZE, lambda: self.sector_write(d), False,
                            status)

    def sector_write(self, d: IdeDrive) -> None:
        d.status = READY_STAT | SEEK_STAT | BUSY_STAT
        sector = d.get_sector()
        n = min(d.nsector, d.req_nb_sectors)
        if not d.range_ok(sector, n):
            self.rw_error(d)
            return
        data = bytes(d.buf[: n * SECTOR_SIZE])
        gen = self.generation
        assert d.blk is not None

        def done(result: Any) -> None:
            with self.lock:
                if gen != self.generation:
                    return
                if isinstance(result, BaseException):
                    log.warning("%s: write error at sector %d: %s", self.name, sector, result)
                    self.rw_error(d)
                    return
                d.nsector -= n
                d.set_sector(sector + n)
                if d.nsector == 0:
                    self.transfer_stop(d, d.status & ~BUSY_STAT)
                else:
                    self.start_write_block(d, d.status & ~BUSY_STAT)
                self.set_irq()

        self.submitted(d.blk)
        d.blk.aio_write(sector << SECTOR_BITS, data, done)

    def flush(self, d: IdeDrive) -> None:
        if d.blk is None:
            d.status = READY_STAT | SEEK_STAT
            self.set_irq()
            return
        d.status |= BUSY_STAT
        gen = self.generation

        def done(result: Any) -> None:
            with self.lock:
                if gen != self.generation:
                    return
                if isinstance(result, BaseException):
                    log.warning("%s: flush error: %s", self.name, result)
                    self.rw_error(d)
                    return
                d.status = READY_STAT | SEEK_STAT
                self.set_irq()

        self.submitted(d.blk)
        d.blk.aio_flush(done)

    # ---- DMA (the bus master does the moving, see bmdma.py) -------------------------------
    def start_dma(self, d: IdeDrive, kind: str) -> None:
        d.status = READY_STAT | SEEK_STAT | DRQ_STAT
        self.dma_pending = (d, kind)
        if self.bmdma is not None:
            self.bmdma.command_ready()

    def dma_error(self, d: IdeDrive) -> None:
        """QEMU's ide_dma_error: ABRT, bus master inactive, interrupt."""
        self.dma_pending = None
        self.dma_running = False
        self.abort(d)
        if self.bmdma is not None:
            self.bmdma.set_inactive(False)
        self.set_irq()


# ---- the command table ------------------------------------------------------------------


@command(ata.WIN_IDENTIFY)
def cmd_identify(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    buf = bytearray(d.identify())
    d.status = READY_STAT | SEEK_STAT
    ch.transfer_start(d, buf, SECTOR_SIZE, ch._stop_fn(d), True)
    ch.set_irq()
    return False


@command(ata.WIN_READ, ata.WIN_READ_ONCE, ata.WIN_READ_EXT)
def cmd_read_pio(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_READ_EXT)
    d.req_nb_sectors = 1
    ch.sector_read(d)
    return False


@command(ata.WIN_WRITE, ata.WIN_WRITE_ONCE, ata.WIN_WRITE_EXT, ata.WIN_WRITE_VERIFY)
def cmd_write_pio(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_WRITE_EXT)
    d.req_nb_sectors = 1
    d.status = SEEK_STAT | READY_STAT
    ch.start_write_block(d)
    return False


@command(ata.WIN_MULTREAD, ata.WIN_MULTREAD_EXT)
def cmd_read_multiple(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None or not d.mult_sectors:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_MULTREAD_EXT)
    d.req_nb_sectors = d.mult_sectors
    ch.sector_read(d)
    return False


@command(ata.WIN_MULTWRITE, ata.WIN_MULTWRITE_EXT)
def cmd_write_multiple(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None or not d.mult_sectors:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_MULTWRITE_EXT)
    d.req_nb_sectors = d.mult_sectors
    d.status = SEEK_STAT | READY_STAT
    ch.start_write_block(d)
    return False


@command(ata.WIN_READDMA, ata.WIN_READDMA_ONCE, ata.WIN_READDMA_EXT)
def cmd_read_dma(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_READDMA_EXT)
    ch.start_dma(d, IDE_DMA_READ)
    return False


@command(ata.WIN_WRITEDMA, ata.WIN_WRITEDMA_ONCE, ata.WIN_WRITEDMA_EXT)
def cmd_write_dma(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_WRITEDMA_EXT)
    ch.start_dma(d, IDE_DMA_WRITE)
    return False


@command(ata.WIN_DSM)
def cmd_data_set_management(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.feature == DSM_TRIM and d.blk is not None:
        # QEMU takes the count register as it is here (no 0 -> 65536 rule)
        ch.start_dma(d, IDE_DMA_TRIM)
        return False
    ch.abort(d)
    return True


@command(ata.WIN_FLUSH_CACHE, ata.WIN_FLUSH_CACHE_EXT)
def cmd_flush_cache(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    ch.flush(d)
    return False


@command(ata.WIN_VERIFY, ata.WIN_VERIFY_ONCE, ata.WIN_VERIFY_EXT, dsc=True)
def cmd_verify(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    d.lba48_transform(cmd == ata.WIN_VERIFY_EXT)
    return True


@command(ata.WIN_SEEK, dsc=True)
def cmd_seek(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    return True


@command(ata.WIN_RECAL, dsc=True)
def cmd_recalibrate(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    return True


@command(ata.WIN_STANDBYNOW1, ata.WIN_STANDBYNOW2, ata.WIN_IDLEIMMEDIATE, ata.WIN_IDLEIMMEDIATE2,
         ata.WIN_STANDBY, ata.WIN_STANDBY2, ata.WIN_SETIDLE1, ata.WIN_SETIDLE2,
         ata.WIN_SLEEPNOW1, ata.WIN_SLEEPNOW2)
def cmd_nop(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    return True


@command(ata.WIN_CHECKPOWERMODE1, ata.WIN_CHECKPOWERMODE2, dsc=True)
def cmd_check_power_mode(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    d.nsector = 0xFF  # active or idle
    return True


@command(ata.WIN_SPECIFY, dsc=True)
def cmd_specify(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    d.heads = (d.select & ATA_DEV_HS) + 1
    d.sectors = d.nsector & 0xFF
    ch.set_irq()
    return True


@command(ata.WIN_SETMULT, dsc=True)
def cmd_set_multiple_mode(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    n = d.nsector & 0xFF
    if n and (n > MAX_MULT_SECTORS or n & (n - 1)):
        ch.abort(d)
    else:
        d.mult_sectors = n
    return True


@command(ata.WIN_READ_NATIVE_MAX, ata.WIN_READ_NATIVE_MAX_EXT, dsc=True)
def cmd_read_native_max(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.nb_sectors == 0:
        ch.abort(d)
        return True
    d.lba48_transform(cmd == ata.WIN_READ_NATIVE_MAX_EXT)
    d.set_sector(d.nb_sectors - 1)
    return True


@command(ata.WIN_DIAGNOSE)
def cmd_exec_dev_diagnostic(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    return ch._diagnostic(d)


@command(ata.WIN_SETFEATURES, dsc=True)
def cmd_set_features(ch: IdeChannel, d: IdeDrive, cmd: int) -> bool:
    if d.blk is None:
        ch.abort(d)
        return True
    f = d.feature
    if f == SETFEATURES_EN_WCACHE:
        d.write_cache = True
        d.patch_identify(85, (1 << 14) | (1 << 5) | 1)
        ch.set_irq()
        d.status = READY_STAT | SEEK_STAT
        return True
    if f == SETFEATURES_DIS_WCACHE:
        d.write_cache = False
        d.patch_identify(85, (1 << 14) | 1)
        ch.flush(d)  # the cache is written back before it goes away
        return False
    if f in SETFEATURES_IGNORED:
        d.status = READY_STAT | SEEK_STAT
        ch.set_irq()
        return True
    if f == SETFEATURES_XFER:
        mode, val = d.nsector >> 3, d.nsector & 0x07
        w62, w63, w88 = 0x07, 0x07, 0x3F
        if mode == 0x02:
            w62 |= 1 << (val + 8)
        elif mode == 0x04:
            w63 |= 1 << (val + 8)
        elif mode == 0x08:
            w88 |= 1 << (val + 8)
        elif mode not in (0x00, 0x01):
            ch.abort(d)
            return True
        d.patch_identify(62, w62)
        d.patch_identify(63, w63)
        d.patch_identify(88, w88)
        d.status = READY_STAT | SEEK_STAT
        ch.set_irq()
        return True
    ch.abort(d)
    return True


# ---- port front ends (what the IOBus calls) ---------------------------------------------


class _DataPort:
    """Port 0x1F0 / 0x170: 16/32-bit PIO data."""

    io_max_size = 4

    def __init__(self, ch: IdeChannel) -> None:
        self.name = f"{ch.name} data"
        self._ch = ch
        self.io_read = ch.data_port_read
        self.io_write = ch.data_port_write


class _CommandBlock:
    """Ports 0x1F1-0x1F7 / 0x171-0x177 (byte registers; offset 0 is port 1)."""

    io_max_size = 1

    def __init__(self, ch: IdeChannel) -> None:
        self.name = f"{ch.name} command block"
        self._ch = ch

    def io_read(self, offset: int, size: int) -> int:
        return self._ch.read_reg(offset + 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._ch.write_reg(offset + 1, value & 0xFF)


class _ControlBlock:
    """Port 0x3F6 / 0x376: alternate status (read), device control (write)."""

    io_max_size = 1

    def __init__(self, ch: IdeChannel) -> None:
        self.name = f"{ch.name} control block"
        self._ch = ch

    def io_read(self, offset: int, size: int) -> int:
        return self._ch.read_alt_status()

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._ch.write_ctrl(value & 0xFF)

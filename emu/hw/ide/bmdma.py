"""PCI bus-master IDE DMA (SFF-8038i), as on the PIIX3: BAR4, 8 bytes per channel.

=======  ======  ===============================================================
offset   width   register
=======  ======  ===============================================================
0        1       command: bit 0 start/stop, bit 3 direction (1 = to memory)
2        1       status: bit 0 active, bit 1 error (W1C), bit 2 interrupt (W1C),
                 bits 5-6 drive 0/1 DMA capable (read/write)
4        1/2/4   PRD table physical address (dword aligned)
=======  ======  ===============================================================

A PRD (physical region descriptor) is 8 bytes: a 32-bit physical address, a 16-bit byte
count (0 means 64 KiB; bit 0 ignored) and bit 31 of the second dword marking the last
entry.  Like QEMU, the table is read until its last entry or for at most one 4 KiB page.

A transfer runs when both the ATA command (READ/WRITE DMA) and the start bit are there,
in either order.  The whole request is one ``aio_read`` / ``aio_write`` of the backend;
reads are scattered into guest RAM by the completion (worker thread), followed by the
vCPU's code invalidation for each region.  Completion: ATA status DRDY|DSC, interrupt
(status bit 2), active bit cleared unless the PRDs were longer than the transfer.

Guest faults and where emu differs from QEMU 7.2 on purpose: a PRD table that runs out
of RAM, regions outside RAM, or PRDs shorter than the transfer end the command with the
bus-master error bit, ATA ERR/ABRT and an interrupt (QEMU drops writes to unassigned
memory and, for short PRDs, stops without an interrupt, which leaves a guest waiting).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any, Callable

from emu.hw.ide.ata import READY_STAT, SECTOR_BITS, SECTOR_SIZE, SEEK_STAT

if TYPE_CHECKING:
    from emu.hw.ide.core import IdeChannel, IdeDrive

log = logging.getLogger(__name__)

BM_CMD_START = 0x01
BM_CMD_READ = 0x08  # direction: device to memory
BM_STATUS_DMAING = 0x01
BM_STATUS_ERROR = 0x02
BM_STATUS_INT = 0x04
BM_STATUS_DRIVE_CAPS = 0x60  # drive 0/1 DMA capable: plain read/write bits
BMDMA_PAGE_SIZE = 4096
PRD_EOT = 0x80000000
_PRD = struct.Struct("<II")


class DmaMemory:
    """Guest-physical memory as a device's DMA engine sees it.

    :param ram: guest RAM, index = guest-physical address (a bytearray in tests; the
        vCPU's ``ram`` when no ``dma_view`` is given).
    :param invalidate: called ``(gpa, length)`` after each write into RAM (the vCPU's
        ``invalidate_code``, so translated code in that range is dropped).
    :param dma_view: ``(gpa, length) -> memoryview | None``, the vCPU's ``dma_view``: the
        PC memory map (VGA hole, RAM above 4 GiB); None means ``ram`` indexed directly.
    """

    def __init__(self, ram: Any, invalidate: Callable[[int, int], None] | None = None,
                 dma_view: Callable[[int, int], memoryview | None] | None = None) -> None:
        self.ram = memoryview(ram).cast("B") if not isinstance(ram, memoryview) else ram
        self.size = len(self.ram)
        self.invalidate = invalidate
        self.view = dma_view or self._direct_view

    def _direct_view(self, addr: int, length: int) -> memoryview | None:
        if addr < 0 or length < 0 or addr + length > self.size:
            return None
        return self.ram[addr : addr + length]

    def valid(self, addr: int, length: int) -> bool:
        """True when ``[addr, addr + length)`` is entirely RAM."""
        return self.view(addr, length) is not None

    def read(self, addr: int, length: int) -> bytes | None:
        """Bytes at ``addr``, or None if the range is not all RAM."""
        v = self.view(addr, length)
        return None if v is None else bytes(v)

    def write(self, addr: int, data: bytes | memoryview) -> bool:
        """Store ``data`` at ``addr`` and invalidate code there; False if not all RAM."""
        n = len(data)
        v = self.view(addr, n)
        if v is None:
            return False
        v[:] = data
        if self.invalidate is not None:
            self.invalidate(addr, n)
        return True


class BmDma:
    """The bus-master registers and engine of one channel.

    :param channel: the IDE channel this engine serves.
    :param memory: guest memory for PRD tables and data.
    :param master_enabled: whether the function may master the bus now (PCI command bit 2).
    """

    def __init__(self, channel: "IdeChannel", memory: DmaMemory,
                 master_enabled: Callable[[], bool] | None = None) -> None:
        self.ch = channel
        self.memory = memory
        self.master_enabled = master_enabled
        channel.bmdma = self
        self.cmd = 0
        self.status = 0
        self.addr = 0
        self.cur_addr = 0

    def reset(self) -> None:
        """Register power-on state (PCI reset)."""
        with self.ch.lock:
            self.cmd = 0
            self.status = 0
            self.addr = 0
            self.cur_addr = 0

    # ---- called by the channel (its lock held) -----------------------------------------
    def interrupt(self) -> None:
        self.status |= BM_STATUS_INT

    def set_inactive(self, more: bool) -> None:
        if more:
            self.status |= BM_STATUS_DMAING
        else:
            self.status &= ~BM_STATUS_DMAING

    def command_ready(self) -> None:
        """A DMA command was issued: go if the guest already started the engine."""
        if self.status & BM_STATUS_DMAING and not self.ch.dma_running:
            self._run()

    # ---- registers ------------------------------------------------------------------
    def write_cmd(self, val: int) -> None:
        with self.ch.lock:
            if (val ^ self.cmd) & BM_CMD_START:
                if not val & BM_CMD_START:
                    # Stop.  QEMU waits for a request in flight and lets it complete; ours
                    # completes on its own (waiting here could stall a quiesce).
                    self.status &= ~BM_STATUS_DMAING
                else:
                    self.cur_addr = self.addr
                    if not self.status & BM_STATUS_DMAING:
                        self.status |= BM_STATUS_DMAING
                        if self.ch.dma_pending is not None and not self.ch.dma_running:
                            self._run()
            self.cmd = val & (BM_CMD_START | BM_CMD_READ)

    def write_status(self, val: int) -> None:
        with self.ch.lock:
            self.status = ((val & BM_STATUS_DRIVE_CAPS) | (self.status & BM_STATUS_DMAING)
                           | (self.status & ~val & (BM_STATUS_ERROR | BM_STATUS_INT)))

    def read_addr(self, offset: int, size: int) -> int:
        return (self.addr >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write_addr(self, offset: int, size: int, value: int) -> None:
        shift = 8 * offset
        mask = (1 << (8 * size)) - 1
        self.addr &= ~(mask << shift)
        self.addr = (self.addr | ((value & mask) << shift) & ~3) & 0xFFFFFFFF

    # ---- the engine -------------------------------------------------------------------
    def _fail(self, d: "IdeDrive", why: str) -> None:
        """A bus-master fault: error bit, ATA ERR/ABRT, interrupt, engine inactive."""
        log.warning("%s: bus-master DMA error: %s", self.ch.name, why)
        self.status |= BM_STATUS_ERROR
        self.ch.dma_error(d)

    def _prd_walk(self, limit: int) -> tuple[list[tuple[int, int]], int, int] | str:
        """Read the PRD table: (regions up to ``limit`` bytes, their total, all PRD bytes)."""
        mem = self.memory
        regions: list[tuple[int, int]] = []
        sg_size = 0
        prd_bytes = 0
        while True:
            if self.cur_addr - self.addr >= BMDMA_PAGE_SIZE:
                break  # fail-safe of one page, as QEMU
            raw = mem.read(self.cur_addr, 8)
            if raw is None:
                return f"PRD table at 0x{self.cur_addr:x} is outside RAM"
            self.cur_addr += 8
            paddr, count = _PRD.unpack(raw)
            length = (count & 0xFFFE) or 0x10000
            take = min(limit - sg_size, length)
            if take:
                if not mem.valid(paddr, take):
                    return f"PRD region 0x{paddr:x}+0x{take:x} is outside RAM"
                regions.append((paddr, take))
                sg_size += take
            prd_bytes += length
            if count & PRD_EOT:
                break
        return regions, sg_size, prd_bytes

    def _run(self) -> None:
        """Start the pending DMA command (channel lock held)."""
        ch = self.ch
        assert ch.dma_pending is not None
        d, kind = ch.dma_pending
        if self.master_enabled is not None and not self.master_enabled():
            self._fail(d, "bus mastering is disabled in the PCI command register")
            return
        n = d.nsector
        limit = n * SECTOR_SIZE
        if n == 0:  # DSM with a zero count: nothing to move (QEMU completes at once)
            ch.dma_pending = None
            d.status = READY_STAT | SEEK_STAT
            ch.set_irq()
            self.set_inactive(False)
            return
        walked = self._prd_walk(limit)
        if isinstance(walked, str):
            self._fail(d, walked)
            return
        regions, sg_size, prd_bytes = walked
        if sg_size < limit:
            self._fail(d, f"PRDs describe {sg_size} bytes, the command moves {limit}")
            return
        stay_active = prd_bytes > limit
        sector = d.get_sector()
        from emu.hw.ide.core import IDE_DMA_READ, IDE_DMA_TRIM, IDE_DMA_WRITE

        if kind in (IDE_DMA_READ, IDE_DMA_WRITE) and not d.range_ok(sector, n):
            ch.dma_error(d)
            return
        ch.dma_running = True
        gen = ch.generation
        blk = d.blk
        assert blk is not None

        def finish(result: Any) -> None:
            # called with the channel lock held
            if gen != ch.generation:
                return
            ch.dma_running = False
            if isinstance(result, BaseException):
                log.warning("%s: DMA %s error at sector %d: %s", ch.name, kind, sector, result)
                ch.dma_error(d)
                return
            d.set_sector(sector + n)
            d.nsector = 0
            d.status = READY_STAT | SEEK_STAT
            ch.dma_pending = None
            ch.set_irq()
            self.set_inactive(stay_active)

        if kind == IDE_DMA_READ:
            def read_done(result: Any) -> None:
                if not isinstance(result, BaseException) and gen == ch.generation:
                    view = memoryview(result)
                    off = 0
                    for addr, length in regions:
                        self.memory.write(addr, view[off : off + length])
                        off += length
                with ch.lock:
                    finish(result)

            ch.submitted(blk)
            blk.aio_read(sector << SECTOR_BITS, limit, read_done)
            return

        data = b"".join(self.memory.read(a, n_) or b"" for a, n_ in regions)

        def locked_finish(result: Any) -> None:
            with ch.lock:
                finish(result)

        if kind == IDE_DMA_WRITE:
            ch.submitted(blk)
            blk.aio_write(sector << SECTOR_BITS, data, locked_finish)
            return
        if kind == IDE_DMA_TRIM:
            self._trim(d, data, locked_finish)
            return
        ch.dma_running = False
        ch.dma_error(d)

    def _trim(self, d: "IdeDrive", data: bytes, done: Callable[[Any], None]) -> None:
        """DATA SET MANAGEMENT / TRIM: 8-byte ranges (48-bit LBA, 16-bit count)."""
        ranges = []
        for off in range(0, len(data) - 7, 8):
            entry = int.from_bytes(data[off : off + 8], "little")
            lba, count = entry & 0xFFFFFFFFFFFF, entry >> 48
            if not count:
                continue
            if not d.range_ok(lba, count):
                done(ValueError(f"TRIM range {lba}+{count} is past the end"))
                return
            ranges.append((lba, count))
        assert d.blk is not None
        blk = d.blk
        if not ranges or not d.discard:
            done(None)
            return
        left = [len(ranges)]
        errors: list[BaseException] = []

        def one(result: Any) -> None:
            if isinstance(result, BaseException):
                errors.append(result)
            left[0] -= 1
            if left[0] == 0:
                done(errors[0] if errors else None)

        for lba, count in ranges:
            blk.aio_discard(lba << SECTOR_BITS, count << SECTOR_BITS, one)


class BmDmaBar:
    """BAR4's 16 bytes: channel 0's registers at 0-7, channel 1's at 8-15."""

    io_max_size = 4

    def __init__(self, engines: list[BmDma], name: str = "piix3-ide bmdma") -> None:
        self.engines = engines
        self.name = name

    def io_read(self, offset: int, size: int) -> int:
        bm = self.engines[(offset >> 3) & 1]
        reg = offset & 7
        if reg >= 4:
            return bm.read_addr(reg - 4, size)
        if size != 1:
            return (1 << (8 * size)) - 1
        if reg == 0:
            return bm.cmd
        if reg == 2:
            if bm.ch.poll_handoff is not None:
                bm.ch.polled()
            with bm.ch.lock:  # INT and ACTIVE change together at completion
                return bm.status
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        bm = self.engines[(offset >> 3) & 1]
        reg = offset & 7
        if reg >= 4:
            bm.write_addr(reg - 4, size, value)
            return
        if size != 1:
            return
        if reg == 0:
            bm.write_cmd(value & 0xFF)
        elif reg == 2:
            bm.write_status(value & 0xFF)

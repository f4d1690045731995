"""The PIIX3 IDE function (00:01.1, 8086:7010), as QEMU's ``piix3-ide``.

Configuration space as QEMU 7.2 shows it (dumped from qemu-system-x86_64): class 0x0101,
prog-if 0x80 (legacy mode, bus master), revision 0, header type 0, no INTx pin,
subsystem 1AF4:1100, status 0x0280 (medium DEVSEL, fast back-to-back), command 0, BAR4 (16
bytes of I/O, the bus-master registers) reading 0x00000001 until assigned.

Legacy ports: the primary channel at 0x1F0-0x1F7 + 0x3F6 on IRQ 14, the secondary at
0x170-0x177 + 0x376 on IRQ 15.  A channel decodes them while PCI I/O space is enabled
(command bit 0) and its IDETIM register (0x40 primary, 0x42 secondary) has bit 15, IDE
Decode Enable, set — the PIIX3 datasheet's rule, which firmware (ours, SeaBIOS) and
:func:`emu.hw.pci.setup.assign_resources` follow.  (QEMU 7.2 decodes them whatever these
bits say.)

Wiring (what the board does)::

    ide = PiixIde(board.iobus, [irq14, irq15], [d0, d1, d2, d3],
                  DmaMemory(vcpu.ram, vcpu.invalidate_code, vcpu.dma_view))
    board.pci.add(ide, PIIX3_SLOT, 1)

or :func:`attach_piix_ide(board, vcpu.ram, vcpu.invalidate_code, backends, dma_view=vcpu.dma_view)
<attach_piix_ide>`, which does both.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any, Sequence

from emu.hw.bus import BusError, IOBus
from emu.hw.ide.bmdma import BmDma, BmDmaBar, DmaMemory
from emu.hw.ide.core import IdeChannel, IdeDrive
from emu.hw.irq import IrqLine
from emu.hw.pci.device import PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_STATUS, PciFunction

if TYPE_CHECKING:
    from emu.block.api import BlockBackend

log = logging.getLogger(__name__)

PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_82371SB_1 = 0x7010
PCI_CLASS_STORAGE_IDE = 0x0101
PIIX_IDE_PROG_IF = 0x80  # legacy (compatibility) mode on both channels, bus master capable
PCI_STATUS_FAST_BACK = 0x0080
PCI_STATUS_DEVSEL_MEDIUM = 0x0200
BMIBA_BAR = 4
BMIBA_SIZE = 16

IDETIM = (0x40, 0x42)  # IDE timing registers, primary / secondary
IDETIM_IDE = 0x8000  # IDE Decode Enable

#: (command block base, control block port, ISA IRQ) per channel
LEGACY = ((0x1F0, 0x3F6, 14), (0x170, 0x376, 15))


class PiixIde(PciFunction):
    """PIIX3 IDE controller: two channels, legacy ports, bus-master DMA in BAR4.

    :param iobus: where the legacy ports go (the board's I/O bus).
    :param irqs: the channels' interrupt lines (ISA IRQ 14 and 15).
    :param drives: up to four :class:`IdeDrive` or None, in order primary master, primary
        slave, secondary master, secondary slave.
    :param memory: guest memory for bus-master DMA.
    """

    def __init__(self, iobus: IOBus, irqs: Sequence[IrqLine], drives: Sequence[IdeDrive | None],
                 memory: DmaMemory) -> None:
        super().__init__(PCI_VENDOR_ID_INTEL, PCI_DEVICE_ID_INTEL_82371SB_1,
                         PCI_CLASS_STORAGE_IDE << 8 | PIIX_IDE_PROG_IF, name="piix3-ide")
        drv = list(drives) + [None] * (4 - len(drives))
        if len(drv) > 4:
            raise ValueError("PIIX3 IDE has two channels of two devices")
        self.iobus = iobus
        self.channels = [
            IdeChannel(irqs[0], drv[0], drv[1], "ide0"),
            IdeChannel(irqs[1], drv[2], drv[3], "ide1"),
        ]
        self.bmdma = [BmDma(ch, memory, self._master_enabled) for ch in self.channels]
        self.bar = self.add_bar(BMIBA_BAR, BMIBA_SIZE, BmDmaBar(self.bmdma), io=True)
        struct.pack_into("<H", self.config, PCI_STATUS, PCI_STATUS_DEVSEL_MEDIUM | PCI_STATUS_FAST_BACK)
        self._legacy_on = [False, False]

    @property
    def drives(self) -> list[IdeDrive]:
        """The four device positions (absent ones have ``blk is None``)."""
        return [d for ch in self.channels for d in ch.drives]

    def _master_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    # ---- legacy decode -----------------------------------------------------------------
    def _decodes(self, i: int) -> bool:
        timing = self.config[IDETIM[i]] | self.config[IDETIM[i] + 1] << 8
        return bool(self.command & PCI_COMMAND_IO and timing & IDETIM_IDE)

    def _update_legacy(self) -> None:
        for i, ch in enumerate(self.channels):
            want = self._decodes(i)
            if want == self._legacy_on[i]:
                continue
            base, ctrl, _ = LEGACY[i]
            if want:
                try:
                    self.iobus.register_ports(base, 1, ch.data_port)
                    self.iobus.register_ports(base + 1, 7, ch.cmd_block)
                    self.iobus.register_ports(ctrl, 1, ch.ctrl_block)
                except BusError as err:
                    log.warning("%s: legacy ports of %s not mapped: %s", self.name, ch.name, err)
                    for port in (base, base + 1, ctrl):
                        try:
                            self.iobus.unregister(port)
                        except BusError:
                            pass
                    continue
            else:
                for port in (base, base + 1, ctrl):
                    self.iobus.unregister(port)
            self._legacy_on[i] = want

    def config_written(self, offset: int, size: int, value: int) -> None:
        end = offset + size
        if offset < PCI_COMMAND + 2 and end > PCI_COMMAND or offset < IDETIM[1] + 2 and end > IDETIM[0]:
            self._update_legacy()

    def reset(self) -> None:
        """PCI/system reset: configuration, both channels and both bus-master engines."""
        super().reset()
        for ch, bm in zip(self.channels, self.bmdma):
            ch.reset()
            bm.reset()
        self._update_legacy()


def drives_for(backends: Sequence["BlockBackend | None"], write_cache: Sequence[bool] | None = None,
               discard: Sequence[bool] | None = None) -> list[IdeDrive | None]:
    """IdeDrives for up to four backends, serial numbers QM00001.. in order, as QEMU numbers them.

    :param backends: primary master, primary slave, secondary master, secondary slave.
    :param write_cache: per position, the guest-visible write cache (default on;
        ``cache=writethrough`` / ``directsync`` turn it off in QEMU).
    :param discard: per position, pass TRIM to the backend (``discard=unmap``; default off).
    :raises ConfigError: a read-only backend (QEMU: "Block node is read-only").
    """
    out: list[IdeDrive | None] = []
    n = 0
    for i, blk in enumerate(backends):
        if blk is None:
            out.append(None)
            continue
        n += 1
        wc = True if write_cache is None else write_cache[i]
        dc = False if discard is None else discard[i]
        out.append(IdeDrive(blk, serial=f"QM{n:05d}", write_cache=wc, discard=dc))
    return out


def attach_piix_ide(board: Any, ram: Any, invalidate: Any, backends: Sequence["BlockBackend | None"],
                    write_cache: Sequence[bool] | None = None, discard: Sequence[bool] | None = None,
                    dma_view: Any = None) -> PiixIde:
    """Build the PIIX3 IDE function on ``board`` (an :class:`emu.hw.pc.board.PcBoard`) at 00:01.1.

    QEMU's pc machine always has this function, with or without disks.

    :param ram: guest RAM (``vcpu.ram``).
    :param invalidate: the vCPU's ``invalidate_code``.
    :param backends: up to four BlockBackends (None: absent), as :func:`drives_for`.
    :param write_cache: see :func:`drives_for`.
    :param discard: see :func:`drives_for`.
    :param dma_view: the vCPU's ``dma_view`` (PC memory map for DMA: VGA hole, RAM above
        4 GiB); without it ``ram`` is indexed by guest-physical address directly.
    """
    from emu.hw.pc.board import PIIX3_SLOT

    ide = PiixIde(board.iobus, [board.pic.irq_line(14), board.pic.irq_line(15)],
                  drives_for(backends, write_cache, discard), DmaMemory(ram, invalidate, dma_view))
    board.pci.add(ide, PIIX3_SLOT, 1)
    return ide

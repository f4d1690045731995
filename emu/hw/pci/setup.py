"""PCI resource assignment as SeaBIOS does it, for boots without firmware (``-kernel``).

Our BIOS (firmware/) does this itself through 0xCF8/0xCFC; a direct Linux boot
has no BIOS, yet Linux expects assigned BARs, an interrupt line in config 0x3C
and PIIX IDE decode enabled (shared/research/linux-guest).  This module does the
same work through the same configuration-space writes a BIOS would issue, so the
result is indistinguishable to the guest:

* PIIX3 PIRQA-D routed to ISA IRQs 10, 10, 11, 11 and those IRQs set level-triggered in ELCR;
* each function's INTERRUPT_LINE set to the IRQ its pin reaches through the PIRQ swizzle;
* BARs sized by writing all ones, then placed largest first: I/O upwards from 0xC000,
  memory downwards from 0xFEC00000 (below the I/O APIC), each aligned to its size;
* I/O and memory decode enabled (bus mastering is left to drivers, as SeaBIOS does);
* PIIX IDE: legacy decode enable in 0x40/0x42 bit 15.
"""

from __future__ import annotations

from emu.hw.pci.chipset import PIIX3, PIIX_PIRQCA
from emu.hw.pci.device import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_SERR,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
)
from emu.hw.pci.host import PciHost

#: SeaBIOS's PIRQ -> IRQ table for the i440FX/PIIX board.
PCI_IRQS = (10, 10, 11, 11)
PCI_IO_START = 0xC000
PCI_IO_END = 0x10000
PCI_MEM_END = 0xFEC00000
ELCR_PORTS = (0x4D0, 0x4D1)
PIIX_IDE_TIMING_PRIMARY = 0x40
PIIX_IDE_TIMING_SECONDARY = 0x42
PIIX_IDE_DECODE_ENABLE = 0x8000


class ResourceError(Exception):
    """The BARs do not fit in the PCI windows."""


def assign_resources(host: PciHost, mem_start: int = 0xE0000000) -> None:
    """Program bus 0 as SeaBIOS would.

    :param host: the configuration mechanism (its I/O bus also carries the ELCR ports).
    :param mem_start: lowest address memory BARs may use (the end of low RAM, at least).
    :raises ResourceError: if the BARs cannot be placed.
    """
    _route_pirqs(host)
    io_bars: list[tuple[int, int, int, bool]] = []  # (size, devfn, bar_offset, mem64)
    mem_bars: list[tuple[int, int, int, bool]] = []
    for devfn in sorted(host.devices):
        _set_irq_line(host, devfn)
        _size_bars(host, devfn, io_bars, mem_bars)
    io_bars.sort(key=lambda b: (-b[0], b[1], b[2]))
    addr = PCI_IO_START
    for size, devfn, off, _ in io_bars:
        addr = (addr + size - 1) & ~(size - 1)
        if addr + size > PCI_IO_END:
            raise ResourceError(f"PCI I/O BARs do not fit in 0x{PCI_IO_START:x}-0x{PCI_IO_END - 1:x}")
        host.config_write(devfn, off, 4, addr)
        addr += size
    mem_bars.sort(key=lambda b: (-b[0], b[1], b[2]))
    top = PCI_MEM_END
    for size, devfn, off, mem64 in mem_bars:
        top = (top - size) & ~(size - 1)
        if top < mem_start:
            raise ResourceError(f"PCI memory BARs do not fit above 0x{mem_start:x}")
        host.config_write(devfn, off, 4, top)
        if mem64:
            host.config_write(devfn, off + 4, 4, 0)
    for devfn, function in sorted(host.devices.items()):
        cmd = host.config_read(devfn, PCI_COMMAND, 2)
        cmd |= PCI_COMMAND_SERR
        if any(b is not None and b.io for b in function.bars):
            cmd |= PCI_COMMAND_IO
        if any(b is not None and not b.io for b in function.bars):
            cmd |= PCI_COMMAND_MEMORY
        if host.config_read(devfn, 0, 4) == 0x70108086:  # PIIX3 IDE: legacy ports on
            cmd |= PCI_COMMAND_IO
            for reg in (PIIX_IDE_TIMING_PRIMARY, PIIX_IDE_TIMING_SECONDARY):
                host.config_write(devfn, reg, 2, host.config_read(devfn, reg, 2) | PIIX_IDE_DECODE_ENABLE)
        host.config_write(devfn, PCI_COMMAND, 2, cmd)


def _route_pirqs(host: PciHost) -> None:
    router = host.router
    if not isinstance(router, PIIX3):
        return
    elcr = [0, 0]
    for pirq, irq in enumerate(PCI_IRQS):
        host.config_write(router.devfn, PIIX_PIRQCA + pirq, 1, irq)
        elcr[irq >> 3] |= 1 << (irq & 7)
    for port, value in zip(ELCR_PORTS, elcr):
        if host.iobus.owner(port) is not None:
            host.iobus.port_write(port, 1, host.iobus.port_read(port, 1) | value)


def _set_irq_line(host: PciHost, devfn: int) -> None:
    pin = host.config_read(devfn, PCI_INTERRUPT_PIN, 1)
    if 1 <= pin <= 4 and isinstance(host.router, PIIX3):
        irq = PCI_IRQS[PIIX3.pirq_of(devfn, pin - 1)]
        host.config_write(devfn, PCI_INTERRUPT_LINE, 1, irq)


def _size_bars(host: PciHost, devfn: int, io_bars: list, mem_bars: list) -> None:
    index = 0
    while index < 6:
        off = PCI_BASE_ADDRESS_0 + 4 * index
        old = host.config_read(devfn, off, 4)
        host.config_write(devfn, off, 4, 0xFFFFFFFF)
        probe = host.config_read(devfn, off, 4)
        host.config_write(devfn, off, 4, old)
        if probe in (0, 0xFFFFFFFF):
            index += 1
            continue
        if probe & PCI_BASE_ADDRESS_SPACE_IO:
            size = (~(probe & 0xFFFFFFFC) + 1) & 0xFFFF
            if size:
                io_bars.append((size, devfn, off, False))
            index += 1
            continue
        mem64 = bool(probe & PCI_BASE_ADDRESS_MEM_TYPE_64)
        size = (~(probe & 0xFFFFFFF0) + 1) & 0xFFFFFFFF
        if size:
            mem_bars.append((size, devfn, off, mem64))
        index += 2 if mem64 else 1

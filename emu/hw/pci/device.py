"""A PCI function: 256-byte type-0 configuration space, BARs, capabilities, INTx.

Subclasses (the i440FX, PIIX3, and later the PIIX3 IDE and virtio-blk functions)
fill their IDs in the constructor, declare BARs with :meth:`PciFunction.add_bar`
and capabilities with :meth:`PciFunction.add_capability`, and may override
:meth:`PciFunction.config_read_hook` / :meth:`PciFunction.config_written` for
registers with side effects.

Writes go through per-byte masks as on real hardware (and as QEMU's pci.c):
``wmask`` bits are writable, ``w1cmask`` bits are cleared by writing 1 (status),
everything else is read-only.  Like QEMU, the device-specific area 0x40-0xFF is
writable unless a subclass says otherwise.

A BAR is mapped on the I/O or MMIO bus while its decode bit in the command
register is set and its address is assigned; the mapping follows the guest when
it moves the BAR, toggles decode, or sizes it (all ones: not mapped meanwhile).
A BAR the guest places over another device stays unmapped (a warning is logged)
instead of stopping the machine.

INTx: a device drives ``set_intx(level)`` (or an :class:`~emu.hw.irq.IrqLine` made
by :meth:`PciFunction.intx_line`); Interrupt Status (status bit 3) follows the
pin, Interrupt Disable (command bit 10) masks it, and the host routes it through
the PIIX3 PIRQ registers to the 8259.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

from emu.hw.bus import BusError
from emu.hw.irq import IrqLine

if TYPE_CHECKING:
    from emu.hw.pci.host import PciHost

log = logging.getLogger(__name__)

# Configuration header offsets (PCI Local Bus Specification 3.0, type 0 header).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CONFIG_HEADER_SIZE = 0x40
PCI_CONFIG_SPACE_SIZE = 0x100

PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400

PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
#: Status bits cleared by writing 1: parity error, signalled/received aborts, SERR, detected parity.
PCI_STATUS_W1C = 0xF900

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

PCI_HEADER_TYPE_MULTI_FUNCTION = 0x80

#: QEMU's default subsystem IDs for devices that do not set their own.
PCI_SUBVENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_SUBDEVICE_ID_QEMU = 0x1100

_U32 = struct.Struct("<I")


class Bar:
    """One base address register.

    :param index: BAR number 0-5.
    :param size: decoded size in bytes (a power of two).
    :param device: the object answering accesses (``io_read``/``io_write``, offsets from the BAR base).
    :param io: I/O space (True) or memory space.
    """

    def __init__(self, index: int, size: int, device: Any, io: bool, mem64: bool, prefetch: bool) -> None:
        self.index = index
        self.size = size
        self.device = device
        self.io = io
        self.mem64 = mem64
        self.prefetch = prefetch
        self.mapped_at: int | None = None  # where it is registered on the bus now

    @property
    def type_bits(self) -> int:
        """The BAR's read-only low bits (space, type, prefetchable)."""
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return (PCI_BASE_ADDRESS_MEM_TYPE_64 if self.mem64 else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0)


class PciFunction:
    """Base of every PCI function.

    :param vendor_id: PCI vendor ID.
    :param device_id: PCI device ID.
    :param class_code: 24-bit class code ``base << 16 | sub << 8 | prog_if``.
    :param revision: revision ID.
    :param header_type: header type byte (0x80 bit: multi-function).
    :param interrupt_pin: 0 none, 1-4 INTA#-INTD#.
    :param subsystem_vendor_id: subsystem vendor (default QEMU's 0x1AF4).
    :param subsystem_id: subsystem ID (default QEMU's 0x1100).
    :param name: label for logs and bus registrations.
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        header_type: int = 0,
        interrupt_pin: int = 0,
        subsystem_vendor_id: int = PCI_SUBVENDOR_ID_REDHAT_QUMRANET,
        subsystem_id: int = PCI_SUBDEVICE_ID_QEMU,
        name: str | None = None,
    ) -> None:
        self.name = name or type(self).__name__
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        c = self.config
        struct.pack_into("<HH", c, PCI_VENDOR_ID, vendor_id, device_id)
        c[PCI_REVISION_ID] = revision
        c[PCI_CLASS_PROG] = class_code & 0xFF
        struct.pack_into("<H", c, PCI_CLASS_DEVICE, (class_code >> 8) & 0xFFFF)
        c[PCI_HEADER_TYPE] = header_type
        struct.pack_into("<HH", c, PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id, subsystem_id)
        c[PCI_INTERRUPT_PIN] = interrupt_pin
        # Writable header fields, as QEMU's pci_init_wmask.
        struct.pack_into(
            "<H", self.wmask, PCI_COMMAND,
            PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE,
        )
        struct.pack_into("<H", self.w1cmask, PCI_STATUS, PCI_STATUS_W1C)
        self.wmask[PCI_CACHE_LINE_SIZE] = 0xFF
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        for i in range(PCI_CONFIG_HEADER_SIZE, PCI_CONFIG_SPACE_SIZE):
            self.wmask[i] = 0xFF
        self.bars: list[Bar | None] = [None] * 6
        self.host: PciHost | None = None
        self.devfn = 0
        self.irq_level = False
        self._next_cap = PCI_CONFIG_HEADER_SIZE
        self._reset_config: bytes | None = None

    # ---- set-up (subclass constructors) ---------------------------------------------------------

    def add_bar(
        self, index: int, size: int, device: Any, io: bool, mem64: bool = False, prefetch: bool = False
    ) -> Bar:
        """Declare BAR ``index``.

        :param size: power of two; at least 4 for I/O, 16 for memory.
        :param device: answers accesses with offsets from the BAR's base.
        :param io: I/O BAR if True, memory BAR otherwise.
        :param mem64: 64-bit memory BAR (also uses BAR ``index + 1``).
        :param prefetch: prefetchable memory.
        """
        if size & (size - 1) or size < (4 if io else 16) or not 0 <= index < 6 or (mem64 and index == 5):
            raise ValueError(f"{self.name}: bad BAR{index} size 0x{size:x}")
        bar = Bar(index, size, device, io, mem64 and not io, prefetch and not io)
        self.bars[index] = bar
        off = PCI_BASE_ADDRESS_0 + 4 * index
        _U32.pack_into(self.config, off, bar.type_bits)
        mask = ~(size - 1) & (0xFFFFFFFC if io else 0xFFFFFFF0) & 0xFFFFFFFF
        _U32.pack_into(self.wmask, off, mask)
        if bar.mem64:
            _U32.pack_into(self.wmask, off + 4, (~(size - 1) >> 32) & 0xFFFFFFFF)
        return bar

    def add_capability(self, cap_id: int, size: int) -> int:
        """Append a capability of ``size`` bytes to the list; returns its offset.

        As QEMU's pci_add_capability, the whole capability starts read-only: the device fills
        its body in ``config`` and opens writable fields by setting their ``wmask`` bytes.
        """
        off = (self._next_cap + 3) & ~3
        if off + size > PCI_CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: no room for capability 0x{cap_id:x}")
        c = self.config
        c[off] = cap_id
        c[off + 1] = c[PCI_CAPABILITY_LIST]  # prepend: the list head points at the newest
        c[PCI_CAPABILITY_LIST] = off
        for i in range(off, off + size):
            self.wmask[i] = 0
        c[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        self._next_cap = off + size
        return off

    # ---- host side ------------------------------------------------------------------------------

    def attached(self, host: "PciHost", devfn: int) -> None:
        """Called by the host when the function is plugged in at ``devfn``."""
        self.host = host
        self.devfn = devfn
        self._reset_config = bytes(self.config)

    def reset(self) -> None:
        """Device reset: configuration back to its plug-in state, BARs unmapped, INTx low."""
        if self._reset_config is not None:
            self.config[:] = self._reset_config
        self.set_intx(False)
        self._update_mappings()

    # ---- configuration space access -------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4) bytes at ``offset``; beyond 0xFF reads all ones."""
        if offset + size > PCI_CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1
        self.config_read_hook(offset, size)
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_read_hook(self, offset: int, size: int) -> None:
        """Override to refresh dynamic registers in ``self.config`` before a read."""

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write through the masks, then remap BARs / re-evaluate INTx as needed."""
        if offset + size > PCI_CONFIG_SPACE_SIZE:
            return
        c, wm, w1c = self.config, self.wmask, self.w1cmask
        for i in range(size):
            a = offset + i
            b = (value >> (8 * i)) & 0xFF
            c[a] = (c[a] & ~wm[a]) | (b & wm[a])
            c[a] &= ~(b & w1c[a]) & 0xFF
        end = offset + size
        if offset < PCI_COMMAND + 2 and end > PCI_COMMAND or offset < 0x28 and end > PCI_BASE_ADDRESS_0:
            self._update_mappings()
            if offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
                self._push_intx()
        self.config_written(offset, size, value)

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Override for registers with side effects (called after the masked write)."""

    @property
    def command(self) -> int:
        """The command register."""
        return self.config[PCI_COMMAND] | self.config[PCI_COMMAND + 1] << 8

    def bar_address(self, bar: Bar) -> int | None:
        """Where ``bar`` decodes now, or None (decode off, unassigned, or impossible)."""
        cmd = self.command
        off = PCI_BASE_ADDRESS_0 + 4 * bar.index
        raw = _U32.unpack_from(self.config, off)[0]
        if bar.io:
            if not cmd & PCI_COMMAND_IO:
                return None
            addr = raw & ~(bar.size - 1) & 0xFFFFFFFC
            limit = 0x10000
        else:
            if not cmd & PCI_COMMAND_MEMORY:
                return None
            addr = raw & ~(bar.size - 1) & 0xFFFFFFF0
            limit = 1 << 32
            if bar.mem64:
                addr |= _U32.unpack_from(self.config, off + 4)[0] << 32
                limit = 1 << 64
        if addr == 0 or addr + bar.size >= limit:
            return None  # unassigned, or mid-sizing (all ones): not decoded
        return addr

    def _update_mappings(self) -> None:
        host = self.host
        if host is None:
            return
        for bar in self.bars:
            if bar is None:
                continue
            want = self.bar_address(bar)
            if want == bar.mapped_at:
                continue
            bus = host.iobus if bar.io else host.mmiobus
            if bar.mapped_at is not None:
                bus.unregister(bar.mapped_at)
                bar.mapped_at = None
            if want is not None:
                label = f"{self.name} BAR{bar.index}"
                try:
                    if bar.io:
                        bus.register_ports(want, bar.size, bar.device, label)
                    else:
                        bus.register(want, bar.size, bar.device, label)
                except (BusError, ValueError) as err:
                    # A guest placing a BAR over another device (or where the CPU cannot map it)
                    # gets an undecoded BAR, never a stopped machine.
                    log.warning("%s: BAR%d at 0x%x not mapped: %s", self.name, bar.index, want, err)
                    continue
                bar.mapped_at = want

    # ---- INTx -----------------------------------------------------------------------------------

    def set_intx(self, level: bool) -> None:
        """Drive this function's interrupt pin (level-triggered, active while ``level``)."""
        level = bool(level)
        host = self.host
        if host is None:
            self._set_status_interrupt(level)
            return
        with host.intx_lock:
            if level == self.irq_level:
                return      # no edge: the status bit and the router already say so
            self._set_status_interrupt(level)
            self._push_intx()

    def _set_status_interrupt(self, level: bool) -> None:
        if level:
            self.config[PCI_STATUS] |= PCI_STATUS_INTERRUPT
        else:
            self.config[PCI_STATUS] &= ~PCI_STATUS_INTERRUPT
        self.irq_level = level

    def set_irq(self, irq: int, level: bool) -> None:
        """:class:`~emu.hw.irq.IrqSink` form of :meth:`set_intx` (``irq`` is ignored)."""
        self.set_intx(level)

    def intx_line(self) -> IrqLine:
        """An :class:`IrqLine` driving this function's INTx pin."""
        return IrqLine(self, 0)

    def _push_intx(self) -> None:
        pin = self.config[PCI_INTERRUPT_PIN]
        host = self.host
        if host is None or not 1 <= pin <= 4:
            return
        with host.intx_lock:
            effective = self.irq_level and not self.config[PCI_COMMAND + 1] & (PCI_COMMAND_INTX_DISABLE >> 8)
            host.set_intx(self.devfn, pin - 1, effective)

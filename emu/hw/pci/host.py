"""PCI host: configuration mechanism #1 (0xCF8 address, 0xCFC-0xCFF data) and bus 0.

CONFIG_ADDRESS (0xCF8, dword access only; narrower writes are ignored as on the
i440FX and in QEMU, which Linux's conf1/conf2 probe depends on)::

    bit 31 enable | 23-16 bus | 15-11 device | 10-8 function | 7-2 register

CONFIG_DATA (0xCFC-0xCFF) accesses the selected dword with byte, word or dword
width; the byte lane is the port's offset.  Only bus 0 exists; absent devices,
functions and buses read all ones.  Port 0xCF9 (byte access inside the address
register's range) is PIIX3's reset control register, forwarded to whoever
:meth:`PciHost.set_reset_control` names.

INTx from functions reaches the 8259 through the router set by
:meth:`PciHost.set_irq_router` (PIIX3's PIRQ registers).
"""

from __future__ import annotations

import threading
from typing import Protocol

from emu.hw.bus import ALL_ONES, IOBus, MMIOBus
from emu.hw.pci.device import PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTI_FUNCTION, PciFunction

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
RESET_CONTROL = 0xCF9
CONFIG_ENABLE = 0x80000000


def devfn(slot: int, function: int = 0) -> int:
    """Device/function number as in CONFIG_ADDRESS bits 15-8."""
    return (slot << 3) | function


class IntxRouter(Protocol):
    """Routes bus-0 INTx pins to interrupt controller inputs (PIIX3)."""

    def route_intx(self, devfn: int, pin: int, level: bool) -> None:
        """INTx ``pin`` (0 = INTA#) of ``devfn`` is now at ``level``."""


class ResetControl(Protocol):
    """Answers byte accesses to port 0xCF9."""

    def rcr_read(self) -> int:
        """Guest read of 0xCF9."""

    def rcr_write(self, value: int) -> None:
        """Guest write of 0xCF9."""


class PciHost:
    """Bus 0 and its configuration mechanism #1.

    :param iobus: where I/O BARs are mapped (and 0xCF8-0xCFF registered by :meth:`register`).
    :param mmiobus: where memory BARs are mapped.
    """

    io_max_size = 4
    name = "pci-conf1"

    def __init__(self, iobus: IOBus, mmiobus: MMIOBus) -> None:
        self.iobus = iobus
        self.mmiobus = mmiobus
        self.devices: dict[int, PciFunction] = {}
        self.config_address = 0
        self.router: IntxRouter | None = None
        self.reset_control: ResetControl | None = None
        #: Serialises INTx level changes (device I/O threads) with routing and command-register
        #: writes (vCPU thread), so the PIC never keeps a stale level.
        self.intx_lock = threading.RLock()

    def register(self, bus: IOBus | None = None) -> None:
        """Claim 0xCF8-0xCFF (on ``bus``, default the host's I/O bus)."""
        (bus or self.iobus).register_ports(PCI_CONFIG_ADDRESS, 8, self, self.name)

    def add(self, function: PciFunction, slot: int, fn: int = 0) -> None:
        """Plug ``function`` in at 00:slot.fn.

        :raises ValueError: if the slot/function is taken or out of range.
        """
        if not 0 <= slot < 32 or not 0 <= fn < 8:
            raise ValueError(f"PCI address 00:{slot:02x}.{fn} is out of range")
        d = devfn(slot, fn)
        if d in self.devices:
            raise ValueError(f"PCI address 00:{slot:02x}.{fn} is already used by {self.devices[d].name}")
        self.devices[d] = function
        function.attached(self, d)
        if fn:
            f0 = self.devices.get(devfn(slot, 0))
            if f0 is not None:
                f0.config[PCI_HEADER_TYPE] |= PCI_HEADER_TYPE_MULTI_FUNCTION
                if f0._reset_config is not None:
                    f0._reset_config = bytes(f0.config)

    def set_irq_router(self, router: IntxRouter) -> None:
        """Where INTx levels go (PIIX3)."""
        self.router = router

    def set_reset_control(self, rcr: ResetControl) -> None:
        """Who answers byte accesses to 0xCF9 (PIIX3)."""
        self.reset_control = rcr

    def set_intx(self, devfn: int, pin: int, level: bool) -> None:
        """Called by a function when its effective INTx level changes."""
        if self.router is not None:
            self.router.route_intx(devfn, pin, level)

    def reset(self) -> None:
        """System reset of every function and of the address latch."""
        self.config_address = 0
        for function in self.devices.values():
            function.reset()

    # ---- direct access (firmware set-up code, tests) --------------------------------------------

    def config_read(self, devfn: int, offset: int, size: int) -> int:
        """Bus-0 configuration read, all ones where no function answers."""
        function = self.devices.get(devfn)
        if function is None:
            return ALL_ONES[size]
        return function.config_read(offset, size)

    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        """Bus-0 configuration write, ignored where no function answers."""
        function = self.devices.get(devfn)
        if function is not None:
            function.config_write(offset, size, value & ALL_ONES[size])

    # ---- ports 0xCF8-0xCFF ----------------------------------------------------------------------

    def _target(self, lane: int, size: int) -> tuple[PciFunction, int] | None:
        addr = self.config_address
        if not addr & CONFIG_ENABLE or (addr >> 16) & 0xFF:
            return None
        function = self.devices.get((addr >> 8) & 0xFF)
        if function is None or lane + size > 4:
            return None
        return function, (addr & 0xFC) | lane

    def io_read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 1 and size == 1 and self.reset_control is not None:
                return self.reset_control.rcr_read()
            return (self.config_address >> (8 * offset)) & ALL_ONES[size]
        target = self._target(offset - 4, size)
        if target is None:
            return ALL_ONES[size]
        function, reg = target
        return function.config_read(reg, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.config_address = value & 0xFFFFFFFF
            elif offset == 1 and size == 1 and self.reset_control is not None:
                self.reset_control.rcr_write(value & 0xFF)
            return
        target = self._target(offset - 4, size)
        if target is not None:
            function, reg = target
            function.config_write(reg, size, value & ALL_ONES[size])

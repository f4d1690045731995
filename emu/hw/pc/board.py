"""The platform devices of QEMU's ``pc`` machine, built and wired in one place.

:class:`PcBoard` owns the I/O and MMIO buses and puts on them what a PC has
(and what Linux touches, see shared/research/linux-guest):

=====================  ===================  =========
device                 ports                ISA IRQ
=====================  ===================  =========
8259 master / slave    0x20-21, 0xA0-A1     (cascade 2)
ELCR                   0x4D0-0x4D1
8254 PIT               0x40-0x43            0
port B (speaker/gate)  0x61
i8042 + port A         0x60, 0x64, 0x92     1, 12
MC146818 RTC/CMOS      0x70-0x71            8
16550A COM1 (-COM4)    0x3F8-0x3FF, ...     4 (3, 4, 3)
POST port              0x80
PCI conf1 + RCR        0xCF8-0xCFF
isa-debug-exit         (if configured)
=====================  ===================  =========

plus i440FX at 00:00.0 and PIIX3 at 00:01.0 on PCI bus 0.  The machine facade
hands the vCPU ``board.iobus.port_read`` / ``port_write`` and ``board.pic`` (the
interrupt controller), calls ``board.connect_cpu(vcpu.kick)``, maps
``board.mmiobus`` ranges, and adds disk controllers with ``board.pci.add(function, slot, fn)``.
"""

from __future__ import annotations

from typing import Callable

from emu.hw.bus import IOBus, MMIOBus
from emu.hw.clock import VirtualClock
from emu.hw.pc.debugexit import DebugExit, PostPort
from emu.hw.pc.i8042 import I8042
from emu.hw.pc.pic import PicPair
from emu.hw.pc.pit import Pit
from emu.hw.pc.rtc import Rtc
from emu.hw.pc.serial import SerialBackend, Serial16550
from emu.hw.pci.chipset import I440FX, PIIX3
from emu.hw.pci.host import PciHost

PIIX3_SLOT = 1  # 00:01.0 ISA bridge; 00:01.1 is where the PIIX3 IDE function goes
#: ISA serial ports in the order QEMU assigns -serial options to them (base, IRQ).
ISA_SERIAL_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))


class PcBoard:
    """All platform devices, wired as on QEMU's ``pc`` (i440FX + PIIX3) machine.

    :param clock: the VM's virtual clock (its timer thread drives the PIT, RTC and UART timeouts).
    :param notify: called when the PIC's INTR output rises; usually set later with
        :meth:`connect_cpu`, because the vCPU is built from this board's buses.
    :param on_reset: guest-requested system reset (0x64/0xFE, 0x92, 0xCF9).
    :param on_a20: guest A20 gate changes (i8042 output port, port 0x92).
    :param on_exit: isa-debug-exit status; required when ``debug_exit`` is given.
    :param serial_backend: COM1's host side (None: output discarded).
    :param serial_ports: how many ISA UARTs to create now (QEMU creates one per ``-serial``;
        ``-nodefaults`` without ``-serial`` means 0); more can be added with :meth:`add_serial`.
    :param debug_exit: ``(iobase, iosize)`` to add an isa-debug-exit device, else None.
    :param start_time: RTC start time as UTC epoch seconds (default: host time).
    """

    def __init__(
        self,
        clock: VirtualClock,
        notify: Callable[[], None] | None = None,
        on_reset: Callable[[], None] | None = None,
        on_a20: Callable[[bool], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        serial_backend: SerialBackend | None = None,
        debug_exit: tuple[int, int] | None = None,
        start_time: float | None = None,
        serial_ports: int = 1,
    ) -> None:
        self.clock = clock
        self.iobus = IOBus()
        self.mmiobus = MMIOBus()
        bus = self.iobus
        self.pic = PicPair(notify)
        self.pic.register(bus)
        self.pit = Pit(clock, self.pic.irq_line(0))
        self.pit.register(bus)
        self.i8042 = I8042(self.pic.irq_line(1), self.pic.irq_line(12), on_reset, on_a20)
        self.i8042.register(bus)
        self.rtc = Rtc(clock, self.pic.irq_line(8), start_time)
        self.rtc.register(bus)
        self.serials: list[Serial16550] = []
        for i in range(serial_ports):
            self.add_serial(serial_backend if i == 0 else None)
        self.port80 = PostPort()
        self.port80.register(bus)
        self.pci = PciHost(bus, self.mmiobus)
        self.pci.register()
        self.i440fx = I440FX()
        self.piix3 = PIIX3(self.pic, on_reset)
        self.pci.add(self.i440fx, 0)
        self.pci.add(self.piix3, PIIX3_SLOT)
        self.pci.set_irq_router(self.piix3)
        self.pci.set_reset_control(self.piix3)
        self.debug_exit: DebugExit | None = None
        if debug_exit is not None:
            if on_exit is None:
                raise ValueError("isa-debug-exit needs an on_exit callback")
            self.add_debug_exit(DebugExit(on_exit, *debug_exit))

    @property
    def serial(self) -> Serial16550 | None:
        """COM1, if there is one."""
        return self.serials[0] if self.serials else None

    def add_serial(self, backend: SerialBackend | None) -> Serial16550:
        """Add the next ISA UART (COM1-COM4 at QEMU's bases and IRQs) with ``backend``.

        :raises ValueError: past the fourth port (QEMU's limit for ISA serial ports).
        """
        index = len(self.serials)
        if index >= len(ISA_SERIAL_PORTS):
            raise ValueError("at most 4 ISA serial ports")
        base, irq = ISA_SERIAL_PORTS[index]
        uart = Serial16550(self.pic.irq_line(irq), self.clock, backend, base, f"serial{index}")
        uart.register(self.iobus)
        self.serials.append(uart)
        return uart

    def add_debug_exit(self, device: DebugExit) -> DebugExit:
        """Plug an isa-debug-exit (e.g. ``DebugExit.from_qemu_props(props, on_exit)`` for a
        ``-device isa-debug-exit,...``) onto the I/O bus.

        :raises BusError: if its ports are taken.
        """
        device.register(self.iobus)
        self.debug_exit = device
        return device

    def connect_cpu(self, kick: Callable[[], None]) -> None:
        """Wire the PIC's INTR output to the vCPU (``vcpu.interrupt_raised``) once the vCPU exists."""
        self.pic.notify = kick
        if self.pic.has_interrupt():
            kick()

    def reset(self) -> None:
        """System reset of every device (RTC time and CMOS RAM survive, as on a PC)."""
        self.pic.reset()
        self.pit.reset()
        self.i8042.reset()
        self.rtc.reset()
        for uart in self.serials:
            uart.reset()
        self.pci.reset()

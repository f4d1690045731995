"""Guest-visible hardware.

Map of the package:

* :mod:`emu.hw.bus` — port I/O and MMIO dispatch (``register_ports``), overlap-checked, all-ones when unmapped.
* :mod:`emu.hw.irq` — interrupt lines from devices to controllers.
* :mod:`emu.hw.clock` — the virtual clock (stops while paused), device timers and the timer thread.
* :mod:`emu.hw.pc` — ISA platform devices: 8259 PIC pair, 8254 PIT + port 0x61, MC146818 RTC/CMOS,
  16550A UART, i8042 + port 0x92, isa-debug-exit, port 0x80.
* :mod:`emu.hw.pci` — config mechanism #1 host, i440FX, PIIX3 (PIRQ routing, reset control), config
  space / BAR helpers for PCI functions.
* :mod:`emu.hw.ide`, :mod:`emu.hw.virtio` — disk controllers built on the above.

Where QEMU 7.2 departs from the datasheets in ways a guest can see (the PIT's OUT levels,
reset values of the UART, i8042 and PIIX3, RTC SET/divider semantics), the devices follow
QEMU: tests/unit/hw/test_hw_qemu_compare.py runs probe ROMs on both and compares every byte.
Device state is guarded per device; lock order is device -> PIC -> vCPU kick, never back.
"""

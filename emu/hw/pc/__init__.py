"""ISA devices of the PC platform.

* :mod:`.board` — :class:`~emu.hw.pc.board.PcBoard`: every platform device built and wired as on
  QEMU's ``pc`` machine (the machine facade's one entry point into this package).
* :mod:`.pic` — 8259A master/slave pair and ELCR (0x20, 0xA0, 0x4D0).
* :mod:`.pit` — 8254 PIT (0x40-0x43) and system control port B (0x61).
* :mod:`.rtc` — MC146818 RTC and CMOS RAM (0x70/0x71), and the CMOS fields firmware reads.
* :mod:`.serial` — 16550A UART (0x3F8/IRQ 4 …) and its host backends.
* :mod:`.i8042` — keyboard controller (0x60/0x64: reset, A20), port 0x92.
* :mod:`.debugexit` — isa-debug-exit (0x501) and the port 0x80 POST sink.
"""

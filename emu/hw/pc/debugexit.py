"""``isa-debug-exit`` and the port 0x80 POST-code sink.

isa-debug-exit (QEMU ``-device isa-debug-exit,iobase=0x501,iosize=2``): any write of
``value`` ends the emulator with exit status ``(value << 1) | 1`` — a test guest can
therefore never fake a clean exit 0.  Reads return 0, as QEMU's.

Port 0x80 is where firmware posts progress codes and Linux does its ``outb`` I/O
delay; writes are recorded (last code, optional callback), reads return 0xFF.
"""

from __future__ import annotations

from typing import Callable

from emu.errors import ConfigError
from emu.hw.bus import IOBus

DEBUG_EXIT_IOBASE = 0x501
DEBUG_EXIT_IOSIZE = 2
POST_PORT = 0x80


class DebugExit:
    """The isa-debug-exit device.

    :param on_exit: called with the exit status ``(value << 1) | 1``; the machine shuts down
        and the process exits with it (mod 256, as the OS truncates QEMU's exit()).
    :param iobase: first port (QEMU property ``iobase``).
    :param iosize: number of ports (QEMU property ``iosize``: 1, 2 or 4).
    :raises ConfigError: for a size or base QEMU would not map.
    """

    name = "isa-debug-exit"

    def __init__(self, on_exit: Callable[[int], None], iobase: int = DEBUG_EXIT_IOBASE, iosize: int = DEBUG_EXIT_IOSIZE) -> None:
        if iosize not in (1, 2, 4):
            raise ConfigError(f"isa-debug-exit: iosize {iosize} is not 1, 2 or 4")
        if not 0 <= iobase <= 0xFFFF - iosize + 1:
            raise ConfigError(f"isa-debug-exit: iobase 0x{iobase:x} is outside the I/O space")
        self.on_exit = on_exit
        self.iobase = iobase
        self.iosize = iosize
        self.io_max_size = iosize

    def register(self, bus: IOBus) -> None:
        """Claim ``iobase .. iobase + iosize - 1``."""
        bus.register_ports(self.iobase, self.iosize, self, self.name)

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.on_exit((value << 1) | 1)


class PostPort:
    """Port 0x80: POST codes / I/O delay.

    :param on_code: optional ``(code)`` callback for each write (a firmware debug log).
    """

    io_max_size = 1
    name = "port80"

    def __init__(self, on_code: Callable[[int], None] | None = None) -> None:
        self.on_code = on_code
        self.last_code = 0
        self.writes = 0

    def register(self, bus: IOBus) -> None:
        """Claim port 0x80."""
        bus.register_ports(POST_PORT, 1, self, self.name)

    def io_read(self, offset: int, size: int) -> int:
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.last_code = value & 0xFF
        self.writes += 1
        if self.on_code is not None:
            self.on_code(self.last_code)

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


def parse_qemu_uint32(name: str, text: str) -> int:
    """Parse a QEMU ``uint32`` device property as QEMU 7.2 does (base 0: ``0x`` hex, leading-0
    octal, decimal; leading blanks allowed).

    :raises ConfigError: ``Parameter 'NAME' expects integer`` / ``... expects uint32_t``.
    """
    t = text.lstrip()
    neg = t.startswith("-")
    body = t[1:] if t[:1] in ("+", "-") else t
    if body[:2].lower() == "0x":
        digits, base = body[2:], 16
    elif len(body) > 1 and body[0] == "0":
        digits, base = body[1:], 8
    else:
        digits, base = body, 10
    allowed = "0123456789abcdefABCDEF"[: base if base <= 10 else base + 6]
    if not digits or any(c not in allowed for c in digits):
        raise ConfigError(f"Parameter '{name}' expects integer")
    value = int(digits, base)
    if (neg and value) or value > 0xFFFFFFFF:
        raise ConfigError(f"Parameter '{name}' expects uint32_t")
    return value


class DebugExit:
    """The isa-debug-exit device.

    :param on_exit: called with the exit status ``(value << 1) | 1``; the machine shuts down
        and the process exits with it (mod 256, as the OS truncates QEMU's exit()).
    :param iobase: first port (QEMU property ``iobase``).
    :param iosize: number of ports (QEMU property ``iosize``); like QEMU, any uint32 is
        accepted: 0 maps nothing and a range past 0xFFFF is cut at the end of the port space.
    """

    name = "isa-debug-exit"
    io_max_size = 4

    def __init__(self, on_exit: Callable[[int], None], iobase: int = DEBUG_EXIT_IOBASE, iosize: int = DEBUG_EXIT_IOSIZE) -> None:
        if not 0 <= iobase <= 0xFFFFFFFF or not 0 <= iosize <= 0xFFFFFFFF:
            raise ConfigError("isa-debug-exit: iobase and iosize must be uint32 values")
        self.on_exit = on_exit
        self.iobase = iobase
        self.iosize = iosize

    @classmethod
    def from_qemu_props(cls, props: dict[str, str], on_exit: Callable[[int], None]) -> "DebugExit":
        """Build from ``-device isa-debug-exit,...`` properties (strings), with QEMU's errors.

        :raises ConfigError: e.g. ``Property 'isa-debug-exit.bogus' not found``.
        """
        values = {"iobase": DEBUG_EXIT_IOBASE, "iosize": DEBUG_EXIT_IOSIZE}
        for key, text in props.items():
            if key not in values:
                raise ConfigError(f"Property 'isa-debug-exit.{key}' not found")
            values[key] = parse_qemu_uint32(key, text)
        return cls(on_exit, values["iobase"], values["iosize"])

    def register(self, bus: IOBus) -> None:
        """Claim ``iobase .. iobase + iosize - 1`` (the part inside the 64 K port space).

        :raises BusError: if those ports are taken (QEMU would let the regions overlap).
        """
        size = min(self.iosize, 0x10000 - self.iobase) if self.iobase < 0x10000 else 0
        if size > 0:
            bus.register_ports(self.iobase, size, self, self.name)

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

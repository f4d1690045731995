"""Shared rigs for the IDE tests: the real board + PIIX3 IDE over real images, and QEMU via qtest.

Both rigs offer the same port/memory verbs (``outb``, ``inb``, ``inw``, ``outw``, ``inl``,
``outl``, ``memwrite``, ``memread``), so one guest-driver script can run against emu and
against qemu-system-x86_64 7.2 and the values the guest reads can be compared.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.hw.clock import VirtualClock
from emu.hw.ide import attach_piix_ide
from emu.hw.pc.board import PcBoard

IDE_DEVFN = (1 << 3) | 1
BMIBA = 0xC000
RAM_SIZE = 4 << 20
BSY, DRDY, DSC, DRQ, ERR = 0x80, 0x40, 0x10, 0x08, 0x01


def make_image(tmp_path: Path, name: str, size: int, fmt: str, fill: bool = True) -> str:
    """Create a ``fmt`` image of ``size`` bytes whose sector N starts with b'S' + N (8 bytes LE)."""
    path = str(tmp_path / f"{name}.{fmt}")
    if fmt == "qcow2":
        create_qcow2(path, size)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
    if fill:
        graph = BlockGraph()
        node = graph.open_image(path, fmt)
        blk = BlockBackend(node, "fill")
        for lba in range(0, min(size // 512, 256)):
            blk.write(lba * 512, sector_pattern(lba))
        blk.close()
        graph.close_all()
    return path


def sector_pattern(lba: int, tag: int = 0x53) -> bytes:
    """512 bytes that name their LBA (and a tag), so misplaced sectors are obvious."""
    head = bytes([tag]) + lba.to_bytes(7, "little")
    return (head * 64)[:512]


class EmuRig:
    """PcBoard + PIIX3 IDE, BIOS-style PCI set-up, guest RAM as a bytearray."""

    def __init__(self, images: list[tuple[str, str] | None], ram_size: int = RAM_SIZE,
                 graph: BlockGraph | None = None, backends: list[BlockBackend | None] | None = None,
                 discard: list[bool] | None = None) -> None:
        self.clock = VirtualClock(manual=True)
        self.board = PcBoard(self.clock)
        self.ram = bytearray(ram_size)
        self.invalidated: list[tuple[int, int]] = []
        self.graph = graph or BlockGraph()
        self.backends: list[BlockBackend | None] = list(backends or [])
        for i, spec in enumerate(images):
            if spec is None:
                self.backends.append(None)
                continue
            path, fmt = spec
            node = self.graph.open_image(path, fmt)
            self.backends.append(BlockBackend(node, f"ide{i // 2}-hd{i % 2}"))
        self.ide = attach_piix_ide(self.board, self.ram, lambda a, n: self.invalidated.append((a, n)),
                                   self.backends, discard=discard)
        self.bus = self.board.iobus
        bios_setup(self)

    # the guest's verbs
    def outb(self, port: int, v: int) -> None:
        self.bus.port_write(port, 1, v)

    def outw(self, port: int, v: int) -> None:
        self.bus.port_write(port, 2, v)

    def outl(self, port: int, v: int) -> None:
        self.bus.port_write(port, 4, v)

    def inb(self, port: int) -> int:
        return self.bus.port_read(port, 1)

    def inw(self, port: int) -> int:
        return self.bus.port_read(port, 2)

    def inl(self, port: int) -> int:
        return self.bus.port_read(port, 4)

    def memwrite(self, addr: int, data: bytes) -> None:
        self.ram[addr : addr + len(data)] = data

    def memread(self, addr: int, n: int) -> bytes:
        return bytes(self.ram[addr : addr + n])

    def irq_level(self, channel: int = 0) -> bool:
        return self.ide.channels[channel].irq.level

    def irq(self) -> bool:
        """IRQ 14's level now."""
        return self.irq_level(0)

    def close(self) -> None:
        for b in self.backends:
            if b is not None:
                b.close()
        self.graph.close_all()


def _halt_rom() -> str:
    """A 64 KiB BIOS of HLT bytes: the CPU halts at the reset vector with IF=0, so no
    firmware probes the disks while the test drives them (this QEMU has no qtest
    accelerator, and -S makes qtest port accesses hang)."""
    path = os.path.join(tempfile.gettempdir(), "emu-ide-test-halt.rom")
    if not os.path.exists(path) or os.path.getsize(path) != 65536:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"\xf4" * 65536)
        os.replace(tmp, path)
    return path


class QtestRig:
    """qemu-system-x86_64 -machine pc under qtest, with the same verbs as :class:`EmuRig`."""

    def __init__(self, images: list[tuple[str, str] | None], ram_mb: int = 4) -> None:
        args = ["qemu-system-x86_64", "-machine", "pc", "-qtest", "stdio", "-qtest-log", "/dev/null",
                "-display", "none", "-nodefaults", "-m", str(max(ram_mb, 4)), "-bios", _halt_rom()]
        for i, spec in enumerate(images):
            if spec is not None:
                args += ["-drive", f"file={spec[0]},format={spec[1]},if=ide,index={i},cache=writeback"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.irqs: list[str] = []
        self.irq14 = False
        self.q("irq_intercept_in ioapic")
        bios_setup(self)

    def q(self, cmd: str) -> list[str]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        deadline = time.monotonic() + 20
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"qtest: no answer to {cmd!r}")
            r, _, _ = select.select([self.p.stdout], [], [], 1)
            if not r:
                continue
            line = self.p.stdout.readline()
            if not line:
                raise EOFError("qemu exited")
            parts = line.split()
            if parts and parts[0] == "IRQ":
                self.irqs.append(line.strip())
                if parts[2] == "14":
                    self.irq14 = parts[1] == "raise"
                continue
            if parts and parts[0] in ("OK", "FAIL", "ERR"):
                assert parts[0] == "OK", line
                return parts

    def irq(self) -> bool:
        """IRQ 14's level (GSI 14 as the I/O APIC sees it) after the last command."""
        return self.irq14

    def outb(self, port: int, v: int) -> None:
        self.q(f"outb 0x{port:x} 0x{v:x}")

    def outw(self, port: int, v: int) -> None:
        self.q(f"outw 0x{port:x} 0x{v:x}")

    def outl(self, port: int, v: int) -> None:
        self.q(f"outl 0x{port:x} 0x{v:x}")

    def inb(self, port: int) -> int:
        return int(self.q(f"inb 0x{port:x}")[1], 16)

    def inw(self, port: int) -> int:
        return int(self.q(f"inw 0x{port:x}")[1], 16)

    def inl(self, port: int) -> int:
        return int(self.q(f"inl 0x{port:x}")[1], 16)

    def memwrite(self, addr: int, data: bytes) -> None:
        self.q(f"write 0x{addr:x} 0x{len(data):x} 0x{data.hex()}")

    def memread(self, addr: int, n: int) -> bytes:
        return bytes.fromhex(self.q(f"read 0x{addr:x} 0x{n:x}")[1][2:])

    def close(self) -> None:
        self.p.kill()  # qtest does not end on EOF
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


def cfg_addr(off: int) -> int:
    return 0x80000000 | (IDE_DEVFN << 8) | (off & 0xFC)


def cfg_read(io, off: int, size: int = 4) -> int:
    io.outl(0xCF8, cfg_addr(off))
    port = 0xCFC + (off & 3)
    return {1: io.inb, 2: io.inw, 4: io.inl}[size](port)


def cfg_write(io, off: int, size: int, v: int) -> None:
    io.outl(0xCF8, cfg_addr(off))
    port = 0xCFC + (off & 3)
    {1: io.outb, 2: io.outw, 4: io.outl}[size](port, v)


def bios_setup(io) -> None:
    """What firmware does: BAR4 at 0xC000, I/O + bus master on, IDETIM decode enable."""
    cfg_write(io, 0x20, 4, BMIBA)
    cfg_write(io, 0x40, 2, 0x8000)
    cfg_write(io, 0x42, 2, 0x8000)
    cfg_write(io, 0x04, 2, 0x0005)


def wait_not_busy(io, base: int = 0x1F0, timeout: float = 10.0) -> int:
    """Poll alternate status until BSY clears (the aio completion runs on another thread)."""
    ctrl = 0x3F6 if base == 0x1F0 else 0x376
    deadline = time.monotonic() + timeout
    while True:
        st = io.inb(ctrl)
        if not st & BSY:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"BSY stuck: status 0x{st:02x}")
        time.sleep(0.0005)


def wait_bm_done(io, channel: int = 0, timeout: float = 10.0) -> int:
    """Poll the bus-master status until the interrupt bit (or error) shows."""
    port = BMIBA + 8 * channel + 2
    deadline = time.monotonic() + timeout
    while True:
        st = io.inb(port)
        if st & 0x06 or not st & 0x01:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"DMA not done: BM status 0x{st:02x}")
        time.sleep(0.0005)


def select_lba28(io, lba: int, count: int, unit: int = 0, base: int = 0x1F0) -> None:
    io.outb(base + 6, 0xE0 | (unit << 4) | ((lba >> 24) & 0x0F))
    io.outb(base + 2, count & 0xFF)
    io.outb(base + 3, lba & 0xFF)
    io.outb(base + 4, (lba >> 8) & 0xFF)
    io.outb(base + 5, (lba >> 16) & 0xFF)


def select_lba48(io, lba: int, count: int, unit: int = 0, base: int = 0x1F0) -> None:
    io.outb(base + 6, 0x40 | (unit << 4))
    io.outb(base + 2, (count >> 8) & 0xFF)
    io.outb(base + 3, (lba >> 24) & 0xFF)
    io.outb(base + 4, (lba >> 32) & 0xFF)
    io.outb(base + 5, (lba >> 40) & 0xFF)
    io.outb(base + 2, count & 0xFF)
    io.outb(base + 3, lba & 0xFF)
    io.outb(base + 4, (lba >> 8) & 0xFF)
    io.outb(base + 5, (lba >> 16) & 0xFF)


def pio_read_block(io, n_bytes: int, base: int = 0x1F0, width: int = 2) -> bytes:
    out = bytearray()
    if width == 4:
        for _ in range(n_bytes // 4):
            out += io.inl(base).to_bytes(4, "little")
    else:
        for _ in range(n_bytes // 2):
            out += io.inw(base).to_bytes(2, "little")
    return bytes(out)


def pio_write_block(io, data: bytes, base: int = 0x1F0, width: int = 2) -> None:
    for i in range(0, len(data), width):
        v = int.from_bytes(data[i : i + width], "little")
        (io.outl if width == 4 else io.outw)(base, v)


def write_prd(io, table: int, entries: list[tuple[int, int]]) -> None:
    """PRD table at ``table``: (address, byte count; 0x10000 -> 0) with EOT on the last."""
    raw = bytearray()
    for i, (addr, n) in enumerate(entries):
        flags = 0x80000000 if i == len(entries) - 1 else 0
        raw += addr.to_bytes(4, "little") + ((n & 0xFFFF) | flags).to_bytes(4, "little")
    io.memwrite(table, bytes(raw))


def start_dma(io, table: int, to_memory: bool, channel: int = 0) -> None:
    base = BMIBA + 8 * channel
    io.outb(base, 0)  # stop
    io.outb(base + 2, 0x06)  # clear INT and ERR
    io.outl(base + 4, table)
    io.outb(base, 0x09 if to_memory else 0x01)


def env_qemu() -> bool:
    return os.path.exists("/usr/bin/qemu-system-x86_64")

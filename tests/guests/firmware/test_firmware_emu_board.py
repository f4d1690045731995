"""Our BIOS's POST on emu's own vCPU and PC board, before emu's machine can boot a disk.

The command-line tests (test_firmware_bios.py) run on emu once ``python -m emu`` boots; until
then this test builds the pieces the machine will use (``emu.cpu.vcpu.VCPU`` on
``emu.hw.pc.board.PcBoard``, as the vCPU package docstring shows) and runs the BIOS on them.
The board has no IDE controller, so POST ends in "No bootable disk"; on the way it must have
programmed the chipset as on QEMU, and the 18.2 Hz tick must reach the BIOS through emu's PIT,
PIC and vCPU.
"""

from __future__ import annotations

import time

import pytest

from conftest import REPO

BIOS = REPO / "firmware" / "bios.bin"
RAM = 64 << 20


def _pci_read32(board, devfn: int, reg: int) -> int:
    board.iobus.port_write(0xCF8, 4, 0x80000000 | devfn << 8 | reg)
    return board.iobus.port_read(0xCFC, 4)


def test_firmware_posts_on_emu_vcpu_and_board():
    try:
        from emu.cpu.vcpu import VCPU
        from emu.hw.clock import VirtualClock
        from emu.hw.pc.board import PcBoard
    except ImportError as err:                       # pragma: no cover - depends on others' layers
        pytest.skip(f"emu's vCPU/board are not there: {err}")
    out = bytearray()

    class Console:
        def write(self, data: bytes) -> None:
            out.extend(data)

    clock = VirtualClock()
    board = PcBoard(clock, serial_backend=Console())
    board.rtc.set_pc_config(RAM)
    bios = BIOS.read_bytes()
    cpu = VCPU(RAM, board.iobus.port_read, board.iobus.port_write, board.pic, clock_ns=clock.now)
    cpu.load_rom((1 << 32) - len(bios), bios)
    board.connect_cpu(cpu.kick)
    clock.start()
    cpu.start()
    try:
        deadline = time.monotonic() + 30
        while b"No bootable disk: halting." not in out and time.monotonic() < deadline:
            time.sleep(0.05)
        text = out.decode("latin-1")
        assert "No bootable disk: halting." in text, text
        assert "emu BIOS" in text and "RAM: 64 MiB below 4 GiB" in text
        assert "PCI: 00:00.0 8086:1237" in text and "PCI: 00:01.0 8086:7000" in text
        assert "No hard disks found" in text
        # PIRQA-D -> IRQ 10, 10, 11, 11 and those level-triggered, as SeaBIOS leaves them
        assert _pci_read32(board, 0x08, 0x60) == 0x0B0B0A0A
        assert board.iobus.port_read(0x4D0, 1) == 0x00
        assert board.iobus.port_read(0x4D1, 1) == 0x0C
        # BDA: COM1, EBDA, 639 KiB
        bda = bytes(cpu.dma_view(0x400, 0x100))
        assert bda[0:2] == b"\xf8\x03" and bda[0x0E:0x10] == b"\xc0\x9f"
        assert int.from_bytes(bda[0x13:0x15], "little") == 639
        # halted with interrupts on: IRQ 0 (PIT -> PIC -> vCPU -> INT 08h) keeps the BDA tick
        # count (started from the RTC) moving at 18.2 Hz
        def ticks() -> int:
            return int.from_bytes(bytes(cpu.dma_view(0x46C, 4)), "little")
        t0, s0 = ticks(), time.monotonic()
        time.sleep(0.6)
        t1, s1 = ticks(), time.monotonic()
        assert 0 < t0 < 0x1800B0
        assert 0.5 * 18.2 * (s1 - s0) <= t1 - t0 <= 2 * 18.2 * (s1 - s0) + 2
    finally:
        cpu.stop()
        clock.stop()

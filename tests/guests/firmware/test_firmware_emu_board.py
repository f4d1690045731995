"""Our BIOS on emu's own vCPU and PC board, before emu's machine can boot a disk.

The command-line tests (test_firmware_bios.py) run on emu once ``python -m emu`` boots; until
then these build the pieces the machine will use (``emu.cpu.vcpu.VCPU`` on
``emu.hw.pc.board.PcBoard``, as the vCPU package docstring shows) and run the BIOS on them.
The board has no IDE controller, so POST ends in "No bootable disk"; on the way it must have
programmed the chipset as on QEMU, and the 18.2 Hz tick must reach the BIOS through emu's PIT,
PIC and vCPU.  Then firmware/tests/svctest.asm is put into RAM and entered through the IRQ 0
vector, to run the BIOS services that need no disk on emu's CPU (and, booted from a disk, on
QEMU for the same answers).
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from conftest import REPO, requires_nasm, requires_qemu_system
from firmware_biostest import OURS_ON_QEMU, run

BIOS = REPO / "firmware" / "bios.bin"
SVCTEST = REPO / "firmware" / "tests" / "svctest.asm"
RAM = 64 << 20
SAVED_INT08 = 0x7F0        #: svctest.asm: where the injector leaves the BIOS's INT 08h vector
INJECTED_MAGIC = 0x7F4


@dataclass
class EmuPc:
    """emu's vCPU + board running our BIOS; COM1 output collected."""

    cpu: object
    board: object
    clock: object
    out: bytearray = field(default_factory=bytearray)
    exit_status: list[int] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, text: bytes, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.out and not self.exited.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.out.decode("latin-1")

    def ram(self, gpa: int, n: int) -> bytes:
        return bytes(self.cpu.dma_view(gpa, n))


@pytest.fixture(scope="module")
def emu_pc():
    try:
        from emu.cpu.vcpu import VCPU
        from emu.hw.clock import VirtualClock
        from emu.hw.pc.board import PcBoard
    except ImportError as err:                       # pragma: no cover - depends on others' layers
        pytest.skip(f"emu's vCPU/board are not there: {err}")
    pc = EmuPc(None, None, None)

    class Console:
        def write(self, data: bytes) -> None:
            pc.out.extend(data)

    def on_exit(value: int) -> None:
        pc.exit_status.append(value)
        pc.exited.set()

    try:
        pc.clock = VirtualClock()
        pc.board = PcBoard(pc.clock, serial_backend=Console(), debug_exit=(0x501, 2),
                           on_exit=on_exit)
        pc.board.rtc.set_pc_config(RAM)
        bios = BIOS.read_bytes()
        pc.cpu = VCPU(RAM, pc.board.iobus.port_read, pc.board.iobus.port_write, pc.board.pic,
                      clock_ns=pc.clock.now)
        pc.cpu.load_rom((1 << 32) - len(bios), bios)
        pc.board.connect_cpu(pc.cpu.kick)
    except (TypeError, AttributeError) as err:       # their API moved on: say so, don't fail
        pytest.skip(f"emu's vCPU/board API is not the one this test drives: {err!r}")
    pc.clock.start()
    pc.cpu.start()
    try:
        yield pc
    finally:
        pc.cpu.stop()
        pc.clock.stop()


def _pci_read32(board, devfn: int, reg: int) -> int:
    board.iobus.port_write(0xCF8, 4, 0x80000000 | devfn << 8 | reg)
    return board.iobus.port_read(0xCFC, 4)


def test_firmware_posts_on_emu_vcpu_and_board(emu_pc):
    text = emu_pc.wait_for(b"No bootable disk: halting.")
    assert "No bootable disk: halting." in text, text
    assert "emu BIOS" in text and "RAM: 64 MiB below 4 GiB" in text
    assert "PCI: 00:00.0 8086:1237" in text and "PCI: 00:01.0 8086:7000" in text
    assert "No hard disks found" in text
    # PIRQA-D -> IRQ 10, 10, 11, 11 and those level-triggered, as SeaBIOS leaves them
    assert _pci_read32(emu_pc.board, 0x08, 0x60) == 0x0B0B0A0A
    assert emu_pc.board.iobus.port_read(0x4D0, 1) == 0x00
    assert emu_pc.board.iobus.port_read(0x4D1, 1) == 0x0C
    # BDA: COM1, EBDA segment, 639 KiB
    bda = emu_pc.ram(0x400, 0x100)
    assert bda[0:2] == b"\xf8\x03" and bda[0x0E:0x10] == b"\xc0\x9f"
    assert int.from_bytes(bda[0x13:0x15], "little") == 639
    # halted with interrupts on: IRQ 0 (PIT -> PIC -> vCPU -> INT 08h) keeps the BDA tick
    # count (started from the RTC) moving at 18.2 Hz
    def ticks() -> int:
        return int.from_bytes(emu_pc.ram(0x46C, 4), "little")
    t0, s0 = ticks(), time.monotonic()
    time.sleep(0.6)
    t1, s1 = ticks(), time.monotonic()
    assert 0 < t0 < 0x1800B0
    assert 3 <= t1 - t0 <= 2 * 18.2 * (s1 - s0) + 2             # ~11 (a busy host loses some)


def _svctest() -> bytes:
    return subprocess.run(["nasm", "-f", "bin", "-o", "/dev/stdout", str(SVCTEST)],
                          capture_output=True, check=True).stdout


def _svc_lines(text: str) -> list[str]:
    keys = ("E820 ", "SIZES ", "RTC ", "WAIT ", "MOVE ", "PASS", "FAIL")
    return [ln.strip() for ln in text.splitlines() if ln.startswith(keys)]


@requires_nasm
def test_firmware_services_on_emu_vcpu(emu_pc):
    """E820/E801/88h, INT 1Ah, the PIT-timed INT 15h AH=86h and the protected-mode
    INT 15h AH=87h, run on emu's CPU."""
    emu_pc.wait_for(b"No bootable disk: halting.")
    code = _svctest()
    before = len(emu_pc.out)
    view = emu_pc.cpu.dma_view(0x7C00, len(code))
    view[:] = code
    emu_pc.cpu.invalidate_code(0x7C00, len(code))
    ivt = emu_pc.cpu.dma_view(0, 0x800)
    ivt[SAVED_INT08:SAVED_INT08 + 4] = ivt[0x20:0x24]
    ivt[INJECTED_MAGIC:INJECTED_MAGIC + 4] = b"INJ!"
    ivt[0x20:0x24] = (0x7C00).to_bytes(4, "little")         # INT 08h -> 0000:7C00
    emu_pc.exited.wait(60)
    text = emu_pc.out[before:].decode("latin-1")
    assert emu_pc.exit_status == [(0x10 << 1) | 1], text      # isa-debug-exit: pass
    lines = _svc_lines(text)
    assert lines[-1] == "PASS", text
    e820 = [ln for ln in lines if ln.startswith("E820")]
    assert e820 == ["E820 0000000000000000 0009FC00 01", "E820 000000000009FC00 00000400 02",
                    "E820 00000000000F0000 00010000 02", "E820 0000000000100000 03F00000 01",
                    "E820 00000000FFFF0000 00010000 02"]
    assert "SIZES 3C00 0300 FC00" in lines


@requires_nasm
@requires_qemu_system
def test_firmware_services_same_on_qemu(tmp_path):
    """svctest booted from a disk on QEMU gives the lines the emu test expects."""
    img = tmp_path / "svc.img"
    img.write_bytes(_svctest())
    with open(img, "r+b") as f:
        f.truncate(1 << 20)
    rep = run(OURS_ON_QEMU, [f"file={img},format=raw,if=ide"])
    assert rep.status == 33, rep.output
    lines = _svc_lines(rep.output)
    assert lines[-1] == "PASS"
    assert "SIZES 3C00 0300 FC00" in lines and len([ln for ln in lines if ln.startswith("E820")]) == 5

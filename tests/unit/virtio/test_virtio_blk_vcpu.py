"""A real x86 guest on emu's vCPU drives virtio-blk-pci (legacy interface): port I/O from
Unicorn, DMA into the RAM the CPU executes from (translated code dropped), completions
from the block workers waking a HLT through INTx -> PIIX3 PIRQ -> 8259."""

from __future__ import annotations

import subprocess
import threading

import pytest

from conftest import requires_nasm, requires_qemu_io, requires_qemu_system
from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.virtio import GuestMemory, attach_virtio_blk

ASM = __file__.rsplit("/", 1)[0] + "/virtio_legacy_guest.asm"


@requires_nasm
@requires_qemu_io
def test_guest_drives_legacy_virtio_blk(tmp_path):
    from emu.cpu.vcpu import VCPU

    rom = tmp_path / "guest.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(rom), ASM], check=True, timeout=60)
    image = str(tmp_path / "d.qcow2")
    create_qcow2(image, 1 << 20)
    graph = BlockGraph()
    blk = BlockBackend(graph.open_image(image), "virtio0")
    blk.write(6 * 512, bytes([0xB0, 0x02, 0xCB]))  # the sector the guest runs: mov al,2; retf

    exited = threading.Event()
    status: list[int] = []

    def on_exit(value: int) -> None:
        status.append(value)
        exited.set()

    board = PcBoard(VirtualClock(manual=True), serial_ports=0, debug_exit=(0xF4, 1), on_exit=on_exit)
    cpu = VCPU(16 << 20, board.iobus.port_read, board.iobus.port_write, board.pic)
    try:
        cpu.load_rom((1 << 32) - 0x10000, rom.read_bytes())
        board.connect_cpu(cpu.kick)
        fn = attach_virtio_blk(board, GuestMemory.from_vcpu(cpu), blk, 2)
        cpu.start()
        assert exited.wait(30), "the guest did not finish"
        assert status == [(0x10 << 1) | 1], f"guest failed with 0x{(status[0] >> 1):x}"
        assert fn.device.completed == 3
    finally:
        cpu.stop()
        blk.close()
        graph.close_all()
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xc3 2560 512", "-c", "read -P 0 2048 512",
                        "-c", "read -P 0 3584 512", image], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


def _check_image(image: str) -> None:
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xc3 2560 512", "-c", "read -P 0 2048 512",
                        "-c", "read -P 0 3584 512", image], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


@requires_nasm
@requires_qemu_io
@requires_qemu_system
def test_same_guest_passes_on_qemu(tmp_path):
    """The very guest above, as -bios of qemu-system-x86_64 7.2 with the same kind of image."""
    rom = tmp_path / "guest.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(rom), ASM], check=True, timeout=60)
    image = str(tmp_path / "d.qcow2")
    create_qcow2(image, 1 << 20)
    graph = BlockGraph()
    blk = BlockBackend(graph.open_image(image), "virtio0")
    blk.write(6 * 512, bytes([0xB0, 0x02, 0xCB]))
    blk.close()
    graph.close_all()
    r = subprocess.run(["qemu-system-x86_64", "-machine", "pc", "-m", "16", "-nodefaults", "-display", "none",
                        "-bios", str(rom), "-drive", f"file={image},format=qcow2,if=none,id=d0",
                        "-device", "virtio-blk-pci,drive=d0", "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == (0x10 << 1) | 1, f"QEMU: guest exit 0x{r.returncode >> 1:x} {r.stderr}"
    _check_image(image)

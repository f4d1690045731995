"""Real x86 guests on emu's vCPU drive virtio-blk-pci, legacy (I/O BAR0) and modern (MMIO
BAR4 through Unicorn): port and MMIO dispatch, DMA into the RAM the CPU executes from
(translated code dropped), completions from the block workers waking a HLT through
INTx -> PIIX3 PIRQ -> 8259.  The same guests pass as -bios of qemu-system-x86_64 7.2, and
both leave the same sectors in the image (neighbours untouched)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from conftest import requires_nasm, requires_qemu_io, requires_qemu_system
from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.virtio import GuestMemory, attach_virtio_blk

HERE = Path(__file__).resolve().parent
#: guest source -> the byte it writes over sector 5
GUESTS = {"legacy": ("virtio_legacy_guest.asm", 0xC3), "modern": ("virtio_modern_guest.asm", 0x3C)}
SUCCESS = (0x10 << 1) | 1  # isa-debug-exit status of "out 0xF4, 0x10"


def _build(tmp_path: Path, kind: str) -> tuple[Path, str]:
    asm, _ = GUESTS[kind]
    rom = tmp_path / "guest.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(rom), str(HERE / asm)], check=True, timeout=60)
    image = str(tmp_path / "d.qcow2")
    create_qcow2(image, 1 << 20)
    graph = BlockGraph()
    blk = BlockBackend(graph.open_image(image), "virtio0")
    blk.write(6 * 512, bytes([0xB0, 0x02, 0xCB]))  # the sector the legacy guest runs: mov al,2; retf
    blk.close()
    graph.close_all()
    return rom, image


def _check_image(image: str, pattern: int) -> None:
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 0x{pattern:x} 2560 512",
                        "-c", "read -P 0 0 2560", "-c", "read -P 0 3584 4096", image], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


@requires_nasm
@requires_qemu_io
@pytest.mark.parametrize("idle", [False, True], ids=["workers", "idle-vcpu"])
@pytest.mark.parametrize("kind", list(GUESTS))
def test_guest_drives_virtio_blk_on_emu(tmp_path, kind, idle, monkeypatch):
    """``idle``: the machine's set-up (the vCPU's idle hook is the block layer's), with a
    grace long enough that every request is run by the vCPU while the guest halts."""
    from emu.block import api
    from emu.cpu.vcpu import VCPU

    rom, image = _build(tmp_path, kind)
    graph = BlockGraph()
    blk = BlockBackend(graph.open_image(image), "virtio0")
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
        mmio = board.mmiobus
        mmio.add_listener(
            lambda base, size: cpu.map_mmio(base, size, lambda off, n: mmio.read(base + off, n),
                                            lambda off, n, v: mmio.write(base + off, n, v)),
            lambda base, size: cpu.unmap_mmio(base, size))
        fn = attach_virtio_blk(board, GuestMemory.from_vcpu(cpu), blk, 2)
        ran_idle = []
        if idle:
            monkeypatch.setattr(api, "IDLE_GRACE", 30.0)
            hook = api.idle_hook()

            def counting_hook() -> bool:
                ran = hook()
                if ran:
                    ran_idle.append(threading.current_thread().name)
                return ran
            cpu.idle_hook = counting_hook
        cpu.start()
        assert exited.wait(60), "the guest did not finish"
        assert status == [SUCCESS], f"guest failed with 0x{(status[0] >> 1):x}"
        assert fn.device.completed == (3 if kind == "legacy" else 2)
        if idle:
            assert ran_idle == ["vcpu0"] * fn.device.completed
    finally:
        cpu.stop()
        blk.close()
        graph.close_all()
    _check_image(image, GUESTS[kind][1])


@requires_nasm
@requires_qemu_io
@requires_qemu_system
@pytest.mark.parametrize("kind", list(GUESTS))
def test_same_guest_passes_on_qemu(tmp_path, kind):
    rom, image = _build(tmp_path, kind)
    r = subprocess.run(["qemu-system-x86_64", "-machine", "pc", "-m", "16", "-nodefaults", "-display", "none",
                        "-bios", str(rom), "-drive", f"file={image},format=qcow2,if=none,id=d0",
                        "-device", "virtio-blk-pci,drive=d0", "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == SUCCESS, f"QEMU: guest exit 0x{r.returncode >> 1:x} {r.stderr}"
    _check_image(image, GUESTS[kind][1])

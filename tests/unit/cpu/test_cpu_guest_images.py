"""guest-images/cpu's exception guests on the vCPU with the real platform devices.

The images were written against QEMU 7.2 (their expected values are QEMU's).  Until the
machine boots them through the BIOS and the IDE disk, this runs them here with a stub
firmware: the image is placed at 0x7C00 as the BIOS would load it, INT 13h answers
"done" (the payload is already in RAM), and the 8259s are set up as SeaBIOS leaves them.
"""

from __future__ import annotations

import io
import threading

import pytest
from conftest import REPO, requires_nasm

from cpu_harness import nasm

pytestmark = requires_nasm

GUESTS = REPO / "guest-images" / "cpu"

STUB_BIOS = r"""
bits 16
org 0xFFFF0000
start:
    jmp 0xF000:(low - $$)
low:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
    xor di, di
    mov cx, 256
.ivt:
    mov word [di], dummy - $$
    mov word [di + 2], 0xF000
    add di, 4
    loop .ivt
    mov word [0x13 * 4], int13 - $$
    mov al, 0x11                          ; 8259s: bases 0x08 / 0x70, masked but cascade
    out 0x20, al
    out 0xA0, al
    mov al, 0x08
    out 0x21, al
    mov al, 0x70
    out 0xA1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1
    out 0x21, al
    out 0xA1, al
    mov al, 0xFB
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    mov dl, 0x80
    jmp 0:0x7C00
dummy:
    iret
int13:
    push bp
    mov bp, sp
    and byte [bp + 6], 0xFE               ; CF=0: success
    pop bp
    xor ah, ah
    iret
times 0xFFF0 - ($ - $$) db 0
    jmp start
times 0x10000 - ($ - $$) db 0
"""


def boot(name: str) -> tuple[list[int], str, list[str]]:
    from emu.cpu.vcpu import VCPU
    from emu.hw.clock import VirtualClock
    from emu.hw.pc.board import PcBoard
    from emu.hw.pc.serial import FileBackend

    image = (GUESTS / f"{name}.img").read_bytes()
    clock = VirtualClock()
    out = io.BytesIO()
    done = threading.Event()
    status: list[int] = []
    resets: list[str] = []
    holder: dict[str, VCPU] = {}
    board = PcBoard(clock, serial_backend=FileBackend(out), debug_exit=(0x501, 2),
                    on_exit=lambda s: (status.append(s), done.set()),
                    on_reset=lambda: holder["cpu"].reset(),
                    on_a20=lambda on: holder["cpu"].set_a20(on))

    def on_reset_request(reason: str) -> None:
        resets.append(reason)
        board.reset()
        holder["cpu"].reset()

    cpu = VCPU(64 << 20, board.iobus.port_read, board.iobus.port_write, board.pic,
               clock_ns=clock.now, on_reset_request=on_reset_request)
    holder["cpu"] = cpu
    board.connect_cpu(cpu.kick)
    cpu.load_rom(0xFFFF0000, nasm(STUB_BIOS))
    cpu.ram[0x7C00:0x7C00 + len(image)] = image
    clock.start()
    cpu.start()
    try:
        done.wait(30)
    finally:
        cpu.stop()
        clock.stop()
    return status, out.getvalue().decode(errors="replace"), resets


@pytest.mark.parametrize("name", ["pm-exceptions", "lm-exceptions", "reset"])
def test_guest_image_passes(name: str) -> None:
    if not (GUESTS / f"{name}.img").exists():
        pytest.skip(f"guest-images/cpu/{name}.img is not built")
    status, output, resets = boot(name)
    assert status == [1], output                  # isa-debug-exit: (0 << 1) | 1 = PASS
    assert output.rstrip().endswith("PASS"), output
    assert "BAD" not in output
    if name == "reset":
        assert resets == ["triple-fault"]

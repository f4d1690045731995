"""The platform under the real vCPU: a real-mode ROM programs PIC + PIT at 1 kHz, HLTs for
exactly 50 timer interrupts (delivered through the IVT, woken by the timer thread's kick),
prints on COM1 and ends through isa-debug-exit.  Host-driven virtual clock, as in a real run."""

import io
import subprocess
import threading

from conftest import requires_nasm

from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.pc.serial import FileBackend

ROM = r"""
bits 16
org 0
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word [0x20*4], irq0
    mov word [0x20*4+2], 0xF000
    mov word [0x500], 0
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0x11
    out 0xA0, al
    mov al, 0x28
    out 0xA1, al
    mov al, 0x02
    out 0xA1, al
    mov al, 0x01
    out 0xA1, al
    mov al, 0xFE
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.wait:
    hlt
    cmp word [0x500], 50
    jb .wait
    cli
    mov al, 0xFF
    out 0x21, al
    mov dx, 0x3F8
    mov al, 'o'
    out dx, al
    mov al, 'k'
    out dx, al
    mov ax, [0x500]
    mov dx, 0x501
    out dx, ax
.hang:
    hlt
    jmp .hang
irq0:
    push ax
    inc word [0x500]
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
times 0xFFF0 - ($ - $$) db 0
    jmp 0xF000:start
times 0x10000 - ($ - $$) db 0
"""


@requires_nasm
def test_pit_irqs_reach_a_halted_vcpu(tmp_path):
    from emu.cpu.vcpu import VCPU

    src = tmp_path / "rom.asm"
    src.write_text(ROM)
    subprocess.run(["nasm", "-f", "bin", "-o", str(tmp_path / "rom.bin"), str(src)], check=True)
    rom = (tmp_path / "rom.bin").read_bytes()

    clock = VirtualClock()
    out = io.BytesIO()
    done = threading.Event()
    status = []
    board = PcBoard(clock, serial_backend=FileBackend(out),
                    debug_exit=(0x501, 2), on_exit=lambda s: (status.append((s, clock.now())), done.set()))
    cpu = VCPU(2 * 1024 * 1024, board.iobus.port_read, board.iobus.port_write, board.pic, clock_ns=clock.now)
    board.connect_cpu(cpu.kick)
    cpu.load_rom(0xFFFF0000, rom)
    clock.start()
    t0 = clock.now()
    cpu.start()
    try:
        assert done.wait(30), "guest did not finish"
    finally:
        cpu.stop()
        clock.stop()
    code, t_end = status[0]
    assert code == (50 << 1) | 1
    assert out.getvalue() == b"ok"
    # 50 periods of 1193 PIT ticks take 49.99 ms of virtual time at least
    assert t_end - t0 >= 49_990_000

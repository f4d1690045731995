"""The vCPU running tiny nasm guests: reset, delivery in every mode, system calls, HLT/IRQ,
faults, pause/resume, code invalidation after DMA."""

from __future__ import annotations

import struct

from conftest import requires_nasm

from cpu_harness import Board, guest, nasm

pytestmark = requires_nasm


def test_reset_vector_real_mode_state() -> None:
    # At reset: real mode, CS=F000 with base 0xFFFF0000, IP=FFF0, EDX = CPUID signature,
    # CR0 = 0x60000010; a write to the ROM is dropped.
    src = r"""
bits 16
org 0xFFFF0000
start:
    mov [cs:0], al
    xor ax, ax
    mov ds, ax
    mov dword [0x500], edx
    mov eax, cr0
    mov dword [0x504], eax
    call here
here:
    pop ax
    mov word [0x508], ax
    mov word [0x50E], here - $$
    mov ax, cs
    mov word [0x50A], ax
    out 0x80, al            ; the board kicks the vCPU: the ROM is put back
    jmp .next
.next:
    mov al, [cs:0]
    mov byte [0x50C], al
    mov al, 'R'
    out 0xE9, al
    mov al, 0x31
    out 0xF4, al
    jmp $
times 0xFFF0 - ($ - $$) db 0
    jmp start
times 0x10000 - ($ - $$) db 0
"""
    rom = nasm(src)
    board = Board(rom, on_port=lambda b, port, value: b.cpu.kick())
    assert board.run() == 0x31
    assert board.out == b"R"
    from emu.cpu.vcpu import _native_lookup
    assert board.u32(0x500) == _native_lookup(1, 0)[0]
    assert board.u32(0x504) == 0x60000010
    ip, cs, expected_ip = struct.unpack_from("<HHxxH", board.cpu.ram, 0x508)
    assert (cs, ip) == (0xF000, expected_ip)
    assert board.cpu.ram[0x50C] == rom[0]
    # The BIOS alias below 1 MiB holds the same bytes.
    assert bytes(board.cpu.ram[0xF0000:0x100000]) == rom

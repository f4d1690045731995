"""A minimal machine around the vCPU for tests: a real port bus dict, an IRQ source, nasm.

No fakes of the component under test: the guest is real x86 code assembled at test time,
the vCPU runs it on its own thread, and the test only provides what a board would (ports,
an interrupt line, a ROM).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from emu.cpu.vcpu import VCPU

ROM_BASE = 0xFFFF0000
ROM_SIZE = 0x10000
DEBUG_OUT = 0xE9       # byte sink
EXIT_PORT = 0xF4       # isa-debug-exit style: a write ends the test with that value
GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
TSS_ADDR = 0x3000
PML4_ADDR = 0x10000

_CACHE = Path(tempfile.gettempdir()) / "emu-cpu-test-nasm"

# Shared nasm text: reset vector, PM32 entry, gate macros.  Guests put their body after
# PM32_ENTRY (32-bit flat, DS=ES=SS=0x10, ESP=0x90000, IDT loaded).
PRELUDE = r"""
ROM equ 0xFFFF0000
GDT equ 0x1000
IDT equ 0x2000
TSS equ 0x3000
RES equ 0x500          ; results area read by the test
%define EXIT_PORT 0xF4
%define OUTP 0xE9

%macro EXIT 1
    mov al, %1
    out EXIT_PORT, al
%%hang: jmp %%hang
%endmacro

%macro PUTC 1
    mov al, %1
    out OUTP, al
%endmacro

; GATE32 vector, handler, attr (0x8E00 interrupt gate DPL0, 0x8F00 trap, 0xEE00 DPL3)
%macro GATE32 3
    mov eax, %2
    mov word [IDT + (%1)*8], ax
    mov word [IDT + (%1)*8 + 2], 0x08
    mov word [IDT + (%1)*8 + 4], %3
    shr eax, 16
    mov word [IDT + (%1)*8 + 6], ax
%endmacro

; GATE64 vector, handler, attr|ist   (code selector 0x28)
%macro GATE64 3
    mov rax, %2
    mov word [IDT + (%1)*16], ax
    mov word [IDT + (%1)*16 + 2], 0x28
    mov word [IDT + (%1)*16 + 4], %3
    shr rax, 16
    mov word [IDT + (%1)*16 + 6], ax
    shr rax, 16
    mov dword [IDT + (%1)*16 + 8], eax
    mov dword [IDT + (%1)*16 + 12], 0
%endmacro

bits 16
org ROM
start16:
    cli
    o32 lgdt [cs:gdtr - ROM]
    o32 lidt [cs:idtr32 - ROM]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp dword 0x08:pm32_entry
align 8
gdtr:   dw 0x5F
        dd GDT
idtr32: dw 256*8-1
        dd IDT
idtr64: dw 256*16-1
        dq IDT
bits 32
pm32_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x90000
"""

# Long mode entry: include after PRELUDE; continues at lm64 (CPL0, RSP=0x90000, IDT64).
LONG_MODE = r"""
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov eax, 0x10000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, (1 << 8) | (1 << 0)      ; LME, SCE
    wrmsr
    mov eax, cr0
    or eax, 1 << 31
    mov cr0, eax
    jmp 0x28:lm64
bits 64
lm64:
    mov ax, 0x30
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x90000
    lidt [rel idtr64]
"""

EPILOGUE = r"""
bits 16
times 0xFFF0 - ($ - $$) db 0
    jmp start16
times 0x10000 - ($ - $$) db 0
"""


def nasm(source: str) -> bytes:
    """Assemble a flat binary (cached by content)."""
    _CACHE.mkdir(exist_ok=True)
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    out = _CACHE / f"{digest}.bin"
    if not out.exists():
        src = _CACHE / f"{digest}.asm"
        src.write_text(source)
        subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True,
                       capture_output=True)
    return out.read_bytes()


def guest(body: str, long_mode: bool = False) -> bytes:
    """A 64 KiB BIOS image: PRELUDE (+ LONG_MODE) + body + reset vector."""
    return nasm(PRELUDE + (LONG_MODE if long_mode else "") + body + EPILOGUE)


def descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    value = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) \
        | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56)
    return struct.pack("<Q", value)


def standard_tables(ram: memoryview) -> None:
    """GDT (Linux-like order), TSS, identity page tables (0-1 GiB and 3-4 GiB, 2 MiB pages).

    0x08 code32 DPL0, 0x10 data DPL0, 0x18 code32 DPL3, 0x20 data DPL3, 0x28 code64 DPL0,
    0x30 data DPL0, 0x38 code32 DPL3, 0x40 data DPL3, 0x48 code64 DPL3, 0x50 TSS.
    """
    gdt = b"".join([
        b"\0" * 8,
        descriptor(0, 0xFFFFF, 0x9B, 0xC), descriptor(0, 0xFFFFF, 0x93, 0xC),
        descriptor(0, 0xFFFFF, 0xFB, 0xC), descriptor(0, 0xFFFFF, 0xF3, 0xC),
        descriptor(0, 0xFFFFF, 0x9B, 0xA), descriptor(0, 0xFFFFF, 0x93, 0xC),
        descriptor(0, 0xFFFFF, 0xFB, 0xC), descriptor(0, 0xFFFFF, 0xF3, 0xC),
        descriptor(0, 0xFFFFF, 0xFB, 0xA),
        descriptor(TSS_ADDR, 0x67, 0x89, 0x0), b"\0" * 8,
    ])
    ram[GDT_ADDR:GDT_ADDR + len(gdt)] = gdt
    ram[PML4_ADDR:PML4_ADDR + 0x4000] = b"\0" * 0x4000
    struct.pack_into("<Q", ram, PML4_ADDR, (PML4_ADDR + 0x1000) | 7)
    struct.pack_into("<Q", ram, PML4_ADDR + 0x1000, (PML4_ADDR + 0x2000) | 7)
    struct.pack_into("<Q", ram, PML4_ADDR + 0x1000 + 3 * 8, (PML4_ADDR + 0x3000) | 7)
    for i in range(512):
        struct.pack_into("<Q", ram, PML4_ADDR + 0x2000 + 8 * i, (i << 21) | 0x87)
        struct.pack_into("<Q", ram, PML4_ADDR + 0x3000 + 8 * i, (0xC0000000 + (i << 21)) | 0x87)


class Board:
    """Ports, an interrupt source and a vCPU, as a test machine.

    :param rom: the 64 KiB BIOS image.
    :param on_port: extra ``on_port(port, value)`` called for writes to unknown ports.
    """

    def __init__(self, rom: bytes, ram_size: int = 4 << 20,
                 on_port: Optional[Callable[["Board", int, int], None]] = None,
                 on_reset_request: Optional[Callable[[str], None]] = None,
                 clock_ns: Optional[Callable[[], int]] = None) -> None:
        self.out = bytearray()
        self.exit_code: Optional[int] = None
        self.exited = threading.Event()
        self.pending: deque[int] = deque()
        self.lock = threading.Lock()
        self.port_log: list[tuple[int, int]] = []
        self._on_port = on_port
        self.ports: dict[int, Callable] = {DEBUG_OUT: self._debug_out, EXIT_PORT: self._exit}
        self.cpu = VCPU(ram_size, self._port_read, self._port_write, self,
                        on_reset_request=on_reset_request, clock_ns=clock_ns)
        standard_tables(self.cpu.ram)
        self.cpu.load_rom(ROM_BASE, rom)

    # the interrupt source (an 8259 stand-in: a queue of vectors)
    def has_interrupt(self) -> bool:
        with self.lock:
            return bool(self.pending)

    def acknowledge(self) -> int:
        with self.lock:
            return self.pending.popleft()

    def raise_irq(self, vector: int) -> None:
        with self.lock:
            self.pending.append(vector)
        self.cpu.interrupt_raised()

    # the port bus
    def _port_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def _port_write(self, port: int, size: int, value: int) -> None:
        handler = self.ports.get(port)
        if handler is not None:
            handler(value)
        elif self._on_port is not None:
            self._on_port(self, port, value)

    def _debug_out(self, value: int) -> None:
        self.out.append(value & 0xFF)

    def _exit(self, value: int) -> None:
        if self.exit_code is None:
            self.exit_code = value
        self.exited.set()
        self.cpu.pause()

    # running
    def run(self, timeout: float = 10.0) -> int:
        """Run until the guest writes EXIT_PORT; returns the value it wrote."""
        self.cpu.start()
        try:
            if not self.exited.wait(timeout):
                self.cpu.pause(timeout=1)
                regs = {k: hex(v) for k, v in self.cpu.registers().items()}
                raise AssertionError(f"guest did not finish; output {bytes(self.out)!r}; {regs}")
        finally:
            self.cpu.stop()
        assert self.exit_code is not None
        return self.exit_code

    def u32(self, addr: int) -> int:
        return struct.unpack_from("<I", self.cpu.ram, addr)[0]

    def u64(self, addr: int) -> int:
        return struct.unpack_from("<Q", self.cpu.ram, addr)[0]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.002)
        return False

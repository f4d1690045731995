"""Tiny hand-encoded x86-64 guest programs for the libunicorn tests (no assembler needed).

Only the handful of instructions the tests use, each encoded here with its opcode spelled out;
:class:`Asm` resolves labels for ``jnz`` (always the rel32 form, so sizes are fixed).
"""

from __future__ import annotations

import struct

from emu.cpu.uclib import unicorn

X86 = unicorn.x86_const

RAM_SIZE = 64 << 20
CODE = 0x1000
STACK_TOP = 0x80000
# 4-level page tables for the paging cases (inside RAM, away from every test address).
PML4, PDPT, PD = 0x100000, 0x101000, 0x102000
ALIAS = 1 << 30  # virtual ALIAS + x maps physical x when paging is on

#: f(): ``mov eax, imm32 ; ret`` -- the immediate lives at f + 1.
def func_bytes(imm: int) -> bytes:
    return b"\xB8" + struct.pack("<I", imm) + b"\xC3"


class Asm:
    """Append-only encoder with forward labels."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    @property
    def here(self) -> int:
        return self.origin + len(self.buf)

    def label(self, name: str) -> None:
        self.labels[name] = self.here

    def raw(self, data: bytes) -> "Asm":
        self.buf += data
        return self

    def mov_r64_imm64(self, reg: int, imm: int) -> "Asm":
        # REX.W (+B for r8-r15) B8+r io
        rex = 0x48 | (1 if reg >= 8 else 0)
        return self.raw(bytes([rex, 0xB8 + (reg & 7)]) + struct.pack("<Q", imm & (2**64 - 1)))

    def jnz(self, name: str) -> "Asm":
        self.raw(b"\x0F\x85")
        self.fixups.append((len(self.buf), name))
        return self.raw(b"\0\0\0\0")

    def bytes(self) -> bytes:
        for off, name in self.fixups:
            rel = self.labels[name] - (self.origin + off + 4)
            self.buf[off:off + 4] = struct.pack("<i", rel)
        return bytes(self.buf)


RAX, RCX, RDI, R12, R13 = 0, 1, 7, 12, 13

XOR_R12_R12 = b"\x4D\x31\xE4"          # xor r12, r12
CALL_RAX = b"\xFF\xD0"                  # call rax
SHL_R12_4 = b"\x49\xC1\xE4\x04"         # shl r12, 4
OR_R12_RAX = b"\x49\x09\xC4"            # or r12, rax
MOV_EAX_RDI1 = b"\x8B\x47\x01"          # mov eax, [rdi+1]
INC_EAX = b"\xFF\xC0"                   # inc eax
MOV_RDI1_EAX = b"\x89\x47\x01"          # mov [rdi+1], eax
MOV_RDI800_RCX = b"\x48\x89\x8F\x00\x08\x00\x00"  # mov [rdi+0x800], rcx
MOV_RDI_RCX = b"\x48\x89\x0F"           # mov [rdi], rcx
ADD_RDI_8 = b"\x48\x83\xC7\x08"         # add rdi, 8
DEC_RCX = b"\x48\xFF\xC9"               # dec rcx
DEC_R13 = b"\x49\xFF\xCD"               # dec r13
NOP = b"\x90"


def new_engine(paging: bool = False) -> "unicorn.Uc":
    """A 64-bit engine with RAM_SIZE of RWX RAM at 0; with *paging*, 4-level paging on that
    identity-maps the first GiB with 2 MiB pages and maps it again at :data:`ALIAS`."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, RAM_SIZE, unicorn.UC_PROT_ALL)
    if paging:
        enable_paging(uc)
    uc.reg_write(X86.UC_X86_REG_RSP, STACK_TOP)
    return uc


def enable_paging(uc: "unicorn.Uc") -> None:
    """Identity-map 0..1 GiB and alias it at 1 GiB (PS=1 2 MiB pages, RW, present)."""
    uc.mem_write(PML4, struct.pack("<Q", PDPT | 3))
    uc.mem_write(PDPT, struct.pack("<QQ", PD | 3, PD | 3))
    uc.mem_write(PD, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    uc.reg_write(X86.UC_X86_REG_CR3, PML4)
    uc.reg_write(X86.UC_X86_REG_CR4, uc.reg_read(X86.UC_X86_REG_CR4) | (1 << 5))  # PAE
    uc.msr_write(0xC0000080, uc.msr_read(0xC0000080) | (1 << 8) | (1 << 10))  # EFER.LME|LMA
    uc.reg_write(X86.UC_X86_REG_CR0, uc.reg_read(X86.UC_X86_REG_CR0) | 0x80000001)  # PG|PE


def smc_program(f_exec: int, f_write: int, predirty: bool, loops: int) -> tuple[bytes, int]:
    """Guest: *loops* times { call f ; patch f's immediate (+1) through *f_write* ; call f },
    collecting each returned eax as a hex digit in r12.  Returns (code at CODE, end address)."""
    a = Asm(CODE)
    a.raw(XOR_R12_R12).mov_r64_imm64(R13, loops)
    a.label("again")
    a.mov_r64_imm64(RDI, f_write)
    if predirty:
        # store to f's page (through the write address) before f is ever translated
        a.mov_r64_imm64(RCX, 1000)
        a.label("pd")
        a.raw(MOV_RDI800_RCX + DEC_RCX).jnz("pd")
    a.mov_r64_imm64(RAX, f_exec).raw(CALL_RAX + SHL_R12_4 + OR_R12_RAX)
    a.raw(MOV_EAX_RDI1 + INC_EAX + MOV_RDI1_EAX)
    a.mov_r64_imm64(RAX, f_exec).raw(CALL_RAX + SHL_R12_4 + OR_R12_RAX)
    a.raw(DEC_R13).jnz("again")
    a.label("end")
    a.raw(NOP)
    return a.bytes(), a.labels["end"]


def smc_expected(loops: int) -> int:
    """r12 after :func:`smc_program`: digits 1,2,2,3,3,4,... (each patch adds one)."""
    want, v = 0, 1
    for _ in range(loops):
        want = (want << 4) | v
        v += 1
        want = (want << 4) | v
    return want


def store_loop_program(dest: int) -> tuple[bytes, int]:
    """Guest: rcx times { mov [rdi], rcx ; add rdi, 8 ; dec rcx ; jnz } starting at *dest*:
    four instructions per iteration, one of them a store.  Returns (code, end address)."""
    a = Asm(CODE)
    a.mov_r64_imm64(RDI, dest)
    a.label("loop")
    a.raw(MOV_RDI_RCX + ADD_RDI_8 + DEC_RCX).jnz("loop")
    a.label("end")
    a.raw(NOP)
    return a.bytes(), a.labels["end"]

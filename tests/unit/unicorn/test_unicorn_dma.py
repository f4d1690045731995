"""Host writes into a code page (device DMA) followed by emu.cpu.uclib.invalidate_code().

Neither ``uc.mem_write`` nor a write into a ``mem_map_ptr`` buffer invalidates translated code
in either library, so a device that DMAs into guest RAM must call invalidate_code(); after it
the guest runs the new bytes.  Paging-on cases execute the code through a virtual address that
differs from the physical one, so only a physical-address invalidation is right.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest
from unicorn_guest import (
    ALIAS, CALL_RAX, CODE, NOP, OR_R12_RAX, RAM_SIZE, RAX, SHL_R12_4, XOR_R12_R12, X86, Asm,
    enable_paging, func_bytes, new_engine,
)

from emu.cpu.uclib import PATCHED, invalidate_code, unicorn


def call_program(f_exec: int) -> tuple[bytes, int]:
    """Guest: r12 = r12 * 16 + f(), once per run (r12 cleared first)."""
    a = Asm(CODE)
    a.raw(XOR_R12_R12).mov_r64_imm64(RAX, f_exec).raw(CALL_RAX + SHL_R12_4 + OR_R12_RAX)
    a.label("end")
    a.raw(NOP)
    return a.bytes(), a.labels["end"]


class PtrRam:
    """Guest RAM as a host buffer mapped with mem_map_ptr: what a DMA engine writes directly."""

    def __init__(self, uc: "unicorn.Uc", size: int) -> None:
        self.buf = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        uc.mem_map_ptr(0, size, unicorn.UC_PROT_ALL, self.addr)

    def write(self, paddr: int, data: bytes) -> None:
        self.buf[paddr:paddr + len(data)] = data


def make(ptr: bool, paging: bool) -> tuple["unicorn.Uc", object]:
    if not ptr:
        uc = new_engine(paging=paging)
        return uc, uc.mem_write
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    ram = PtrRam(uc, RAM_SIZE)
    uc._emu_test_ram = ram  # keep the buffer alive as long as the engine
    if paging:
        enable_paging(uc)
    uc.reg_write(X86.UC_X86_REG_RSP, 0x80000)
    return uc, ram.write


@pytest.mark.parametrize("ptr", [False, True], ids=["mem_write", "mem_map_ptr"])
@pytest.mark.parametrize(
    "f_exec, paging",
    [(0x5000, False), (0x1800, False), (0x9000, True), (ALIAS + 0xA000, True)],
    ids=["other-page", "same-page-as-caller", "paging-identity", "paging-exec-via-alias"],
)
def test_unicorn_dma_into_code_then_invalidate(ptr: bool, f_exec: int, paging: bool) -> None:
    uc, dma_write = make(ptr, paging)
    code, end = call_program(f_exec)
    f_phys = f_exec % ALIAS
    dma_write(CODE, code)
    dma_write(f_phys, func_bytes(1))
    invalidate_code(uc, CODE, len(code))  # host-loaded program: same rule as DMA
    uc.emu_start(CODE, end)
    assert uc.reg_read(X86.UC_X86_REG_R12) == 1
    for value in (2, 3):
        # the "device" replaces the routine (a whole new sector's worth, as DMA would)
        dma_write(f_phys & ~0x1FF, bytes(f_phys & 0x1FF) + func_bytes(value)
                  + bytes(0x200 - (f_phys & 0x1FF) - 6))
        invalidate_code(uc, f_phys & ~0x1FF, 0x200)
        uc.emu_start(CODE, end)
        assert uc.reg_read(X86.UC_X86_REG_R12) == value


def test_unicorn_dma_invalidate_spans_regions_and_holes() -> None:
    """One invalidation across two mappings and an unmapped hole; no fault, no hook call."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 1 << 20, unicorn.UC_PROT_ALL)
    uc.mem_map(2 << 20, 1 << 20, unicorn.UC_PROT_ALL)
    uc.reg_write(X86.UC_X86_REG_RSP, 0x80000)
    faults: list[int] = []
    uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, lambda _u, _a, addr, *_: faults.append(addr) or False)
    f1, f2 = 0xFF000, (2 << 20) + 0x1000
    prog1, end1 = call_program(f1)
    prog2, _ = call_program(f2)
    uc.mem_write(CODE, prog1)
    uc.mem_write(0x3000, prog2)
    end2 = 0x3000 + (end1 - CODE)
    uc.mem_write(f1, func_bytes(1))
    uc.mem_write(f2, func_bytes(4))
    uc.emu_start(CODE, end1)
    uc.emu_start(0x3000, end2)
    uc.mem_write(f1, func_bytes(2))
    uc.mem_write(f2, func_bytes(5))
    invalidate_code(uc, f1, f2 + 6 - f1)  # covers the hole 1 MiB..2 MiB
    uc.emu_start(CODE, end1)
    assert uc.reg_read(X86.UC_X86_REG_R12) == 2
    uc.emu_start(0x3000, end2)
    assert uc.reg_read(X86.UC_X86_REG_R12) == 5
    invalidate_code(uc, 0x7000_0000_0000, 0x10000)  # nothing mapped there at all
    assert faults == []


def test_unicorn_dma_invalidate_rejects_bad_ranges() -> None:
    uc = new_engine()
    invalidate_code(uc, 0x1000, 0)  # empty: nothing to do
    with pytest.raises(ValueError):
        invalidate_code(uc, 0x1000, -1)
    with pytest.raises(ValueError):
        invalidate_code(uc, (1 << 64) - 0x10, 0x20)


@pytest.mark.skipif(not PATCHED, reason="needs the patched libunicorn (scripts/build-unicorn)")
def test_unicorn_dma_patched_invalidation_is_exact_with_paging() -> None:
    """With the patched library, invalidating one page leaves the others' translations: f on
    another page, rewritten in RAM without an invalidation, still runs its old translation."""
    uc = new_engine(paging=True)
    fa, fb = 0x5000, 0x6000
    pa, ea = call_program(ALIAS + fa)
    pb, _ = call_program(ALIAS + fb)
    uc.mem_write(CODE, pa)
    uc.mem_write(0x3000, pb)
    eb = 0x3000 + (ea - CODE)
    uc.mem_write(fa, func_bytes(1))
    uc.mem_write(fb, func_bytes(7))
    uc.emu_start(CODE, ea)
    uc.emu_start(0x3000, eb)
    uc.mem_write(fa, func_bytes(2))
    uc.mem_write(fb, func_bytes(8))  # no invalidation for fb's page: old code must survive
    invalidate_code(uc, fa, 6)
    uc.emu_start(CODE, ea)
    assert uc.reg_read(X86.UC_X86_REG_R12) == 2
    uc.emu_start(0x3000, eb)
    assert uc.reg_read(X86.UC_X86_REG_R12) == 7


def test_unicorn_dma_patched_function_is_exported_as_reported() -> None:
    from emu.cpu.uclib import library_info

    info = library_info()
    assert info.patched == PATCHED
    if PATCHED:
        assert info.patches == ("notdirty-code-pages", "invalidate-phys", "native-irq", "native-halt",
                                 "insn-hooks-kick", "inline-exit-check")
    else:
        assert info.patches == ()


def test_unicorn_dma_real_mode_boot_sector_reload() -> None:
    """Real mode, as the BIOS: a "disk read" replaces the code at 0000:7C00 that already ran."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.mem_map(0, 1 << 20, unicorn.UC_PROT_ALL)
    uc.reg_write(X86.UC_X86_REG_SP, 0x7000)
    caller = 0x600
    uc.mem_write(caller, b"\xE8" + struct.pack("<h", 0x7C00 - (caller + 3))  # call 0x7C00
                 + b"\x90")                                                   # nop: end
    for value in (0x1111, 0x2222, 0x3333):
        sector = (b"\xB8" + struct.pack("<H", value)  # mov ax, value
                  + b"\xC3").ljust(512, b"\0")        # ret
        uc.mem_write(0x7C00, sector)
        invalidate_code(uc, 0x7C00, len(sector))
        uc.emu_start(caller, caller + 3)
        assert uc.reg_read(X86.UC_X86_REG_AX) == value

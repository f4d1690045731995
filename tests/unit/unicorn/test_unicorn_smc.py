"""Self-modifying code stays correct on whichever libunicorn emu.cpu.uclib loaded.

The patched library lets stores skip the slow path on pages without translated code; these cases
are where that could go wrong: the store lands on a page that holds code (same page, another page,
a page stored to before its code was translated, a page written through a second virtual alias
with paging on, the very block being executed) and the guest must see the new bytes.
Run them on both libraries: plain pytest, and with EMU_UNICORN=stock (or see test_unicorn_loader,
which runs this file again in a subprocess on the other library).
"""

from __future__ import annotations

import struct

import pytest
from unicorn_guest import (
    ALIAS, CODE, X86, func_bytes, new_engine, smc_expected, smc_program,
)

from emu.cpu.uclib import unicorn

LOOPS = 3


@pytest.mark.parametrize(
    "f_exec, f_write, predirty, paging",
    [
        pytest.param(0x1400, 0x1400, False, False, id="same-page-as-writer"),
        pytest.param(0x5000, 0x5000, False, False, id="other-page"),
        pytest.param(0x7000, 0x7000, True, False, id="other-page-written-before-translation"),
        pytest.param(0x600000, 0x600000, True, False, id="other-2MiB-region-written-before"),
        pytest.param(0x9000, 0x9000, True, True, id="paging-identity-written-before"),
        pytest.param(0xB000, ALIAS + 0xB000, True, True, id="paging-alias-write-written-before"),
        pytest.param(0xD000, ALIAS + 0xD000, False, True, id="paging-alias-write"),
        pytest.param(ALIAS + 0xF000, 0xF000, True, True, id="paging-exec-via-alias"),
    ],
)
def test_unicorn_smc_patch_then_call(f_exec: int, f_write: int, predirty: bool, paging: bool) -> None:
    uc = new_engine(paging=paging)
    code, end = smc_program(f_exec, f_write, predirty, LOOPS)
    f_phys = f_exec % ALIAS
    assert not CODE <= f_phys < CODE + len(code), "f overlaps the program"
    uc.mem_write(CODE, code)
    uc.mem_write(f_phys, func_bytes(1))
    uc.emu_start(CODE, end)
    assert uc.reg_read(X86.UC_X86_REG_R12) == smc_expected(LOOPS)
    # f's immediate really was patched LOOPS times in RAM
    assert struct.unpack("<I", uc.mem_read(f_phys + 1, 4))[0] == 1 + LOOPS


def test_unicorn_smc_store_into_running_block() -> None:
    """A store to the next instruction of the block being executed (precise SMC)."""
    uc = new_engine()
    code = (b"\xC7\x05\x01\x00\x00\x00\x02\x00\x00\x00"  # mov dword [rip+1], 2
            b"\xB8\x01\x00\x00\x00"                      # mov eax, 1  (imm patched to 2)
            b"\x90")                                     # nop: end
    uc.mem_write(CODE, code)
    uc.emu_start(CODE, CODE + len(code) - 1)
    assert uc.reg_read(X86.UC_X86_REG_RAX) == 2


@pytest.mark.parametrize("f_addr", [0x7E00, 0x9000], ids=["same-page", "other-page"])
def test_unicorn_smc_real_mode(f_addr: int) -> None:
    """16-bit real mode (the BIOS's world): patch a routine's immediate, call it again."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.mem_map(0, 1 << 20, unicorn.UC_PROT_ALL)
    start = 0x7C00
    prog = bytearray()

    def call_f() -> None:
        here = start + len(prog)
        prog.extend(b"\xE8" + struct.pack("<h", f_addr - (here + 3)))

    call_f()                                                   # call f   -> ax = 1
    prog += b"\x89\xC3"                                        # mov bx, ax
    prog += b"\xFF\x06" + struct.pack("<H", f_addr + 1)        # inc word [f+1]
    call_f()                                                   # call f   -> ax = 2
    prog += b"\x89\xC1"                                        # mov cx, ax
    end = start + len(prog)
    prog += b"\x90"
    uc.mem_write(start, bytes(prog))
    uc.mem_write(f_addr, b"\xB8\x01\x00\xC3")                  # f: mov ax, 1 ; ret
    uc.reg_write(X86.UC_X86_REG_SP, 0x7000)
    uc.emu_start(start, end)
    assert (uc.reg_read(X86.UC_X86_REG_BX), uc.reg_read(X86.UC_X86_REG_CX)) == (1, 2)


def test_unicorn_store_hook_sees_every_store() -> None:
    """Fast stores must not bypass a UC_HOOK_MEM_WRITE (the vCPU may watch a range)."""
    from unicorn_guest import store_loop_program

    uc = new_engine()
    dest, n = 0x200000, 3000
    code, end = store_loop_program(dest)
    uc.mem_write(CODE, code)
    seen: list[int] = []
    uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda _uc, _a, addr, *_: seen.append(addr),
                begin=dest, end=dest + 8 * n - 1)
    uc.reg_write(X86.UC_X86_REG_RCX, n)
    uc.emu_start(CODE, end)
    assert seen == [dest + 8 * i for i in range(n)]
    assert struct.unpack("<Q", uc.mem_read(dest, 8))[0] == n

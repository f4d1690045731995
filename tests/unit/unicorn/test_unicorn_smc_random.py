"""Random self-modifying programs checked against a Python model of what they must compute.

Each program calls small routines (``mov eax, imm32 ; ret``) scattered over a few pages -- some
on the caller's own page -- and in between rewrites their immediates (whole or byte by byte,
through the identity or a paging alias) or stores to data beside them, three times round a
loop so translations are reused and invalidated again and again.  The model replays the same
operations on a dict of bytes; the guest's accumulated result must match it exactly.
Fixed seeds: failures reproduce.
"""

from __future__ import annotations

import random
import struct

import pytest
from unicorn_guest import ALIAS, CODE, DEC_R13, NOP, R12, R13, RAX, RDI, X86, Asm, new_engine

from emu.cpu.uclib import which_library

ROL_R12_5 = b"\x49\xC1\xC4\x05"   # rol r12, 5
XOR_R12_RAX = b"\x49\x31\xC4"     # xor r12, rax
CALL_RAX = b"\xFF\xD0"            # call rax
MASK64 = (1 << 64) - 1
LOOPS = 3


def build(seed: int, paging: bool) -> tuple[bytes, int, dict[int, int], list[tuple], list[int]]:
    """(program, end address, initial immediates by routine, operations, routine addresses)"""
    rng = random.Random(seed)
    ops: list[tuple] = []
    nfunc = rng.randint(3, 8)
    for _ in range(rng.randint(20, 60)):
        kind = rng.choice(("call", "call", "imm32", "imm8", "data"))
        ops.append((kind, rng.randrange(nfunc), rng.getrandbits(32), rng.randrange(4),
                    rng.random() < 0.5))
    # sizes are fixed per operation, so the program's length is known before placing routines
    size = 3 + 10 + sum({"call": 19, "imm32": 16, "imm8": 13, "data": 16}[o[0]] for o in ops) + 10
    code_end = CODE + size
    # routine slots: right after the program (same page), and on a few other pages
    slots = [(code_end + 15) // 16 * 16 + 16 * i for i in range(4)]
    for page in rng.sample(range(0x3000, 0x20000, 0x1000), 4):
        slots += [page + 16 * i for i in range(4)]
    funcs = rng.sample(slots, nfunc)

    def via(addr: int, alias: bool) -> int:
        return addr + ALIAS if paging and alias else addr

    a = Asm(CODE)
    a.raw(b"\x4D\x31\xE4").mov_r64_imm64(R13, LOOPS)          # xor r12, r12 ; mov r13, LOOPS
    a.label("again")
    for kind, fi, value, byte, alias in ops:
        f = funcs[fi]
        if kind == "call":
            a.mov_r64_imm64(RAX, via(f, alias)).raw(CALL_RAX + ROL_R12_5 + XOR_R12_RAX)
        elif kind == "imm32":
            a.mov_r64_imm64(RDI, via(f + 1, alias)).raw(b"\xC7\x07" + struct.pack("<I", value))
        elif kind == "imm8":
            a.mov_r64_imm64(RDI, via(f + 1 + byte, alias)).raw(b"\xC6\x07" + bytes([value & 0xFF]))
        else:  # data beside the routine, same page, never its bytes
            a.mov_r64_imm64(RDI, via(f + 8, alias)).raw(b"\xC7\x07" + struct.pack("<I", value))
    a.raw(DEC_R13).jnz("again")
    a.label("end")
    a.raw(NOP)
    code = a.bytes()
    assert len(code) == size and CODE + size <= min(funcs)
    init = {f: rng.getrandbits(32) for f in funcs}
    return code, a.labels["end"], {i: init[f] for i, f in enumerate(funcs)}, ops, funcs


def model(imms: dict[int, int], ops: list[tuple]) -> int:
    imm = dict(imms)
    r12 = 0
    for _ in range(LOOPS):
        for kind, fi, value, byte, _alias in ops:
            if kind == "call":
                r12 = (((r12 << 5) | (r12 >> 59)) & MASK64) ^ imm[fi]
            elif kind == "imm32":
                imm[fi] = value
            elif kind == "imm8":
                b = bytearray(struct.pack("<I", imm[fi]))
                b[byte] = value & 0xFF
                imm[fi] = struct.unpack("<I", bytes(b))[0]
    return r12


@pytest.mark.parametrize("paging", [False, True], ids=["flat", "paging-with-alias"])
def test_unicorn_smc_random_programs_match_model(paging: bool) -> None:
    for seed in range(25):
        code, end, imms, ops, funcs = build(seed * 2 + paging, paging)
        uc = new_engine(paging=paging)
        uc.mem_write(CODE, code)
        for i, f in enumerate(funcs):
            uc.mem_write(f, b"\xB8" + struct.pack("<I", imms[i]) + b"\xC3")
        uc.emu_start(CODE, end)
        got = uc.reg_read(X86.UC_X86_REG_R12)
        assert got == model(imms, ops), f"seed {seed * 2 + paging} on {which_library()}"

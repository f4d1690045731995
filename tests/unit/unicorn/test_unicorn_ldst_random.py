"""Random guest loads and stores of every width checked against a Python model of memory.

Each program sets RDI to an address and loads (8/4/2/1 bytes, zero- or sign-extended, also
through a 32-bit address with garbage above it), stores, or adds to memory there, folding every
loaded value into R12.  The addresses cover RAM in the middle of pages and across page
boundaries (which takes the slow path), and an MMIO page; the program runs twice round a loop,
so the second pass goes through cached translations and a warm TLB.  The same programs run
with a memory read hook installed, which sends every access through the slow path.  This pins
the softmmu fast path (patch 0010 changed how a TLB hit forms the host address) and the slow
path's arguments on the library under test.  Fixed seeds: failures reproduce.
"""

from __future__ import annotations

import random
import struct

import pytest
from unicorn_guest import ALIAS, CODE, DEC_R13, NOP, R12, R13, RAX, RDI, X86, Asm, new_engine

from emu.cpu.uclib import unicorn, which_library

uc_const = unicorn.unicorn_const

MASK64 = (1 << 64) - 1
PAGE = 4096
RAM_PAGES = (0x200000, 0x201000, 0x202000, 0x3FF000)   # physical, inside RAM, away from CODE
MMIO = 0x8000000                                          # physical, above RAM (64 MiB)
LOOPS = 2
#: the pages initialised and checked: the data pages and the ones accesses straddle into
CHECKED = tuple(sorted(set(RAM_PAGES) | {p + PAGE for p in RAM_PAGES}))

ROL_R12_5 = b"\x49\xC1\xC4\x05"   # rol r12, 5
XOR_R12_RAX = b"\x49\x31\xC4"     # xor r12, rax

#: load name -> (encoding, size, signed, through EDI)
LOADS = {
    "q": (b"\x48\x8B\x07", 8, False, False),        # mov rax, [rdi]
    "d": (b"\x8B\x07", 4, False, False),            # mov eax, [rdi]
    "ds": (b"\x48\x63\x07", 4, True, False),        # movsxd rax, dword [rdi]
    "w": (b"\x0F\xB7\x07", 2, False, False),        # movzx eax, word [rdi]
    "ws": (b"\x48\x0F\xBF\x07", 2, True, False),    # movsx rax, word [rdi]
    "b": (b"\x0F\xB6\x07", 1, False, False),        # movzx eax, byte [rdi]
    "bs": (b"\x48\x0F\xBE\x07", 1, True, False),    # movsx rax, byte [rdi]
    "d32": (b"\x67\x8B\x07", 4, False, True),       # mov eax, [edi]
}
#: store name -> (encoding, size, through EDI); RAX holds the value
STORES = {
    "q": (b"\x48\x89\x07", 8, False),               # mov [rdi], rax
    "d": (b"\x89\x07", 4, False),                   # mov [rdi], eax
    "w": (b"\x66\x89\x07", 2, False),               # mov [rdi], ax
    "b": (b"\x88\x07", 1, False),                   # mov [rdi], al
    "q32": (b"\x67\x48\x89\x07", 8, True),          # mov [edi], rax
}
ADD_MEM_RAX = b"\x48\x01\x07"                       # add [rdi], rax


def _address(rng: random.Random, size: int, mmio_ok: bool) -> int:
    if mmio_ok and rng.random() < 0.2:
        return MMIO + rng.randrange(0, PAGE, size)      # aligned inside the MMIO page
    page = rng.choice(RAM_PAGES)
    if rng.random() < 0.3:                              # straddles into the next page
        return page + PAGE - rng.randint(1, size - 1) if size > 1 else page + PAGE - 1
    return page + rng.randrange(0, PAGE - size + 1)


def build(seed: int, virt: int) -> tuple[bytes, int, list[tuple]]:
    """(program at CODE, end address, operations); *virt* is added to every data address."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(rng.randint(40, 120)):
        kind = rng.choice(("load", "load", "store", "add"))
        if kind == "load":
            name = rng.choice(list(LOADS))
            size = LOADS[name][1]
        elif kind == "store":
            name = rng.choice(list(STORES))
            size = STORES[name][1]
        else:
            name, size = "add", 8
        straddle_ok = name not in ("d32", "q32")
        addr = _address(rng, size, mmio_ok=True)
        if not straddle_ok and (addr % PAGE) + size > PAGE:
            addr -= size
        ops.append((kind, name, addr, rng.getrandbits(64), rng.getrandbits(32)))
    a = Asm(CODE)
    a.raw(b"\x4D\x31\xE4")                              # xor r12, r12
    a.mov_r64_imm64(R13, LOOPS)
    a.label("again")
    for kind, name, addr, value, garbage in ops:
        through_edi = (kind == "load" and LOADS[name][3]) or (kind == "store" and STORES[name][2])
        rdi = virt + addr
        if through_edi:
            rdi |= garbage << 32        # only EDI forms the address
        a.mov_r64_imm64(RDI, rdi)
        if kind == "load":
            a.raw(LOADS[name][0] + ROL_R12_5 + XOR_R12_RAX)
        elif kind == "store":
            a.mov_r64_imm64(RAX, value).raw(STORES[name][0])
        else:
            a.mov_r64_imm64(RAX, value).raw(ADD_MEM_RAX)
    a.raw(DEC_R13).jnz("again")
    a.label("end")
    a.raw(NOP)
    return a.bytes(), a.labels["end"], ops


def model(ops: list[tuple], mem: dict[int, int]) -> int:
    """R12 after LOOPS passes; *mem* (physical address -> byte, missing = 0) is updated."""
    def read(addr: int, n: int) -> int:
        return int.from_bytes(bytes(mem.get(addr + i, 0) for i in range(n)), "little")

    def write(addr: int, n: int, v: int) -> None:
        for i, b in enumerate((v & ((1 << 8 * n) - 1)).to_bytes(n, "little")):
            mem[addr + i] = b

    r12 = 0
    for _ in range(LOOPS):
        for kind, name, addr, value, _garbage in ops:
            if kind == "load":
                _enc, n, signed, _edi = LOADS[name]
                v = read(addr, n)
                if signed and v >> (8 * n - 1):
                    v = (v - (1 << 8 * n)) & MASK64
                r12 = (((r12 << 5) | (r12 >> 59)) & MASK64) ^ v
            elif kind == "store":
                write(addr, STORES[name][1], value)
            else:
                write(addr, 8, read(addr, 8) + value)
    return r12


def run(seed: int, paging: bool, read_hook: bool) -> tuple[int, int, dict[int, int], list]:
    virt = ALIAS if paging else 0
    code, end, ops = build(seed, virt)
    rng = random.Random(seed ^ 0x5EED)
    mem: dict[int, int] = {}
    uc = new_engine(paging)
    for page in CHECKED:
        init = rng.randbytes(PAGE)
        uc.mem_write(page, init)
        mem.update({page + i: b for i, b in enumerate(init)})
    mmio = bytearray(rng.randbytes(PAGE))
    mem.update({MMIO + i: b for i, b in enumerate(mmio)})

    def mmio_read(_uc, offset: int, size: int, _ud) -> int:
        return int.from_bytes(mmio[offset:offset + size], "little")

    def mmio_write(_uc, offset: int, size: int, value: int, _ud) -> None:
        mmio[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    uc.mmio_map(MMIO, PAGE, mmio_read, None, mmio_write, None)
    reads = [0]
    if read_hook:
        def on_read(_uc, _access, _addr, _size, _value, _ud) -> None:
            reads[0] += 1
        uc.hook_add(uc_const.UC_HOOK_MEM_READ, on_read)
    uc.mem_write(CODE, code)
    uc.emu_start(CODE, end)
    got = uc.reg_read(X86.UC_X86_REG_R12)
    want = model(ops, mem)
    # every byte the programs may have touched, RAM and MMIO, against the model
    wrong = []
    for page in CHECKED:
        data = bytes(uc.mem_read(page, PAGE))
        wrong += [page + i for i in range(PAGE) if data[i] != mem.get(page + i, 0)]
    wrong += [MMIO + i for i in range(PAGE) if mmio[i] != mem[MMIO + i]]
    if read_hook:
        assert reads[0] > 0, "the read hook never ran"
    return got, want, {"wrong": wrong[:8], "nwrong": len(wrong)}, ops


@pytest.mark.parametrize("read_hook", [False, True], ids=["fast-path", "read-hook"])
@pytest.mark.parametrize("paging", [False, True], ids=["flat", "paging"])
def test_unicorn_ldst_random_programs_match_model(paging: bool, read_hook: bool) -> None:
    for seed in range(12):
        got, want, diff, ops = run(seed, paging, read_hook)
        assert diff["nwrong"] == 0, (which_library(), seed, diff)
        assert got == want, (which_library(), seed, hex(got), hex(want), len(ops))

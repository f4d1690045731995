"""The page-walk cache used by event delivery: a hit is exactly an uncached walk.

Run against a real vCPU's state blob and RAM (not started): the identity page tables of
``cpu_harness.standard_tables`` (4-level, 2 MiB pages), then page-table edits the guest
could make without INVLPG or a CR3 write.
"""

from __future__ import annotations

import struct

import pytest

from cpu_harness import PML4_ADDR, Board, guest
from emu.cpu import layout as L
from emu.cpu.mmu import GuestFault, LinearMem, WalkCache

PDE0 = PML4_ADDR + 0x2000        # page directory entry for 0-2 MiB
L_A, L_D = 1 << 5, 1 << 6        # Accessed, Dirty


@pytest.fixture(scope="module")
def board() -> Board:
    return Board(guest("    hlt\n"))


def _long_mode(board: Board) -> L.CpuState:
    st = board.cpu._st
    st.load()
    st.set_cr(0, L.CR0_PE | L.CR0_PG)
    st.set_cr(3, PML4_ADDR)
    st.set_cr(4, L.CR4_PAE)
    st.hflags = st.hflags | L.HF_LMA_MASK
    return st


def _pde(board: Board, value: int) -> None:
    struct.pack_into("<Q", board.cpu.ram, PDE0, value)


def test_cpu_walk_cache_hit_revalidates_every_entry(board: Board) -> None:
    st = _long_mode(board)
    phys = board.cpu._phys
    cache = WalkCache()
    _pde(board, 0x87)
    assert LinearMem(st, phys, cache).translate(0x12345, False, False) == 0x12345
    assert (0x12, False, False) in cache.walks
    # A later delivery under the same CR3 hits the cache ...
    assert LinearMem(st, phys, cache).translate(0x12FFF, False, False) == 0x12FFF
    # ... but sees a PDE the guest rewrote without INVLPG, as a fresh walk would.
    _pde(board, 0x400000 | 0x87)
    assert LinearMem(st, phys, cache).translate(0x12345, False, False) == 0x412345
    # Not present any more: #PF with CR2, nothing served from the cache.
    _pde(board, 0x400000 | 0x86)
    with pytest.raises(GuestFault) as info:
        LinearMem(st, phys, cache).translate(0x12345, False, False)
    assert (info.value.vector, info.value.cr2, info.value.error_code) == (14, 0x12345, 0)
    _pde(board, 0x87)


def test_cpu_walk_cache_keeps_accessed_and_dirty_bits(board: Board) -> None:
    st = _long_mode(board)
    phys = board.cpu._phys
    cache = WalkCache()
    _pde(board, 0x87)
    LinearMem(st, phys, cache).translate(0x8000, True, False)
    assert struct.unpack_from("<Q", board.cpu.ram, PDE0)[0] == 0x87 | L_A | L_D
    # The guest clears A/D (as an OS ageing pages does): the next write walk sets them again.
    _pde(board, 0x87 & ~(L_A | L_D))
    assert LinearMem(st, phys, cache).translate(0x8000, True, False) == 0x8000
    assert struct.unpack_from("<Q", board.cpu.ram, PDE0)[0] == 0x87 | L_A | L_D
    _pde(board, 0x87)


def test_cpu_walk_cache_forgets_on_paging_context_change(board: Board) -> None:
    st = _long_mode(board)
    phys = board.cpu._phys
    cache = WalkCache()
    _pde(board, 0x87)
    LinearMem(st, phys, cache).translate(0x5000, False, False)
    assert cache.walks
    st.set_cr(0, st.cr(0) | L.CR0_WP)
    LinearMem(st, phys, cache)
    assert not cache.walks
    # A user access to a supervisor page still faults through a cached context.
    _pde(board, 0x83)
    LinearMem(st, phys, cache).translate(0x5000, False, False)
    with pytest.raises(GuestFault) as info:
        LinearMem(st, phys, cache).translate(0x5000, False, True)
    assert info.value.error_code == 0x5       # present | user
    _pde(board, 0x87)


"""Guest memory as the CPU sees it while *we* deliver an event.

Interrupt delivery runs in Python between two ``emu_start`` calls, so the IDT, GDT and
TSS reads and the stack pushes it does go through this module: a page walk done here
(32-bit, PSE, PAE and 4-level long mode), with the permission checks the hardware makes for
those implicit accesses, and :class:`GuestFault` (#PF with CR2 and error code) when it
fails.  Physical accesses go straight to the RAM mmap; anything else is read through
Unicorn (MMIO) or reads as all ones, as on a PC where nothing decodes the address.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from emu.cpu.layout import (CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, HF_LMA_MASK, OFF_A20_MASK,
                            CpuState)

PF_P = 1 << 0       # #PF error code: the page was present (protection violation)
PF_W = 1 << 1       # the access was a write
PF_U = 1 << 2       # the access was made at CPL 3
PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
ADDR_MASK = 0x000FFFFFFFFFF000

_Q = struct.Struct("<Q")
_D = struct.Struct("<I")


class GuestFault(Exception):
    """An x86 exception raised while we emulate part of the CPU (delivery, SYSCALL, MSRs).

    :param vector: exception vector (0-31).
    :param error_code: error code pushed by the CPU, or ``None`` for vectors without one.
    :param cr2: the faulting linear address for #PF.
    """

    def __init__(self, vector: int, error_code: Optional[int] = None, cr2: Optional[int] = None) -> None:
        super().__init__(f"guest exception {vector} error_code={error_code} cr2={cr2}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class PhysMem:
    """Byte access to guest-physical memory.

    :param lookup: ``lookup(gpa) -> (buffer, index, bytes_left, writable) | None``: the host
        buffer holding ``gpa`` (RAM or ROM) and how far it runs contiguously.
    :param slow_read: reads anything else (MMIO through Unicorn); returns ``None`` where
        nothing is mapped.
    :param slow_write: writes anything else; silently drops the write where nothing is mapped.
    """

    def __init__(self, lookup: Callable, slow_read: Callable[[int, int], Optional[bytes]],
                 slow_write: Callable[[int, bytes], None],
                 ram: Optional[memoryview] = None,
                 ram_ranges: Optional[list[tuple[int, int, int]]] = None) -> None:
        self._lookup = lookup
        self._slow_read = slow_read
        self._slow_write = slow_write
        # Page-table entries live in RAM: q()/d() read them straight from the buffer when
        # given ``ram`` and its ``(start, end, offset)`` ranges (fixed for the vCPU's life).
        self._ram = ram
        self._ram_ranges = tuple(ram_ranges) if ram is not None and ram_ranges else ()

    def read(self, gpa: int, n: int) -> bytes:
        """Read ``n`` bytes at ``gpa``; unbacked bytes read as 0xFF."""
        for start, end, offset in self._ram_ranges:
            if start <= gpa and gpa + n <= end:
                at = offset + gpa - start
                return bytes(self._ram[at:at + n])
        hit = self._lookup(gpa)
        if hit is not None and hit[2] >= n:       # the common case: all in one buffer
            return bytes(hit[0][hit[1]:hit[1] + n])
        out = bytearray()
        while n > 0:
            hit = self._lookup(gpa)
            if hit is not None:
                buf, idx, left, _w = hit
                k = min(n, left)
                out += buf[idx:idx + k]
            else:
                k = min(n, 0x1000 - (gpa & 0xFFF))
                data = self._slow_read(gpa, k)
                out += data if data is not None else b"\xff" * k
            gpa += k
            n -= k
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at ``gpa``; writes to ROM or to nothing are dropped, as on a PC."""
        for start, end, offset in self._ram_ranges:
            if start <= gpa and gpa + len(data) <= end:
                at = offset + gpa - start
                self._ram[at:at + len(data)] = data
                return
        pos = 0
        while pos < len(data):
            hit = self._lookup(gpa)
            if hit is not None:
                buf, idx, left, writable = hit
                k = min(len(data) - pos, left)
                if writable:
                    buf[idx:idx + k] = data[pos:pos + k]
            else:
                k = min(len(data) - pos, 0x1000 - (gpa & 0xFFF))
                self._slow_write(gpa, data[pos:pos + k])
            gpa += k
            pos += k

    def q(self, gpa: int) -> int:
        for start, end, offset in self._ram_ranges:
            if start <= gpa <= end - 8:
                return _Q.unpack_from(self._ram, offset + gpa - start)[0]
        return _Q.unpack(self.read(gpa, 8))[0]

    def d(self, gpa: int) -> int:
        for start, end, offset in self._ram_ranges:
            if start <= gpa <= end - 4:
                return _D.unpack_from(self._ram, offset + gpa - start)[0]
        return _D.unpack(self.read(gpa, 4))[0]


class WalkCache:
    """Page walks that succeeded, kept from one delivery to the next.

    An entry is used only after every paging-structure entry its walk read (PDPTE, PML4E
    ... PTE) still holds the value the walk left there (Accessed/Dirty included): a new walk
    would then read the same entries, reach the same frame, pass the same checks and write
    nothing, so a hit is exactly an uncached walk, never a stale TLB (no INVLPG or CR3
    reload needs to be seen).  The cache is emptied when CR0, CR3, CR4, EFER.LMA or the A20
    mask differ from those it was filled under.
    """

    LIMIT = 64      # one delivery uses ~4 pages (IDT, GDT, TSS, stack) plus HLT's code page

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.walks: dict[tuple[int, bool, bool], tuple[int, tuple[tuple[int, int, int], ...]]] = {}

    def bind(self, key: tuple) -> None:
        """Use the cache under paging context ``key``; forget everything if it changed."""
        if key != self.key:
            self.key = key
            self.walks.clear()

    def clear(self) -> None:
        """Forget every walk (reset, or anything that rewrites guest memory wholesale)."""
        self.key = None
        self.walks.clear()


class LinearMem:
    """Linear-address access for one delivery, with the hardware's checks.

    :param st: CPU state (CR0/CR3/CR4, hflags, A20 mask are taken from it).
    :param phys: physical memory.
    """

    def __init__(self, st: CpuState, phys: PhysMem, cache: Optional[WalkCache] = None) -> None:
        self.st = st
        self.phys = phys
        self.cr0 = st.cr(0)
        self.cr3 = st.cr(3)
        self.cr4 = st.cr(4)
        self.lma = bool(st.hflags & HF_LMA_MASK)
        # a20_mask is an int32 that QEMU sign-extends when it masks an address.
        self.a20 = st.i32(OFF_A20_MASK) & 0xFFFFFFFFFFFFFFFF
        # One delivery touches a handful of pages (IDT, GDT, TSS, stack), several times.
        self._tlb: dict[tuple[int, bool, bool], int] = {}
        self._cache = cache
        if cache is not None and self.cr0 & CR0_PG:
            cache.bind((self.cr0, self.cr3, self.cr4, self.lma, self.a20))

    def translate(self, lin: int, write: bool, user: bool) -> int:
        """Linear to physical; raises :class:`GuestFault` (#PF) as the CPU would."""
        if not self.lma:
            lin &= 0xFFFFFFFF
        if not (self.cr0 & CR0_PG):
            return lin & self.a20
        key = (lin >> 12, write, user)
        page = self._tlb.get(key)
        if page is not None:
            return page | (lin & 0xFFF)
        cache = self._cache
        if cache is not None:
            hit = cache.walks.get(key)
            if hit is not None:
                phys = self.phys
                for addr, value, size in hit[1]:
                    if (phys.q(addr) if size == 8 else phys.d(addr)) != value:
                        break
                else:
                    self._tlb[key] = hit[0]
                    return hit[0] | (lin & 0xFFF)
        pa, read = self._walk(lin, write, user)      # faults report the exact address in CR2
        self._tlb[key] = pa & ~0xFFF
        if cache is not None:
            if len(cache.walks) >= cache.LIMIT:
                cache.walks.clear()
            cache.walks[key] = (pa & ~0xFFF, read)
        return pa

    def debug_translate(self, lin: int) -> int:
        """Linear to physical as a debugger sees it (QEMU's ``cpu_get_phys_page_debug``, behind
        the monitor's ``x`` and ``memsave``): no permission check, no Accessed/Dirty bit
        set, nothing cached; raises :class:`GuestFault` where nothing is mapped."""
        if not self.lma:
            lin &= 0xFFFFFFFF
        if not (self.cr0 & CR0_PG):
            return lin & self.a20
        return self._walk(lin, False, False, debug=True)[0]

    def _walk(self, lin: int, write: bool, user: bool,
              debug: bool = False) -> tuple[int, tuple[tuple[int, int, int], ...]]:
        """One page walk; returns the physical address and the ``(address, value, size)`` of
        every paging-structure entry read, with the values the walk left in memory
        (``debug``: only the address; no checks, memory left as it is)."""
        err = (PF_W if write else 0) | (PF_U if user else 0)
        wp = bool(self.cr0 & CR0_WP)
        phys = self.phys
        entries: list[tuple[int, int, int]] = []  # (pte address, value, size)
        pdpte_read: tuple[tuple[int, int, int], ...] = ()

        def fault(present: bool) -> GuestFault:
            return GuestFault(14, err | (PF_P if present else 0), cr2=lin)

        if self.lma or (self.cr4 & CR4_PAE):
            if self.lma:
                table = self.cr3 & ADDR_MASK
                shifts = (39, 30, 21, 12)
            else:
                pdpte_addr = ((self.cr3 & 0xFFFFFFE0) + ((lin >> 30) & 3) * 8) & self.a20
                pdpte = phys.q(pdpte_addr)
                if not pdpte & PTE_P:
                    raise fault(False)
                pdpte_read = ((pdpte_addr, pdpte, 8),)
                table = pdpte & ADDR_MASK
                shifts = (21, 12)
            rw, us = True, True
            for level, shift in enumerate(shifts):
                addr = (table + ((lin >> shift) & 511) * 8) & self.a20
                e = phys.q(addr)
                if not e & PTE_P:
                    raise fault(False)
                entries.append((addr, e, 8))
                rw &= bool(e & PTE_W)
                us &= bool(e & PTE_U)
                leaf = shift == 12 or (e & PTE_PS and shift in (21, 30))
                if leaf:
                    size_mask = (1 << shift) - 1
                    pa = ((e & ADDR_MASK) & ~size_mask) | (lin & size_mask)
                    break
                table = e & ADDR_MASK
        else:
            addr = ((self.cr3 & 0xFFFFF000) + ((lin >> 22) & 1023) * 4) & self.a20
            pde = phys.d(addr)
            if not pde & PTE_P:
                raise fault(False)
            entries.append((addr, pde, 4))
            if (pde & PTE_PS) and (self.cr4 & CR4_PSE):
                pa = (pde & 0xFFC00000) | ((pde & 0x1FE000) << 19) | (lin & 0x3FFFFF)
                rw, us = bool(pde & PTE_W), bool(pde & PTE_U)
            else:
                addr = ((pde & 0xFFFFF000) + ((lin >> 12) & 1023) * 4) & self.a20
                pte = phys.d(addr)
                if not pte & PTE_P:
                    raise fault(False)
                entries.append((addr, pte, 4))
                rw = bool(pde & PTE_W) and bool(pte & PTE_W)
                us = bool(pde & PTE_U) and bool(pte & PTE_U)
                pa = (pte & 0xFFFFF000) | (lin & 0xFFF)
        if debug:
            return pa & self.a20, ()
        if user and not us:
            raise fault(True)
        if write and not rw and (user or wp):
            raise fault(True)
        # The CPU sets Accessed on every level and Dirty on the leaf of a write.
        read = list(pdpte_read)
        for i, (addr, e, size) in enumerate(entries):
            new = e | PTE_A
            if write and i == len(entries) - 1:
                new |= PTE_D
            if new != e:
                phys.write(addr, new.to_bytes(size, "little"))
            read.append((addr, new, size))
        return pa & self.a20, tuple(read)

    def read(self, lin: int, n: int, user: bool = False) -> bytes:
        out = b""
        while n > 0:
            k = min(n, 0x1000 - (lin & 0xFFF))
            out += self.phys.read(self.translate(lin, False, user), k)
            lin += k
            n -= k
        return out

    def push(self, base: int, sp: int, sp_mask: int, values: list[int], size: int,
             user: bool = False) -> int:
        """Push ``values`` (first one first, at the highest address) as the CPU does, each
        ``size`` bytes, on the stack ``base``:``sp`` (``sp`` wraps within ``sp_mask``).

        Every push is checked before anything is written; a fault reports the address of
        the first push that fails in CR2, as the CPU's sequence of pushes would.

        :returns: the new stack pointer.
        """
        mask = (1 << (8 * size)) - 1
        total = size * len(values)
        low = (sp - total) & sp_mask
        if low + total == sp and (base + low) & ~0xFFF == (base + sp - 1) & ~0xFFF:
            # The whole frame in one page without a wrap (the usual case): one translation
            # (of the first push, so a fault reports its address in CR2), one write; the
            # lowest address holds the last push, so the bytes go in reverse.
            pa = self.translate(base + ((sp - size) & sp_mask), True, user) - (total - size)
            self.phys.write(pa, b"".join((v & mask).to_bytes(size, "little") for v in reversed(values)))
            return low
        writes = []
        for value in values:
            sp = (sp - size) & sp_mask
            lin = base + sp
            pa = self.translate(lin, True, user)
            if (lin & 0xFFF) + size > 0x1000:      # a push straddling two pages
                tail = self.translate((lin | 0xFFF) + 1, True, user)
                first = 0x1000 - (lin & 0xFFF)
                data = (value & mask).to_bytes(size, "little")
                writes += [(pa, data[:first]), (tail, data[first:])]
            else:
                writes.append((pa, (value & mask).to_bytes(size, "little")))
        for pa, data in writes:
            self.phys.write(pa, data)
        return sp

    def write(self, lin: int, data: bytes, user: bool = False) -> None:
        # Translate every page first so that a fault leaves memory untouched.
        chunks = []
        pos = 0
        while pos < len(data):
            k = min(len(data) - pos, 0x1000 - (lin & 0xFFF))
            chunks.append((self.translate(lin, True, user), data[pos:pos + k]))
            lin += k
            pos += k
        for pa, chunk in chunks:
            self.phys.write(pa, chunk)

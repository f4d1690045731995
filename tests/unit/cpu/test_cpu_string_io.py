"""A vCPU stop (kick) that lands while an instruction is inside a port or MMIO callback must not
make that instruction run again: no IN/OUT/MMIO access is ever replayed, no word is lost.

Unicorn 2.1.4 checks for a stop request after every guest load/store and, if one is pending,
restarts the current instruction from its beginning (``cpu_loop_exit_restore``), although its
port or MMIO callback already ran: ``REP INSW`` stores the word, sees the stop and rewinds RDI/RCX,
so the device sees one more read than the guest gets words (the IDE boot bug).  Each test drives a
device whose reads return a running counter and kicks the vCPU from inside the callback at chosen
accesses (deterministic), or from another thread as fast as it can (the timer's case).
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from conftest import requires_nasm

from cpu_harness import Board, guest

pytestmark = requires_nasm

DATA_PORT = 0x300
BUF = 0x100000            # guest buffer at 1 MiB (flat PM32)
MMIO = 0xFEB00000
KICK_EVERY = 7            # kick inside every 7th callback (and the first)


class CountingBoard(Board):
    """A board with a counting data port and a counting MMIO register; callbacks kick the vCPU
    at chosen accesses, as a device raising its IRQ line from inside the access does."""

    def __init__(self, rom: bytes, kick_at=lambda n: n % KICK_EVERY == 0) -> None:
        self.reads = 0
        self.writes: list[int] = []
        self.mmio_reads = 0
        self.mmio_writes: list[tuple[int, int, int]] = []
        self.kicks = 0
        self.kick_at = kick_at
        super().__init__(rom, ram_size=8 << 20)
        self.cpu.map_mmio(MMIO, 0x1000, self._mmio_read, self._mmio_write)

    def _maybe_kick(self, n: int) -> None:
        if self.kick_at(n):
            self.kicks += 1
            self.cpu.kick()

    def _port_read(self, port: int, size: int) -> int:
        if port != DATA_PORT:
            return super()._port_read(port, size)
        n = self.reads
        self.reads += 1
        self._maybe_kick(n)
        return n & ((1 << (8 * size)) - 1)

    def _port_write(self, port: int, size: int, value: int) -> None:
        if port != DATA_PORT:
            return super()._port_write(port, size, value)
        self.writes.append(value)
        self._maybe_kick(len(self.writes) - 1)

    def _mmio_read(self, offset: int, size: int) -> int:
        n = self.mmio_reads
        self.mmio_reads += 1
        self._maybe_kick(n)
        return n & ((1 << (8 * size)) - 1)

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        self.mmio_writes.append((offset, size, value))
        self._maybe_kick(len(self.mmio_writes) - 1)


def _finish(extra: str = "") -> str:
    return extra + r"""
    mov [RES], edi
    mov [RES + 4], esi
    mov [RES + 8], ecx
    EXIT 0x11
"""


def _regs(board: Board) -> tuple[int, int, int]:
    return struct.unpack_from("<3I", board.cpu.ram, 0x500)


@pytest.mark.parametrize("insn,width", [("insb", 1), ("insw", 2), ("insd", 4)])
def test_rep_ins_interrupted_inside_the_port_callback_loses_nothing(insn: str, width: int) -> None:
    count = 600
    body = f"""
    cld
    mov dx, {DATA_PORT:#x}
    mov edi, {BUF:#x}
    mov ecx, {count}
    rep {insn}
""" + _finish()
    board = CountingBoard(guest(body))
    assert board.run() == 0x11
    assert board.kicks > count // KICK_EVERY
    assert board.reads == count                      # not one IN replayed
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    got = struct.unpack_from(f"<{count}{fmt}", board.cpu.ram, BUF)
    assert list(got) == [n & ((1 << (8 * width)) - 1) for n in range(count)]
    edi, _esi, ecx = _regs(board)
    assert (edi, ecx) == (BUF + count * width, 0)


def test_single_insw_in_a_loop_and_std_direction() -> None:
    # INSW without REP, and REP INSW backwards (DF=1): the same store-then-check sequence.
    body = f"""
    cld
    mov dx, {DATA_PORT:#x}
    mov edi, {BUF:#x}
    mov ebx, 100
.one:
    insw
    dec ebx
    jnz .one
    std
    mov edi, {BUF + 0x1000 - 2:#x}
    mov ecx, 100
    rep insw
    cld
""" + _finish()
    board = CountingBoard(guest(body), kick_at=lambda n: True)   # kick in every IN
    assert board.run() == 0x11
    assert board.reads == 200
    assert list(struct.unpack_from("<100H", board.cpu.ram, BUF)) == list(range(100))
    down = struct.unpack_from("<100H", board.cpu.ram, BUF + 0x1000 - 200)
    assert list(down) == list(range(199, 99, -1))
    edi, _esi, ecx = _regs(board)
    assert (edi, ecx) == (BUF + 0x1000 - 2 - 200, 0)


def test_rep_outsw_interrupted_inside_the_port_callback_writes_each_word_once() -> None:
    count = 300
    body = f"""
    cld
    mov edi, {BUF:#x}
    xor eax, eax
.fill:
    stosw
    inc eax
    cmp eax, {count}
    jb .fill
    mov dx, {DATA_PORT:#x}
    mov esi, {BUF:#x}
    mov ecx, {count}
    rep outsw
""" + _finish()
    board = CountingBoard(guest(body))
    assert board.run() == 0x11
    assert board.writes == list(range(count))
    _edi, esi, ecx = _regs(board)
    assert (esi, ecx) == (BUF + 2 * count, 0)


def test_mmio_reads_writes_and_read_modify_write_are_not_replayed() -> None:
    # REP MOVSD from MMIO to RAM, from RAM to MMIO, a load, an ADD and REP STOSD: a read has
    # side effects (read-to-clear registers), so each must reach the device exactly once.
    body = f"""
    cld
    mov esi, {MMIO:#x}
    mov edi, {BUF:#x}
    mov ecx, 100
    rep movsd                           ; 100 MMIO reads
    mov esi, {BUF:#x}
    mov edi, {MMIO + 0x100:#x}
    mov ecx, 100
    rep movsd                           ; 100 MMIO writes of 0..99
    mov eax, [{MMIO + 0x800:#x}]        ; read 100
    mov [{BUF + 0x1000:#x}], eax
    add dword [{MMIO + 0x804:#x}], 5    ; read 101, write 106
    mov edi, {MMIO + 0x900:#x}
    mov eax, 0xAB
    mov ecx, 10
    rep stosd                           ; 10 MMIO writes of 0xAB
""" + _finish()
    board = CountingBoard(guest(body), kick_at=lambda n: True)
    assert board.run() == 0x11
    assert list(struct.unpack_from("<100I", board.cpu.ram, BUF)) == list(range(100))
    assert board.cpu.ram[BUF + 0x1000] == 100
    assert board.mmio_reads == 102
    assert board.mmio_writes == ([(0x100 + 4 * i, 4, i) for i in range(100)] + [(0x804, 4, 106)]
                                 + [(0x900 + 4 * i, 4, 0xAB) for i in range(10)])


def test_rep_insw_under_a_kick_storm_from_another_thread() -> None:
    # The timer's case: kicks from another thread at random points, thousands of them, while the
    # guest reads 64 KiB words in 16 REP INSW strings of 4096 words (an IDE PIO read loop).
    body = f"""
    cld
    mov dx, {DATA_PORT:#x}
    mov edi, {BUF:#x}
    mov ebx, 16
.sector:
    mov ecx, 4096
    rep insw
    dec ebx
    jnz .sector
""" + _finish()
    board = CountingBoard(guest(body), kick_at=lambda n: False)
    stop = threading.Event()
    kicks = [0]

    def storm() -> None:
        while not stop.is_set():
            board.cpu.kick()
            kicks[0] += 1
            time.sleep(0.00002)

    t = threading.Thread(target=storm)
    board.cpu.start()
    t.start()
    try:
        assert board.exited.wait(30)
    finally:
        stop.set()
        t.join()
        board.cpu.stop()
    assert board.exit_code == 0x11
    assert kicks[0] > 100
    assert board.reads == 16 * 4096
    got = struct.unpack_from(f"<{16 * 4096}H", board.cpu.ram, BUF)
    assert got == tuple(n & 0xFFFF for n in range(16 * 4096))


def test_root_cause_unicorn_rewinds_an_instruction_stopped_inside_its_callback() -> None:
    # The bare engine: a stop requested in the IN hook of REP INSW (RCX=3) ends the run with
    # RCX/RDI as before the iteration whose IN already ran: resuming reads the port again.
    # With no_exit_request set the iteration completes and the run ends after it.
    from emu.cpu import layout
    from emu.cpu.uclib import unicorn
    bare = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    assert layout.rep_insw_stop_probe(bare) == (1, 3, 0)
    fixed = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    layout.stop_only_between_instructions(fixed)
    assert layout.rep_insw_stop_probe(fixed) == (1, 2, 2)


def test_a_build_where_the_flag_cannot_be_found_or_does_not_work_is_refused(monkeypatch) -> None:
    from emu.cpu import layout
    from emu.errors import CpuError
    monkeypatch.setattr(layout, "_no_exit_offset", None)
    monkeypatch.setattr(layout, "_candidates", lambda raw: [])
    with pytest.raises(CpuError, match="found 0 places"):
        layout.find_no_exit_request()
    # A candidate whose byte does not change the behaviour (nothing is written here).
    monkeypatch.setattr(layout, "_candidates", lambda raw: [2000])
    monkeypatch.setattr(layout, "_set_no_exit_request", lambda uc, off: None)
    with pytest.raises(CpuError, match="still rewinds"):
        layout.find_no_exit_request()
    monkeypatch.undo()
    assert layout.find_no_exit_request() > 0

"""A halted vCPU with native interrupts waits inside ``emu_start`` (patch 0004) and fires the
machine's device timers itself (``VCPU.timers``): every IRQ still arrives exactly once, pause,
reset-free kicks and DMA invalidation still reach it, and the Python-delivery paths agree."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import requires_nasm

from cpu_harness import Board, guest
from emu.cpu import uclib
from emu.hw.clock import VirtualClock

pytestmark = requires_nasm
MS = 1_000_000

IDLE = r"""
    GATE32 0x20, irq_handler, 0x8E00
    sti
.idle:
    hlt
    cmp dword [RES], 200
    jb .idle
    EXIT 0x2C
irq_handler:
    inc dword [RES]
    iretd
"""


def _ticking_board(native_halt: bool | None):
    """The idle guest on a vCPU whose timers are a real clock: a 1 kHz timer on it raises
    vector 0x20 through the board's queue and records the thread it ran on."""
    clock = VirtualClock()
    board = Board(guest(IDLE), clock_ns=clock.now)
    if native_halt is not None:
        board.cpu._native_halt = native_halt and board.cpu._native_halt
        if not native_halt and uclib.NATIVE_HALT:
            uclib.halt_set_callback(board.cpu._uc, uclib.HALT_CB(0))   # NULL: HLT exits again
    board.cpu.timers = clock
    threads: list[threading.Thread] = []
    raised = [0]

    def tick() -> None:
        threads.append(threading.current_thread())
        if raised[0] < 200:
            raised[0] += 1
            board.raise_irq(0x20)
            timer.mod(clock.now() + MS)

    timer = clock.timer(tick)
    return clock, board, timer, threads, raised


@pytest.mark.parametrize("native_halt", [True, False], ids=["halt-in-emu-start", "halt-exits"])
def test_timer_irqs_of_a_halted_guest_arrive_once_each_and_pause_interrupts_the_wait(native_halt):
    clock, board, timer, threads, raised = _ticking_board(native_halt)
    cpu = board.cpu
    clock.start()
    timer.mod(clock.now() + MS)
    cpu.start()
    try:
        assert board.wait_for(lambda: board.u32(0x500) >= 50)
        # pause while the guest sits in HLT: the wait is interrupted, virtual time stops
        assert cpu.pause(timeout=2)
        clock.pause()
        assert cpu.state.value == "paused"
        count = board.u32(0x500)
        time.sleep(0.03)
        assert board.u32(0x500) == count
        clock.resume()
        cpu.resume()
        assert board.exited.wait(15), f"{board.u32(0x500)} IRQs handled"
    finally:
        cpu.stop()
        clock.stop()
    assert board.exit_code == 0x2C
    assert board.u32(0x500) == 200 == raised[0]
    assert not board.pending
    # the halted vCPU fired (some of) the timers itself
    assert cpu._thread in threads


@pytest.mark.skipif(not uclib.NATIVE_HALT, reason="needs patch 0004 (native-halt)")
def test_dma_and_kicks_while_halted_in_emu_start_reach_the_loop():
    # A device "DMAs" new code while the guest halts, from another thread: the halted wait
    # gives way (the request is applied by the loop) and the guest runs the new code after
    # the IRQ; a storm of kicks meanwhile changes nothing.
    body = r"""
    GATE32 0x20, irq_handler, 0x8E00
    mov eax, 0x5000
    call eax                              ; 'A'
    sti
    hlt                                   ; woken by the IRQ after the DMA
    mov eax, 0x5000
    call eax                              ; must print 'B'
    EXIT 0x24
irq_handler:
    inc dword [RES]
    iretd
"""
    board = Board(guest(body))
    board.cpu.ram[0x5000:0x5006] = bytes([0xB0, ord("A"), 0xE6, 0xE9, 0x90, 0xC3])
    cpu = board.cpu
    cpu.start()
    try:
        assert board.wait_for(lambda: cpu.halted)
        for _ in range(50):
            cpu.kick()
        assert board.wait_for(lambda: cpu.halted)
        board.cpu.ram[0x5001] = ord("B")
        cpu.invalidate_code(0x5000, 6)
        board.raise_irq(0x20)
        assert board.exited.wait(10)
    finally:
        cpu.stop()
    assert board.exit_code == 0x24
    assert bytes(board.out) == b"AB"
    assert board.u32(0x500) == 1

"""RDTSC/RDTSCP always read the virtual TSC, even when a kick lands next to them.

Root cause of "RDTSC sometimes goes backwards": libunicorn's RDTSC/RDTSCP helpers walk
every UC_HOOK_INSN hook and leave the walk as soon as ``stop_request`` is set (a kick =
``uc_emu_stop``), even before reaching the matching hook; the helper then writes the host
TSC into EDX:EAX.  An OUT whose device kicks the vCPU, followed by RDTSC in the same
translation block, reproduced it every time (RDTSC read ~1.4e13 instead of 2e9).  The vCPU
now registers RDTSC's hook first, so it is always called; RDTSCP's hook cannot also be first.
Patch 0006 of emu's libunicorn ("insn-hooks-kick") ends the walk on ``stop_request`` only after
a matching hook ran, so RDTSCP, SYSCALL and SYSENTER are emulated next to a kick too; on a
library without it those tests are expected failures (and CPUID still does not advertise RDTSCP).
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from cpu_harness import Board, guest

from emu.cpu import uclib

#: The loaded libunicorn calls an instruction's INSN hook even after a kick (patch 0006).
HOOKS_SURVIVE_KICK = "insn-hooks-kick" in uclib.library_info().patches

CLOCK_AT_RESET = 1_000_000_000
CLOCK_LATER = 3_000_000_123          # the TSC must read exactly 2_000_000_123


def _kicking_board(body: str, long_mode: bool) -> Board:
    now = [CLOCK_AT_RESET]
    # Port 0x80 "device" kicks the vCPU from its own callback, as a device raising an IRQ does.
    board = Board(guest(body, long_mode=long_mode), clock_ns=lambda: now[0],
                  on_port=lambda b, port, value: b.cpu.kick())
    now[0] = CLOCK_LATER
    return board


def _run_after_kick(insn: str, long_mode: bool) -> tuple[int, int]:
    body = rf"""
    mov ecx, 0xC0000103                   ; TSC_AUX := 0x55 for RDTSCP's ECX
    mov eax, 0x55
    xor edx, edx
    wrmsr
    xor ecx, ecx
    out 0x80, al                          ; kick: stop_request is set from here on...
    {insn}                                ; ...and this read is in the same block
    mov [RES], eax
    mov [RES + 4], edx
    mov [RES + 8], ecx
    EXIT 0x2E
"""
    board = _kicking_board(body, long_mode)
    assert board.run() == 0x2E
    tsc, aux = struct.unpack_from("<QI", board.cpu.ram, 0x500)
    return tsc, aux


@pytest.mark.parametrize("long_mode", [False, True])
def test_rdtsc_right_after_a_kick_reads_the_virtual_tsc(long_mode: bool) -> None:
    tsc, ecx = _run_after_kick("rdtsc", long_mode)
    assert tsc == CLOCK_LATER - CLOCK_AT_RESET, f"{tsc:#x}"
    assert ecx == 0


@pytest.mark.xfail(not HOOKS_SURVIVE_KICK, strict=False, reason="libunicorn 2.1.4 leaves its INSN hook walk on "
                   "stop_request before reaching RDTSCP's hook (only the first hook, RDTSC's, "
                   "is always called) and returns the host TSC; CPUID does not advertise RDTSCP")
def test_rdtscp_right_after_a_kick_reads_the_virtual_tsc() -> None:
    tsc, aux = _run_after_kick("rdtscp", True)
    assert (tsc, aux) == (CLOCK_LATER - CLOCK_AT_RESET, 0x55), f"{tsc:#x} {aux:#x}"


def test_cpuid_does_not_advertise_rdtscp() -> None:
    body = r"""
    mov eax, 0x80000001
    cpuid
    mov [RES], edx
    EXIT 0x2E
"""
    board = Board(guest(body))
    assert board.run() == 0x2E
    edx = board.u32(0x500)
    assert edx & (1 << 27) == 0 and edx & (1 << 29) and edx & (1 << 11)   # no RDTSCP; LM, SYSCALL


def test_rdtsc_loop_is_monotonic_under_kicks_irqs_and_pause_resume() -> None:
    # A guest loop of RDTSC reads checks each value against the previous one:
    # never lower, never more than 10 s of virtual time ahead (the host TSC would be).
    # Meanwhile another thread raises 1 kHz timer IRQs, kicks and pauses/resumes the vCPU;
    # the guest itself kicks before every read through port 0x80.
    body = r"""
    GATE64 0x20, irq_handler, 0x8E00
    sti
    xor r8, r8                            ; previous TSC
    mov r9, 20000                         ; iterations
.loop:
    out 0x80, al
    rdtsc
    call check
    out 0x80, al
    lfence
    rdtsc
    call check
    dec r9
    jnz .loop
    EXIT 0x2E
check:
    shl rdx, 32
    mov eax, eax
    or rax, rdx
    mov rbx, rax
    sub rbx, r8
    jb .bad                               ; went backwards
    mov rcx, 10000000000
    cmp rbx, rcx
    ja .bad                               ; jumped ahead by more than 10 s
    mov r8, rax
    ret
.bad:
    mov [RES], r8
    mov [RES + 8], rax
    EXIT 0xBD
irq_handler:
    inc dword [RES + 16]
    iretq
"""
    board = Board(guest(body, long_mode=True), on_port=lambda b, port, value: b.cpu.kick())
    cpu = board.cpu
    stop = threading.Event()
    pauses = [0]

    def disturb() -> None:
        n = 0
        while not stop.is_set():
            board.raise_irq(0x20)             # the timer: queue an IRQ and kick
            cpu.kick()
            n += 1
            if n % 20 == 0 and cpu.pause(timeout=2):
                pauses[0] += 1
                time.sleep(0.002)
                cpu.resume()
            time.sleep(0.001)

    t = threading.Thread(target=disturb)
    cpu.start()
    t.start()
    try:
        assert board.exited.wait(60), "guest did not finish"
    finally:
        stop.set()
        t.join()
        cpu.stop()
    prev, bad = struct.unpack_from("<QQ", cpu.ram, 0x500)
    assert board.exit_code == 0x2E, f"TSC read {bad:#x} after {prev:#x}"
    assert board.u32(0x510) > 0 and pauses[0] > 0


# The same libunicorn hook walk serves CPUID, SYSCALL and SYSENTER: only one hook can be
# first in the list.  CPUID is now an SVM intercept (checked before the walk); SYSCALL and
# SYSENTER keep the window (found while fixing RDTSC; not fixed yet).
_SAME_WINDOW = ("libunicorn 2.1.4 leaves its INSN hook walk on stop_request before reaching "
                "this instruction's hook (RDTSC's is first): a kick in the same block skips "
                "emu's emulation of it")


def test_cpuid_right_after_a_kick_is_still_filtered() -> None:
    body = r"""
    out 0x80, al
    mov eax, 1
    cpuid
    mov [RES], edx
    EXIT 0x2E
"""
    board = _kicking_board(body, long_mode=False)
    assert board.run() == 0x2E
    assert board.u32(0x500) & (1 << 9) == 0           # no local APIC even right after a kick


@pytest.mark.xfail(not HOOKS_SURVIVE_KICK, strict=False, reason=_SAME_WINDOW)
def test_syscall_right_after_a_kick_enters_the_kernel() -> None:
    body = r"""
    mov ecx, 0xC0000081                   ; STAR: kernel CS 0x28, SYSRET base 0x38
    xor eax, eax
    mov edx, 0x00380028
    wrmsr
    mov ecx, 0xC0000082                   ; LSTAR
    mov rax, kernel_entry
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov r12, 0x1234
    out 0x80, al
    syscall
    mov [RES], r12
    EXIT 0x2E
kernel_entry:
    mov r12, 0x4321
    o64 sysret
"""
    board = _kicking_board(body, long_mode=True)
    assert board.run() == 0x2E
    assert board.u64(0x500) == 0x4321                  # the SYSCALL was not skipped


def test_default_clock_read_from_another_thread_never_goes_back_across_pause_resume() -> None:
    # The vCPU's own clock (no machine clock given) is read by device threads; the pause
    # bookkeeping is swapped in one assignment so a reader never counts a pause twice.
    body = r"""
.spin:
    inc dword [RES]
    jmp .spin
"""
    board = Board(guest(body))
    cpu = board.cpu
    stop = threading.Event()
    errors: list[tuple[int, int]] = []
    reads = [0]

    def reader() -> None:
        prev = cpu.clock_ns()
        while not stop.is_set():
            now = cpu.clock_ns()
            if now < prev:
                errors.append((prev, now))
            prev = now
            reads[0] += 1

    cpu.start()
    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(40):
            assert cpu.pause(timeout=2)
            before = cpu.clock_ns()
            time.sleep(0.002)
            assert cpu.clock_ns() == before          # stands still while paused
            cpu.resume()
            time.sleep(0.002)
    finally:
        stop.set()
        t.join()
        cpu.stop()
    assert reads[0] > 100 and errors == []

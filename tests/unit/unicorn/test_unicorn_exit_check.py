"""A stop from another thread ends a loop of chained blocks at a block start, state exact.

Patch 0007 of emu's libunicorn ("inline-exit-check") replaces Unicorn's helper call at every
translation-block start by QEMU's inline test of ``icount_decr``; the exit then goes through
cpu_tb_exec's TB_EXIT_REQUESTED path, which must put RIP back on the start of the block that
was not run.  The guest is two blocks that jump to each other forever (``inc r12; jmp mid`` /
``mid: inc r13; jmp loop``): after every stop RIP must be one of the two block starts and the
counters must agree with it (r12 == r13 at ``loop``, r12 == r13 + 1 at ``mid``), and running on
from there must keep them agreeing.  The engine is set up as emu's vCPU is: exits enabled with
no exit addresses, and no per-access exit checks (``no_exit_request``).  Passes on the stock
library too (same behaviour through its helper).
"""

from __future__ import annotations

import struct
import threading

from unicorn_guest import CODE, X86, new_engine

from emu.cpu import layout
from emu.cpu.uclib import PATCHED, library_info, unicorn

INC_R12 = b"\x49\xFF\xC4"               # inc r12
INC_R13 = b"\x49\xFF\xC5"               # inc r13
#: Safety net only (the test stops the guest itself long before): Unicorn's own timeout, in
#: microseconds; UC_QUERY_TIMEOUT tells whether it fired.
SAFETY_US = 60_000_000


def jmp_rel32(at: int, target: int) -> bytes:
    return b"\xE9" + struct.pack("<i", target - (at + 5))


def two_block_loop() -> tuple[bytes, int, int]:
    """The guest, and the addresses of its two blocks."""
    loop = CODE
    mid = loop + len(INC_R12) + 5
    code = INC_R12 + jmp_rel32(loop + len(INC_R12), mid)
    code += INC_R13 + jmp_rel32(mid + len(INC_R13), loop)
    return code, loop, mid


def run_until_stopped(uc: "unicorn.Uc", begin: int, delay_s: float) -> None:
    stopper = threading.Timer(delay_s, uc.emu_stop)
    stopper.start()
    try:
        uc.emu_start(begin, 0, timeout=SAFETY_US)
    finally:
        stopper.cancel()
        stopper.join()
    assert uc.query(unicorn.UC_QUERY_TIMEOUT) == 0, "the stop request was never taken"


def test_unicorn_exit_check_stop_lands_on_a_block_start_with_exact_state() -> None:
    code, loop, mid = two_block_loop()
    uc = new_engine()
    layout.stop_only_between_instructions(uc)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.mem_write(CODE, code)
    uc.reg_write(X86.UC_X86_REG_R12, 0)
    uc.reg_write(X86.UC_X86_REG_R13, 0)
    rip = loop
    last = -1
    for delay in (0.05, 0.02, 0.08, 0.01):
        run_until_stopped(uc, rip, delay)
        rip = uc.reg_read(X86.UC_X86_REG_RIP)
        r12 = uc.reg_read(X86.UC_X86_REG_R12)
        r13 = uc.reg_read(X86.UC_X86_REG_R13)
        assert rip in (loop, mid), f"stopped at {rip:#x}, not at a block start"
        assert r12 - r13 == (0 if rip == loop else 1), (rip, r12, r13)
        assert r12 > last        # the guest ran in every round (the blocks are chained)
        last = r12


def test_unicorn_exit_check_patch_is_reported() -> None:
    patches = library_info().patches
    assert ("inline-exit-check" in patches) == PATCHED

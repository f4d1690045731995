"""Store-throughput sanity check: reports (never asserts on) the speed, and which library.

The figures appear with ``pytest -rP`` (or ``-s``); the asserts check only that every store
landed.  Seen here: ~430 MIPS patched, ~60 stock on this loop (one store in four instructions).
"""

from __future__ import annotations

import struct
import time

from unicorn_guest import CODE, X86, new_engine, store_loop_program

from emu.cpu.uclib import PATCHED, which_library

ITERATIONS = 1_000_000  # 8 MB of stores; ~0.01 s patched, ~0.07 s stock
DEST = 16 << 20


def test_unicorn_store_throughput_report(record_property) -> None:
    uc = new_engine()
    code, end = store_loop_program(DEST)
    uc.mem_write(CODE, code)
    uc.reg_write(X86.UC_X86_REG_RCX, ITERATIONS)
    t0 = time.perf_counter()
    uc.emu_start(CODE, end)
    dt = time.perf_counter() - t0
    # the loop stores rcx (counting down) at DEST + 8 * i
    for i in (0, 1, ITERATIONS // 2, ITERATIONS - 1):
        assert struct.unpack("<Q", uc.mem_read(DEST + 8 * i, 8))[0] == ITERATIONS - i
    mips = ITERATIONS * 4 / dt / 1e6
    line = f"{which_library()}: {ITERATIONS} store-loop iterations in {dt:.3f} s = {mips:.0f} MIPS"
    record_property("unicorn_store_mips", round(mips))
    record_property("unicorn_patched", PATCHED)
    print(line)

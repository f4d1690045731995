"""Focused bench: host CPU per timer tick of a halted vCPU (``python tests/unit/cpu/cpu_halt_bench.py``).

A guest in PM32 or long mode sits in ``sti; hlt; jmp`` and counts IRQ 0 (vector
0x20) in its handler; a host thread raises the interrupt at ``--hz`` the
way the timer thread does (queue + :meth:`VCPU.kick`).  Printed per mode: IRQs taken, host
CPU time of the whole process per IRQ (``time.process_time``) and of the vCPU thread alone, and the vCPU thread's % of a
core.  ``--profile`` runs cProfile on the vCPU thread and prints the top entries.
Not a test: it measures, it asserts nothing (the cpu tests cover behaviour).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_harness import Board, guest  # noqa: E402

SORT = "tottime"
RES = 0x500             # results area (cpu_harness PRELUDE)

PM32 = r"""
    GATE32 0x20, irq_handler, 0x8E00
idle:
    sti
    hlt
    jmp idle
irq_handler:
    inc dword [RES]
    iret
"""

LM64 = r"""
    GATE64 0x20, irq_handler, 0x8E00
idle:
    sti
    hlt
    jmp idle
irq_handler:
    inc dword [RES]
    iretq
"""



def run(mode: str, seconds: float, hz: int, profile: bool) -> dict:
    body = {"pm32": PM32, "lm64": LM64}[mode]
    board = Board(guest(body, long_mode=mode == "lm64"))
    cpu = board.cpu
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        real_loop = cpu._loop

        def loop() -> None:
            prof.enable()
            try:
                real_loop()
            finally:
                prof.disable()
        cpu._loop = loop
    stop = threading.Event()

    def ticker() -> None:
        period = 1.0 / hz
        nxt = time.monotonic()
        while not stop.is_set():
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            board.raise_irq(0x20)

    cpu.start()
    time.sleep(0.2)                       # boot into the idle loop
    t = threading.Thread(target=ticker, daemon=True)
    clk = time.pthread_getcpuclockid(cpu._thread.ident)
    n0, c0, w0, v0 = board.u32(RES), time.process_time(), time.monotonic(), time.clock_gettime(clk)
    t.start()
    time.sleep(seconds)
    n1, c1, w1, v1 = board.u32(RES), time.process_time(), time.monotonic(), time.clock_gettime(clk)
    stop.set()
    t.join()
    cpu.stop()
    irqs = n1 - n0
    out = {"mode": mode, "irqs": irqs, "hz_seen": irqs / (w1 - w0),
           "cpu_us_per_irq": (c1 - c0) * 1e6 / max(irqs, 1),
           "vcpu_us_per_irq": (v1 - v0) * 1e6 / max(irqs, 1),
           "cpu_pct": 100 * (c1 - c0) / (w1 - w0)}
    if prof is not None:
        pstats.Stats(prof).sort_stats(SORT).print_stats(25)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--hz", type=int, default=1000)
    ap.add_argument("--modes", default="pm32,lm64")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        r = run(mode, args.seconds, args.hz, args.profile)
        print(f"{r['mode']:5} irqs={r['irqs']:6} rate={r['hz_seen']:7.1f}/s "
              f"cpu/irq={r['cpu_us_per_irq']:6.1f} us (vCPU thread {r['vcpu_us_per_irq']:6.1f})  "
              f"cpu={r['cpu_pct']:5.1f} % core")


if __name__ == "__main__":
    main()

"""HMP ``info registers``, ``x`` and ``xp`` side by side with qemu-system-x86_64 7.2.

Both emulators boot the same 64 KiB ROM (hmp_cpu_rom.asm) that loads known values into every
register the dump shows and halts, in protected mode with paging and in long mode; then the
same HMP lines get the same text from both: the register dump (segment caches, LDT, busy TSS,
descriptor tables, control and debug registers, EFER, x87 and SSE state), memory dumps in
every format and size through the paging (``x``) and physically (``xp``), HMP expressions
with ``$registers``, and the errors for bad formats, expressions and extra arguments."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QmpProcess, requires_nasm, requires_qemu_system

pytestmark = [requires_nasm, requires_qemu_system]

HERE = Path(__file__).resolve().parent

#: HMP lines run on both, in this order (the /fmt defaults carry over from line to line)
LINES = [
    "info registers",
    "info registers -a",
    "info registers 0",
    "info registers 1",
    "info registers x",
    "info registers 0 1",
    "xp /8c 0x20000",
    "x /8c 0x400000",
    "x /4xb 0x400000",
    "x /2xg 0x400008",
    "x /3uh 0x400010",
    "x /3dw 0x400010",
    "x /2ob 0x400018",
    "x /20xb 0x400000",
    "xp/2x 0x20000",
    "xp",
    "xp 0x20000",
    "x /2xw $esp",
    "x /xg $sp",
    "xp /x $esp+4",
    "xp /x $ss.base+$esp",
    "x /x $eip",
    "xp /x $cs.limit",
    "xp /x $gs.limit",
    "x /x 0x400000 + 2 * (3 & ~1) - 0x4 % 3",
    "x /x 0x400000|0x10",
    "x /2xw 0x7ffffc",
    "x /x 0x800000",
    "xp /x 0x10000000",
    "xp /4xb 0x3fffffe",
    "x /4q 0",
    "x /4xz 0",
    "x",
    "x /x $nope",
    "x /x (1",
    "x /x 1/0",
    "x /x 'A'",
    "x /x 0x20000 5",
    "x /0x 0",
    "x /x 99999999999999999999",
]


def _rom(tmp: Path, mode: int) -> Path:
    out = tmp / f"hmp-{mode}.rom"
    subprocess.run(["nasm", "-f", "bin", f"-DMODE={mode}", "-o", str(out),
                    str(HERE / "hmp_cpu_rom.asm")], check=True)
    assert out.stat().st_size == 65536
    return out


def _session(argv0: list[str], rom: Path, work: Path) -> list[str]:
    with QmpProcess(argv0 + ["-machine", "pc,accel=tcg", "-m", "64", "-nodefaults",
                             "-display", "none", "-bios", str(rom)],
                    work / f"{argv0[0].rsplit('/', 1)[-1]}.sock", cwd=work) as q:
        q.cmd("qmp_capabilities")

        def hmp(line: str) -> str:
            return q.cmd("human-monitor-command", {"command-line": line})["return"]

        deadline = time.monotonic() + 30
        while "HLT=1" not in hmp("info registers"):
            assert time.monotonic() < deadline, hmp("info registers")
            time.sleep(0.05)
        return [hmp(line) for line in LINES]


@pytest.mark.parametrize("mode", [32, 64])
def test_hmp_registers_and_memory_dumps_match_qemu(tmp_path: Path, mode: int) -> None:
    rom = _rom(tmp_path, mode)
    want = _session(["qemu-system-x86_64"], rom, tmp_path)
    got = _session([sys.executable, "-m", "emu"], rom, tmp_path)
    assert "HMP-test" not in want[0]
    assert "'H' 'M' 'P' '-' 't' 'e' 's' 't'" in want[6]     # the ROM ran as intended
    assert ("RAX=1122334455667788" if mode == 64 else "EAX=11223344") in want[0]
    for line, w, g in zip(LINES, want, got):
        assert g == w, f"{line!r}\nQEMU:\n{w}\nemu:\n{g}"

"""Boot each CPU/platform test guest on QEMU (the reference) and on emu, and check its report.

Every guest prints a line per check and exits through isa-debug-exit; the tests here check the
verdict and the exact values that matter, so a mismatch on emu shows what differs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cpu_guest_runner import EMULATORS, Emulator, assert_passed, prepare, run_guest


@pytest.fixture(params=EMULATORS)
def emulator(request: pytest.FixtureRequest) -> Emulator:
    return request.param


def boot(emulator: Emulator, guest: str, request: pytest.FixtureRequest, tmp_path: Path):
    prepare(emulator, guest, request, tmp_path)
    return run_guest(emulator, guest, tmp_path)


def test_cpu_guest_serial(emulator: Emulator, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run = boot(emulator, "serial", request, tmp_path)
    assert_passed(run, ["divisor", "scratch", "idle", "thri", "loopback", "text"])
    assert run.fields("divisor") == {"dl_9600": 0x0C, "dl_115200": 1, "lcr": 3}
    assert run.fields("loopback")["rbr"] == 0x5AA5C30F
    assert run.results()["text"] == "the quick brown fox jumps over the lazy dog 0123456789 ok"
    # Nothing sent in loopback mode may leak to the host side.
    assert "\x5a\xa5" not in run.output
    ascii_line = next(line for line in run.lines if line.startswith("ascii:"))
    assert ascii_line == "ascii:" + "".join(chr(c) for c in range(0x20, 0x7F)).rstrip()

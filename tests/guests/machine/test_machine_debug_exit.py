"""isa-debug-exit ends the process with status ``(value << 1) | 1`` and no SHUTDOWN event
(QEMU's debugexit_write calls exit() at once), also under ``-no-shutdown``; the same
64 KiB ``-bios`` ROM on emu and on qemu-system-x86_64, watched by a QMP client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import requires_nasm, requires_qemu_system

ROM_ASM = """bits 16
times 0xFFF0 - ($-$$) db 0xF4
reset:
    mov dx, 0x501
    mov al, 5
    out dx, al
    hlt
    jmp reset
times 0x10000 - ($-$$) db 0xF4
"""


def _rom(tmp_path: Path) -> Path:
    (tmp_path / "exit.asm").write_text(ROM_ASM)
    rom = tmp_path / "exit.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(rom), str(tmp_path / "exit.asm")], check=True)
    assert rom.stat().st_size == 0x10000
    return rom


def _run(argv: list[str], rom: Path, sock: Path, extra: list[str]) -> tuple[int, list[str]]:
    """Boot ``rom`` paused, connect QMP, ``cont``; return the exit status and event names."""
    proc = subprocess.Popen(argv + ["-bios", str(rom), "-display", "none", "-S",
                                    "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                                    "-qmp", f"unix:{sock},server=on,wait=off", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        s = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 30
        while True:
            try:
                s.connect(str(sock))
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "no QMP socket"
                time.sleep(0.05)
        s.settimeout(30)
        f = s.makefile("rwb")
        assert b"QMP" in f.readline()
        for cmd in ("qmp_capabilities", "cont"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
        msgs = []
        try:
            while line := f.readline():
                msgs.append(json.loads(line))
        except ConnectionResetError:
            pass    # the emulator exited with replies unread: the socket ends either way
        s.close()
        # QEMU may exit before its reply to cont is written: count the replies too
        names = [m["event"] if "event" in m else "return" for m in msgs]
        return proc.wait(timeout=30), names
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


EMU = [sys.executable, "-m", "emu"]
QEMU = ["qemu-system-x86_64", "-machine", "pc,accel=tcg"]


@requires_nasm
@pytest.mark.parametrize("extra", [[], ["-no-shutdown"]], ids=["default", "no-shutdown"])
def test_machine_debug_exit_no_shutdown_event(tmp_path: Path, extra: list[str]) -> None:
    status, events = _run(EMU, _rom(tmp_path), tmp_path / "emu.sock", extra)
    assert status == (5 << 1) | 1
    assert events == ["return", "RESUME", "return"]


@requires_nasm
@requires_qemu_system
def test_machine_debug_exit_matches_qemu(tmp_path: Path) -> None:
    rom = _rom(tmp_path)
    q_status, q_events = _run(QEMU, rom, tmp_path / "q.sock", [])
    e_status, e_events = _run(EMU, rom, tmp_path / "e.sock", [])
    assert q_status == e_status == 11
    assert "SHUTDOWN" not in q_events and "SHUTDOWN" not in e_events
    assert q_events[0] == e_events[0] == "return"       # the client was connected in time

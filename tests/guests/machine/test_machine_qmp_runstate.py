"""QMP run-state commands on a running guest: ``-S`` + cont, stop (the vCPU really stops),
system_reset (board and CPU back to POST), quit — with QEMU's events — and COM1 input."""

from __future__ import annotations

from pathlib import Path

from conftest import requires_nasm
from machine_images import MACHINE, boot_image, ide

pytestmark = [requires_nasm]


def _quiet_for(vm, seconds: float) -> str:
    """Everything COM1 prints during the next ``seconds``."""
    return vm.output_for(seconds)


def test_machine_qmp_cont_stop_reset_quit(emu_machine, tmp_path: Path) -> None:
    vm = emu_machine(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)), qmp=True, paused=True)
    assert vm.command("query-status") == {"running": False, "singlestep": False, "status": "prelaunch"}
    assert _quiet_for(vm, 0.3) == ""                       # -S: the BIOS has not run
    assert vm.command("cont") == {}
    assert "data" not in vm.event("RESUME")               # QEMU's RESUME has no data
    out = vm.expect("ticker up")
    assert "emu BIOS" in out
    vm.expect("...")

    assert _quiet_for(vm, 1.0).count(".") >= 3            # running: a dot every few tens of ms
    vm.command("stop")
    vm.event("STOP")
    assert vm.command("query-status")["status"] == "paused"
    _quiet_for(vm, 0.2)                                   # what was already on its way
    assert "." not in _quiet_for(vm, 1.0)                 # a parked vCPU prints nothing

    vm.command("cont")
    vm.event("RESUME")
    vm.expect("...", timeout=10)

    vm.command("system_reset")
    assert vm.event("RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    out = vm.expect("ticker up", timeout=20)
    assert "emu BIOS" in out                              # POST again: board + CPU reset
    assert vm.command("query-status")["status"] == "running"

    vm.command("quit")
    assert vm.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert vm.wait() == 0


def test_machine_serial_input_reaches_guest(emu_machine, tmp_path: Path) -> None:
    vm = emu_machine(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)))
    vm.expect("ticker up")
    vm.console.send("x")                                  # the ticker polls COM1's LSR
    assert vm.wait() == (0x2A << 1) | 1

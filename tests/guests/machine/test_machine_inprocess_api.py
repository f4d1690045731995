"""The in-process API of ``emu_inprocess`` machines: QMP commands and HMP lines without a
socket (``vm.qmp``, ``vm.hmp``; QEMU's errors as :class:`emu.testing.QmpCommandError`), the
events they cause (``vm.events``), the vCPU's registers and guest memory read directly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import requires_nasm, requires_qemu_img
from emu.testing import QmpCommandError
from machine_images import MACHINE, boot_image, ide

pytestmark = [requires_nasm]


def test_qmp_hmp_registers_and_memory_in_process(emu_inprocess, tmp_path: Path) -> None:
    vm = emu_inprocess(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)))
    vm.wait_for("ticker up")
    assert vm.qmp("query-status") == {"status": "running", "singlestep": False, "running": True}
    assert [e["event"] for e in vm.events] == ["RESUME"]        # leaving prelaunch, as QEMU
    vm.qmp("stop")
    assert vm.qmp("query-status")["status"] == "paused"
    assert [e["event"] for e in vm.events] == ["RESUME", "STOP"]

    regs = vm.registers()
    assert regs["cs"] == 0 and 0x7C00 <= regs["rip"] < 0x7E00      # in the boot sector's loop
    assert regs["cs_base"] == 0 and regs["cpl"] == 0 and regs["cr0"] & 1 == 0
    assert regs["rflags"] & 0x200 == 0 and regs["ss"] == 0 and regs["rsp"] <= 0x7C00   # cli
    # the boot sector sits at 0x7C00 (real mode: linear = physical) and ends in 55 AA
    sector = vm.read_physical(0x7C00, 512)
    assert sector[510:] == b"\x55\xaa" and vm.read_virtual(0x7C00, 512) == sector
    assert b"ticker up" in sector
    dump = vm.hmp("xp /2xb 0x7dfe")
    assert dump == "0000000000007dfe: 0x55 0xaa\n"
    assert vm.hmp("info registers").startswith("\nCPU#0\nEAX=")
    with pytest.raises(ValueError):
        vm.read_physical(0x10000000, 1)                 # past the 64 MiB of RAM

    with pytest.raises(QmpCommandError) as err:
        vm.qmp("blockdev-snapshot-internal-sync", device="nope", name="s")
    assert err.value.error_class == "GenericError"
    assert err.value.desc == "Cannot find device='nope' nor node-name='nope'"
    vm.qmp("cont")
    assert [e["event"] for e in vm.events] == ["RESUME", "STOP", "RESUME"]


@requires_qemu_img
def test_internal_snapshot_in_process_is_seen_by_qemu_img(emu_inprocess, tmp_path: Path) -> None:
    raw = boot_image("machine_ticker", tmp_path)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    vm = emu_inprocess(*MACHINE, *ide(disk, "qcow2"))
    vm.wait_for("ticker up")
    vm.qmp("blockdev-snapshot-internal-sync", {"device": "ide0-hd0", "name": "while-running"})
    info = vm.qmp("query-block")[0]["inserted"]["image"]
    assert [s["name"] for s in info["snapshots"]] == ["while-running"]
    assert "while-running" in vm.hmp("info snapshots")
    vm.close()
    out = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    assert "while-running" in out
    chk = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr

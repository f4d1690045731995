"""The machine in-process (``emu_inprocess`` fixture): what the CLI builds, observed from inside —
every disk has a BlockBackend, ``quiesce()`` parks the vCPU with nothing in flight and the resume
path lets the guest go on; virtio-blk functions take PCI slots as on QEMU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import requires_nasm
from machine_images import MACHINE, boot_image, ide

pytestmark = [requires_nasm]


def _dots(vm) -> int:
    return vm.text().count(".")


def _wait_more_dots(vm, n: int, timeout: float = 10.0) -> None:
    start = _dots(vm)
    deadline = time.monotonic() + timeout
    while _dots(vm) < start + n:
        assert time.monotonic() < deadline, f"the guest stopped printing:\n{vm.text()}"
        time.sleep(0.02)


def test_machine_quiesce_parks_vcpu_and_drains_disks(emu_inprocess, tmp_path: Path) -> None:
    from emu.cpu.vcpu import RunState

    vm = emu_inprocess(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)))
    vm.wait_for("ticker up")
    _wait_more_dots(vm, 3)
    [disk] = vm.machine.block_devices
    assert disk.name == "ide0-hd0" and disk.backend is not None
    assert vm.hardware.ide.drives[0].blk is disk.backend          # the IDE drive is that backend
    with vm.machine.quiesce():
        assert vm.hardware.cpu.state is RunState.PAUSED
        assert disk.backend.drained and disk.backend.in_flight == 0
        before = _dots(vm)
        time.sleep(0.3)
        assert _dots(vm) == before                                # nothing runs inside
    assert not disk.backend.drained
    _wait_more_dots(vm, 3)                                        # and the guest goes on
    assert vm.hardware.cpu.state is RunState.RUNNING
    assert vm.machine.query_status()["status"] == "running"


def test_machine_pause_parks_the_vcpu_in_process(emu_inprocess, tmp_path: Path) -> None:
    from emu.cpu.vcpu import RunState

    vm = emu_inprocess(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)))
    vm.wait_for("ticker up")
    _wait_more_dots(vm, 3)
    for _ in range(3):
        vm.machine.pause()                                        # QMP stop
        assert vm.hardware.cpu.state is RunState.PAUSED and not vm.hardware.clock.running
        before = _dots(vm)
        time.sleep(0.3)
        assert _dots(vm) == before
        vm.machine.resume()                                       # QMP cont
        _wait_more_dots(vm, 2)
        assert vm.hardware.clock.running


def test_machine_system_reset_in_process(emu_inprocess, tmp_path: Path) -> None:
    vm = emu_inprocess(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)))
    vm.wait_for("ticker up")
    events = []
    vm.machine.add_event_listener(lambda name, data: events.append((name, data)))
    vm.machine.reset()
    assert events == [("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]
    deadline = time.monotonic() + 20
    while vm.text().count("ticker up") < 2:
        assert time.monotonic() < deadline, vm.text()
        time.sleep(0.02)
    assert vm.text().count("emu BIOS") == 2                       # POST ran again


def test_machine_virtio_blk_functions_from_slot_2(emu_machine, tmp_path: Path) -> None:
    # if=virtio and -device virtio-blk-pci get virtio-blk-pci functions (the explicit -device
    # first, as QEMU orders them), each on its drive's BlockBackend; the BIOS lists them
    disks = []
    for name in ("v0.img", "v1.img"):
        disks.append(tmp_path / name)
        disks[-1].write_bytes(bytes(1 << 20))
    vm = emu_machine(*MACHINE, *ide(boot_image("machine_ticker", tmp_path)),
                     "-drive", f"file={disks[0]},format=raw,if=virtio",
                     "-drive", f"file={disks[1]},format=raw,if=none,id=d1",
                     "-device", "virtio-blk-pci,drive=d1,id=vblk1", qmp=True)
    out = vm.expect("ticker up")
    assert "PCI: 00:02.0 1AF4:1001" in out and "PCI: 00:03.0 1AF4:1001" in out
    blocks = {b["device"]: b["qdev"] for b in vm.command("query-block")}
    assert blocks == {"ide0-hd0": "/machine/unattached/device[18]",
                      "virtio0": "/machine/peripheral-anon/device[1]/virtio-backend",
                      "d1": "/machine/peripheral/vblk1/virtio-backend"}
    vm.command("quit")
    assert vm.wait() == 0


def test_machine_bad_bios_is_a_clear_error(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "emu", "-machine", "pc", "-nodefaults", "-display", "none"]
    r = subprocess.run([*base, "-bios", "/nonexistent/bios.bin"], capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stderr) == (1, "qemu: could not load PC BIOS '/nonexistent/bios.bin'\n")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\xf4" * 1000)            # not a multiple of 64 KiB: QEMU refuses it too
    r = subprocess.run([*base, "-bios", str(odd)], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (1, f"emu: could not load PC BIOS '{odd}'\n")

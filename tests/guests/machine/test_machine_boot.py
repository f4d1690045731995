"""emu boots: BIOS banner on COM1, the MBR through emu's IDE, isa-debug-exit's status, guest
resets — through the command line, with the ``emu_machine`` fixture of emu's pytest plugin."""

from __future__ import annotations

from pathlib import Path

from conftest import requires_nasm
from machine_images import MACHINE, boot_image, cpu_guest, ide


def test_machine_boots_bios_mbr_and_exits_with_debug_exit_status(emu_machine, tmp_path: Path) -> None:
    vm = emu_machine(*MACHINE, *ide(cpu_guest("serial", tmp_path)))
    before = vm.expect("emu-guest cpu/serial start")
    assert "emu BIOS" in before and "RAM: 64 MiB below 4 GiB" in before
    assert "PCI: 00:01.1 8086:7010" in before                     # the PIIX3 IDE function
    assert "ata0-0: QEMU HARDDISK" in before and "Booting from hard disk 80h" in before
    assert "emu-guest mbr: loading payload" in before            # INT 13h read through IDE
    vm.expect("PASS")
    assert vm.wait() == 1                                         # isa-debug-exit (0 << 1) | 1


@requires_nasm
def test_machine_guest_resets_through_i8042(emu_machine, tmp_path: Path) -> None:
    # three boots (CMOS keeps the count across resets), then exit status (3 << 1) | 1
    vm = emu_machine(*MACHINE, *ide(boot_image("machine_kbcreset", tmp_path)))
    out = vm.expect("boot 3")
    assert "boot 1" in out and "boot 2" in out
    assert out.count("emu BIOS") == 3                             # POST ran again after each reset
    vm.console.send("x")
    assert vm.wait() == 7


@requires_nasm
def test_machine_guest_reset_events_and_no_reboot(emu_machine, tmp_path: Path) -> None:
    img = boot_image("machine_kbcreset", tmp_path)
    vm = emu_machine(*MACHINE, *ide(img), qmp=True, paused=True)
    assert vm.command("query-status")["status"] == "prelaunch"
    vm.command("cont")
    for _ in range(2):
        ev = vm.event("RESET")
        assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    vm.expect("boot 3")
    vm.console.send("x")
    assert vm.wait() == 7
    # -no-reboot: the first guest reset ends the run (status 0) with SHUTDOWN guest-reset
    vm2 = emu_machine(*MACHINE, *ide(img), "-no-reboot", qmp=True, paused=True)
    vm2.command("cont")
    vm2.expect("boot 1")
    ev = vm2.event("SHUTDOWN")
    assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    assert vm2.wait() == 0


def test_machine_serial_to_file(emu_machine, tmp_path: Path) -> None:
    log = tmp_path / "com1.log"
    vm = emu_machine(*MACHINE, *ide(cpu_guest("serial", tmp_path)), "-serial", f"file:{log}")
    assert vm.wait() == 1
    text = log.read_bytes().decode("latin-1")
    assert "emu BIOS" in text and text.rstrip().endswith("PASS")

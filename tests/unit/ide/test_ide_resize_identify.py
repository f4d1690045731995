"""IDE after ``block_resize``, side by side with qemu-system-x86_64 7.2 (qtest + QMP).

QEMU's ide_resize_cb: once the guest has had IDENTIFY data, a resize updates the sector count
and the capacity words of IDENTIFY (60-61, 100-103) without any interrupt; CHS words stay.
Before the first IDENTIFY it changes nothing at all (the count and the later IDENTIFY keep the
start-up size).  emu's resize goes through the real ``block_resize`` path
(``emu.qmp.commands.block_extra.resize_node`` on a Machine built from the same -drive)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time

import pytest
from conftest import SocketLines, requires_qemu_system
from ide_harness import (
    EmuRig,
    QtestRig,
    _halt_rom,
    bios_setup,
    make_image,
    pio_read_block,
    select_lba28,
    wait_not_busy,
)

pytestmark = requires_qemu_system

DISK, BIGGER = 8 << 20, 12 << 20
P, C = 0x1F0, 0x3F6
WORDS = (1, 3, 6, 54, 55, 56, 57, 58, 60, 61, 100, 101, 102, 103)


class QmpQtestRig(QtestRig):
    """QtestRig plus a QMP socket, for block_resize."""

    def __init__(self, image: str, sock: str) -> None:
        args = ["qemu-system-x86_64", "-machine", "pc", "-qtest", "stdio", "-qtest-log", "/dev/null",
                "-display", "none", "-nodefaults", "-m", "4", "-bios", _halt_rom(),
                "-drive", f"file={image},format=raw,if=ide,index=0,cache=writeback",
                "-qmp", f"unix:{sock},server=on,wait=off"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.irqs: list[str] = []
        self.irq14 = False
        self.q("irq_intercept_in ioapic")
        bios_setup(self)
        s = socket.socket(socket.AF_UNIX)
        for _ in range(400):
            try:
                s.connect(sock)
                break
            except OSError:
                time.sleep(0.05)
        self._qmp = SocketLines(s)
        self._qmp.readline()
        self.qmp("qmp_capabilities")

    def qmp(self, name: str, **args) -> dict:
        self._qmp.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self._qmp.flush()
        while True:
            r = json.loads(self._qmp.readline())
            if "event" not in r:
                return r

    def resize(self, size: int) -> None:
        assert self.qmp("block_resize", device="ide0-hd0", size=size) == {"return": {}}


class MachineEmuRig(EmuRig):
    """EmuRig on the BlockBackend of a Machine opened from the same -drive, resized by
    the QMP block_resize code."""

    def __init__(self, image: str) -> None:
        from emu.cli import parse_args
        from emu.machine.drives import open_drives
        from emu.machine.pc import Machine

        cfg, _ = parse_args(["-machine", "pc", "-nodefaults", "-display", "none", "-S",
                             "-drive", f"file={image},format=raw,if=ide,index=0,cache=writeback"])
        self.machine = Machine(cfg)
        open_drives(self.machine)
        [self.dev] = self.machine.block_devices
        super().__init__([], graph=self.machine.block_graph, backends=[self.dev.backend])

    def resize(self, size: int) -> None:
        from emu.qmp.commands.block_extra import resize_node
        resize_node(self.machine, self.dev.node, size)

    def close(self) -> None:
        super().close()
        self.machine.close()


def identify(io, rec, label: str) -> None:
    io.outb(P + 6, 0xA0)
    io.outb(P + 7, 0xEC)
    rec(f"{label} status", wait_not_busy(io))
    words = struct.unpack("<256H", pio_read_block(io, 512))
    rec(f"{label} words", [words[i] for i in WORDS])
    rec(f"{label} irq", io.irq())
    io.inb(P + 7)                           # acknowledge


def read_sector(io, rec, label: str, lba: int) -> None:
    select_lba28(io, lba, 1)
    io.outb(P + 7, 0x20)
    st = wait_not_busy(io)
    rec(f"{label} status", st)
    rec(f"{label} error", io.inb(P + 1))
    if st & 0x08:
        rec(f"{label} data", pio_read_block(io, 512)[:8].hex())
    io.inb(P + 7)


def sc_identify_then_resize(io, rec):
    identify(io, rec, "before")
    io.resize(BIGGER)
    rec("irq after resize", io.irq())
    rec("status after resize", io.inb(C))
    identify(io, rec, "after")
    read_sector(io, rec, "past the old end", DISK // 512 + 5)
    read_sector(io, rec, "past the new end", BIGGER // 512)


def sc_resize_before_identify(io, rec):
    io.resize(BIGGER)
    identify(io, rec, "first")
    read_sector(io, rec, "past the old end", DISK // 512 + 5)


def sc_identify_then_shrink(io, rec):
    identify(io, rec, "before")
    io.resize(DISK // 2)
    identify(io, rec, "after")
    read_sector(io, rec, "below the new end", DISK // 1024 - 1)
    read_sector(io, rec, "past the new end", DISK // 1024 + 1)


@pytest.mark.parametrize("scenario", [sc_identify_then_resize, sc_resize_before_identify,
                                      sc_identify_then_shrink],
                         ids=lambda f: f.__name__[3:])
def test_ide_identify_after_block_resize_as_qemu(tmp_path, scenario):
    records = []
    for who in ("emu", "qemu"):
        d = tmp_path / who
        d.mkdir()
        path = make_image(d, "disk", DISK, "raw")
        rig = MachineEmuRig(path) if who == "emu" else QmpQtestRig(path, str(d / "qmp.sock"))
        out: list = []
        try:
            scenario(rig, lambda label, value: out.append((label, value)))
        finally:
            rig.close()
        records.append(out)
    ours, theirs = records
    for (label, a), (_, b) in zip(ours, theirs):
        assert a == b, f"{label}: emu {a!r} != qemu {b!r}"
    assert len(ours) == len(theirs)
    if scenario is sc_identify_then_resize:     # the new size did show
        after = dict(theirs)["after words"]
        assert after[WORDS.index(60)] | after[WORDS.index(61)] << 16 == BIGGER // 512

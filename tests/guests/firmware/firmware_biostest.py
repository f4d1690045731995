"""Run firmware/tests/biostest.asm on a PC and read its report (helpers for the firmware tests).

The test guest is assembled at test time, written into a raw disk image together with a
configuration sector and "pattern" sectors, and booted with a firmware on an emulator that takes
QEMU's command line.  A :class:`Platform` is the pair (emulator command, firmware): our
``firmware/bios.bin`` or QEMU's default SeaBIOS on qemu-system-x86_64, and our BIOS on emu once
emu's machine boots (:func:`emu_can_boot` decides, once per session).
"""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO

BIOS = REPO / "firmware" / "bios.bin"
GUEST_SRC = REPO / "firmware" / "tests" / "biostest.asm"
SECTOR = 512
PROG_SECTORS = 24           #: must match PROG_SECTORS in biostest.asm
CFG_LBA = 48                #: must match CFG_LBA in biostest.asm
READ_LBA = 200              #: 8 pattern sectors read with AH=42h
WRITE_LBA = 300             #: 3 sectors the guest writes with AH=43h
CHS_WRITE_LBA = 400         #: 1 sector the guest writes with AH=03h
PATTERN_END = 1100          #: pattern sectors from 64 up to here (the read/write areas)
SPT = 63                    #: sectors per track of every geometry QEMU reports here
LBA28_LIMIT = 1 << 28
WRITE_MAGIC = 0x5752544D
#: isa-debug-exit: the guest writes 0x10 (pass) or 0x11 (fail); status = (v << 1) | 1
STATUS_PASS = (0x10 << 1) | 1
STATUS_FAIL = (0x11 << 1) | 1


_RAMP = bytes(range(256)) * 3             # byte i of a ramp starting at s: _RAMP[s + i]


def pattern(lba: int) -> bytes:
    """The sector the test writes at *lba* before boot (biostest.asm checks it):
    the LBA as a qword, then byte i = (LBA * 7 + i) & 0xFF."""
    start = (lba * 7 + 8) & 0xFF
    return struct.pack("<Q", lba) + _RAMP[start:start + SECTOR - 8]


def written(tag: int) -> bytes:
    """The sector the guest writes with tag *tag* (biostest.asm fill_written):
    the tag, "MTRW", then byte i = (tag * 13 + i * 3) & 0xFF."""
    return struct.pack("<II", tag & 0xFFFFFFFF, WRITE_MAGIC) + bytes(
        (tag * 13 + i * 3) & 0xFF for i in range(8, SECTOR))


@functools.lru_cache(maxsize=1)
def guest_binary() -> bytes:
    """Assemble biostest.asm (once per session)."""
    out = subprocess.run(["nasm", "-f", "bin", "-w+all", "-o", "/dev/stdout", str(GUEST_SRC)],
                         capture_output=True, check=True)
    assert len(out.stdout) == SECTOR * (PROG_SECTORS + 1)
    return out.stdout


@dataclass
class Disk:
    """A raw test disk: its file and the LBAs the guest is told about."""

    path: Path
    sectors: int
    boot: bool = True                  #: carries the test program and configuration
    high_lba: int = 0                  #: start of the LBA48 test area (0: none)

    def read(self, lba: int, count: int = 1) -> bytes:
        """Sectors as they are in the image file now."""
        with open(self.path, "rb") as f:
            f.seek(lba * SECTOR)
            return f.read(count * SECTOR)


def make_disk(path: Path, size: int, boot: bool = True, int10_console: bool = True,
              partition_heads: int = 0) -> Disk:
    """Create a sparse raw image of *size* bytes; a boot disk gets the program and patterns.

    :param path: image file to create.
    :param size: bytes, a multiple of 512.
    :param boot: write the test program, configuration and pattern sectors.
    :param int10_console: the guest prints through INT 10h (else straight to COM1).
    :param partition_heads: if not 0, an MBR partition entry whose end head says the disk
        was partitioned with that many heads (QEMU guesses its BIOS geometry from it).
    """
    sectors = size // SECTOR
    disk = Disk(path, sectors, boot)
    with open(path, "wb") as f:
        f.truncate(size)
        if not boot:
            return disk
        mbr = bytearray(guest_binary())
        if partition_heads:
            end = bytes([0x80, 1, 1, 0, 0x83, partition_heads - 1, 0xFF, 0xFF])
            mbr[446:462] = end + struct.pack("<II", 63, sectors - 63)
        f.write(mbr)
        ranges = [range(64, min(sectors, PATTERN_END)), range(max(64, sectors - 64), sectors)]
        # the CHS read crosses the end of cylinder 0: heads * 63 - 2 .. + 1, for any head count
        ranges += [range(h * SPT - 4, min(sectors, h * SPT + 4))
                   for h in range(PATTERN_END // SPT, 256) if h * SPT + 4 <= sectors]
        if sectors > LBA28_LIMIT + 64:
            disk.high_lba = LBA28_LIMIT - 2
            ranges.append(range(LBA28_LIMIT - 16, LBA28_LIMIT + 16))
        for r in ranges:
            f.seek(r.start * SECTOR)
            f.write(b"".join(pattern(lba) for lba in r))
        cfg = b"EMUBTCFG" + struct.pack("<QIIQIB", sectors, WRITE_LBA, CHS_WRITE_LBA,
                                        disk.high_lba, READ_LBA, 0 if int10_console else 1)
        f.seek(CFG_LBA * SECTOR)
        f.write(cfg.ljust(SECTOR, b"\0"))
    return disk


@dataclass(frozen=True)
class Platform:
    """An emulator command (QEMU's command-line syntax) and the firmware it runs."""

    name: str
    argv: tuple[str, ...]           #: emulator binary (+ fixed arguments)
    bios: Path | None               #: None: the emulator's default firmware
    qemu_extras: bool = True        #: accepts QEMU-only options such as -no-reboot
    timeout: float = 30.0
    int10_console: bool = True      #: the firmware's INT 10h teletype reaches COM1

    def command(self, drives: list[str], memory: int | str = 64,
                devices: list[str] = (), extra: list[str] = ()) -> list[str]:
        """The full command line for a run with the given ``-drive`` and ``-device`` values."""
        cmd = [*self.argv, "-machine", "pc", "-m", str(memory), "-nodefaults", "-display", "none",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2"]
        if self.bios is not None:
            cmd += ["-bios", str(self.bios)]
        if self.qemu_extras:
            cmd += ["-no-reboot"]

        for d in drives:
            cmd += ["-drive", d]
        for d in devices:
            cmd += ["-device", d]
        return cmd + list(extra)


OURS_ON_QEMU = Platform("emu-bios@qemu", ("qemu-system-x86_64",), BIOS)
#: SeaBIOS's INT 10h needs a VGA (its serial console, sercon, redraws a virtual screen with
#: escape sequences and is slow): on it the guest writes COM1 itself once it has its config.
SEABIOS_ON_QEMU = Platform("seabios@qemu", ("qemu-system-x86_64",), None, int10_console=False)
OURS_ON_EMU = Platform("emu-bios@emu", (sys.executable, "-m", "emu"), BIOS, timeout=120.0)


@dataclass
class Report:
    """What a run printed on COM1, parsed."""

    status: int | None              #: exit status, None if killed at the timeout
    output: str
    stderr: str
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lines = [ln.rstrip("\r") for ln in self.output.split("\n")]

    @property
    def passed(self) -> bool:
        return self.status == STATUS_PASS and "PASS" in self.lines and not self.failures

    @property
    def failures(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("FAIL")]

    def values(self, key: str) -> list[str]:
        """The rest of every line starting with ``key + ' '``."""
        return [ln[len(key) + 1:] for ln in self.lines if ln.startswith(key + " ")]

    def per_drive(self) -> dict[str, dict[str, str]]:
        """GEOM/TYPE/EDDP/EDD4A/EDD42/DPTE lines grouped by the DRIVE line before them."""
        drives: dict[str, dict[str, str]] = {}
        current = None
        for ln in self.lines:
            if ln.startswith("DRIVE "):
                current = drives.setdefault(ln.split()[1], {})
            elif current is not None and ln.split(" ", 1)[0] in ("GEOM", "TYPE", "EDDP", "EDD4A",
                                                                 "EDD42", "DPTE"):
                key, rest = ln.split(" ", 1)
                current[key] = rest
        return drives

    def e820(self) -> list[tuple[int, int, int]]:
        """(base, length, type) of every E820 line."""
        out = []
        for v in self.values("E820"):
            base, length, typ = v.split()
            out.append((int(base, 16), int(length, 16), int(typ, 16)))
        return out

    def pci(self) -> dict[str, dict[str, str]]:
        """PCI lines by devfn: ID, CMD, BAR0-5, ROM, INT."""
        out = {}
        for v in self.values("PCI"):
            parts = v.split()
            devfn = parts[0]
            fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            fields["BARS"] = " ".join(p for p in parts[1:] if "=" not in p)
            out[devfn] = fields
        return out


def run(platform: Platform, drives: list[str], memory: int | str = 64,
        until: str | None = None, devices: list[str] = (), extra: list[str] = ()) -> Report:
    """Boot *platform* with *drives*; wait for exit (or for the text *until*, then stop it).

    :param platform: emulator + firmware.
    :param drives: ``-drive`` option values.
    :param memory: RAM in MiB (or with QEMU's suffix, "5G").
    :param devices: ``-device`` option values.
    :param extra: more options, as given.
    :param until: for runs that never exit (the BIOS halts): stop once this text appeared.
    """
    cmd = platform.command(drives, memory, devices, extra)
    if until is None:
        try:
            # No key is ever typed: stdin is an empty pipe closed at once, not /dev/null, whose
            # emptiness is the host's (a /dev/null replaced by a regular file that collected
            # shell output fed its text to COM1, and the guest saw a typed key).
            p = subprocess.run(cmd, input=b"", capture_output=True, timeout=platform.timeout)
            return Report(p.returncode, p.stdout.decode("latin-1"), p.stderr.decode("latin-1"))
        except subprocess.TimeoutExpired as e:
            return Report(None, (e.stdout or b"").decode("latin-1"),
                          (e.stderr or b"").decode("latin-1"))
    import pexpect
    child = pexpect.spawn(cmd[0], cmd[1:], timeout=platform.timeout, encoding="latin-1")
    try:
        child.expect_exact(until)
        output = child.before + until
        status = None if child.isalive() else child.exitstatus
    except (pexpect.TIMEOUT, pexpect.EOF):
        output = child.before or ""
        status = None if child.isalive() else child.exitstatus
    finally:
        alive_after = child.isalive()
        child.terminate(force=True)
    rep = Report(status, output.replace("\r\n", "\n"), "")
    rep.alive_after_message = alive_after  # type: ignore[attr-defined]
    return rep


@functools.lru_cache(maxsize=1)
def emu_can_boot() -> str | None:
    """None if emu boots our BIOS into a trivial boot sector, else the reason it cannot (yet)."""
    if shutil.which("nasm") is None:
        return "nasm is not installed"
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.asm"
        src.write_text("bits 16\norg 0x7c00\nmov dx, 0x501\nmov al, 0x10\nout dx, al\n"
                       "cli\nhlt\ntimes 510-($-$$) db 0\ndw 0xAA55\n")
        img = Path(tmp) / "probe.img"
        subprocess.run(["nasm", "-f", "bin", "-o", str(img), str(src)], check=True)
        with open(img, "r+b") as f:
            f.truncate(1 << 20)
        probe = Platform(OURS_ON_EMU.name, OURS_ON_EMU.argv, BIOS, qemu_extras=False, timeout=10)
        rep = run(probe, [f"file={img},format=raw,if=ide"])
        if rep.status == STATUS_PASS:
            return None
        tail = (rep.stderr.strip().splitlines() or ["no output"])[-1]
        return f"emu cannot boot a BIOS yet (probe exit {rep.status}: {tail[:120]})"


def hexfields(text: str) -> dict[str, int]:
    """``"a=0001 b=FF"`` -> ``{"a": 1, "b": 255}``."""
    return {k: int(v, 16) for k, v in re.findall(r"(\w+)=([0-9A-Fa-f]+)", text)}

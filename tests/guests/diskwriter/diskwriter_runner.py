"""Boot the diskwriter guest (guest-images/diskwriter) on an emulator with two qcow2 disks.

The emulator is a parameter (:data:`EMULATORS`): the same session runs on qemu-system-x86_64
with SeaBIOS (the reference), on QEMU with our BIOS (``-bios firmware/bios.bin``), and on emu.
emu's runs are skipped while ``python -m emu -version`` fails; they count like QEMU's since emu
passed every scenario 20 times in a row (:data:`EMU_CONFORMANT`); set it False (or
``EMU_DISKWRITER_INFORMATIVE=1``) to make them ``xfail(strict=False)`` again.

A :class:`Session` drives the guest through its serial console with pexpect (FORMAT.md
"Serial protocol") and keeps the whole COM1 output for :func:`emu.oracle.records.parse_log`.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, requires_qemu_img, requires_qemu_system
from emu.oracle.records import Params, SerialLog, parse_log

GUEST_DIR = REPO / "guest-images" / "diskwriter"
IMAGE = GUEST_DIR / "diskwriter.img"
OUR_BIOS = REPO / "firmware" / "bios.bin"
#: isa-debug-exit: value v -> exit status (v << 1) | 1.
STATUS_QUIT = 1
STATUS_FATAL = 7
MiB = 1 << 20
#: emu's runs must pass (not xfail): true since emu's IDE and virtio-blk ran every scenario here.
EMU_CONFORMANT = True


@dataclass(frozen=True)
class Emulator:
    """An emulator binary that takes QEMU's command line."""

    name: str
    argv: tuple[str, ...]
    boot_timeout: float      #: seconds until the guest's ``S running``


QEMU = Emulator("qemu", ("qemu-system-x86_64", "-accel", "tcg"), 30.0)
QEMU_OUR_BIOS = Emulator("qemu-ourbios", ("qemu-system-x86_64", "-accel", "tcg", "-bios", str(OUR_BIOS)), 30.0)
EMU = Emulator("emu", (sys.executable, "-m", "emu"), 60.0)
EMULATORS = [pytest.param(QEMU, marks=[requires_qemu_system, requires_qemu_img], id="qemu"),
             pytest.param(QEMU_OUR_BIOS, marks=[requires_qemu_system, requires_qemu_img], id="qemu-ourbios"),
             pytest.param(EMU, marks=requires_qemu_img, id="emu")]


def prepare(emulator: Emulator, request: pytest.FixtureRequest) -> None:
    """Skip or mark the test for ``emulator`` (see the module docstring)."""
    strict = EMU_CONFORMANT and os.environ.get("EMU_DISKWRITER_INFORMATIVE") != "1"
    if emulator is QEMU_OUR_BIOS and not OUR_BIOS.is_file():
        pytest.skip("firmware/bios.bin is not built")
    if emulator is not EMU:
        return
    try:
        version = subprocess.run([*EMU.argv, "-version"], capture_output=True, timeout=30, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.skip("`python -m emu -version` did not finish in 30 s")
    if version.returncode != 0:
        pytest.skip(f"emu has no machine yet (`python -m emu -version` exited {version.returncode})")
    if not strict:
        request.applymarker(pytest.mark.xfail(
            strict=False, reason="emu's diskwriter runs are informative (EMU_DISKWRITER_INFORMATIVE=1)"))


def make_disks(workdir: Path, params: Params, ide_size: int = 16 * MiB, vd_size: int = 16 * MiB,
               ) -> tuple[Path, Path, bytes]:
    """The boot disk (the guest image with ``params`` patched in, as qcow2) and an empty
    virtio disk; returns their paths and the boot image's bytes as written.

    :param workdir: where the images go.
    :param params: the guest's parameter block.
    :param ide_size: virtual size of the IDE disk.
    :param vd_size: virtual size of the virtio disk.
    """
    boot = bytearray(IMAGE.read_bytes())
    blob = params.pack()
    boot[0x180:0x180 + len(blob)] = blob
    raw = workdir / "boot.raw"
    raw.write_bytes(bytes(boot))
    ide, vd = workdir / "ide.qcow2", workdir / "vd.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(ide)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(ide), str(ide_size)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vd), str(vd_size)], check=True)
    return ide, vd, bytes(boot)


def to_raw(image: Path) -> bytes:
    """The guest-visible contents of a qcow2 image (via qemu-img convert)."""
    raw = image.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    return raw.read_bytes()


@dataclass
class Session:
    """One boot of the guest, driven through COM1."""

    emulator: Emulator
    child: object                       #: the pexpect.spawn
    transcript: io.StringIO = field(default_factory=io.StringIO)  #: every byte read, once

    @classmethod
    def start(cls, emulator: Emulator, ide: Path, vd: Path | None, modern_only: bool = False,
              vd_blkdebug: Path | None = None) -> "Session":
        """Boot and wait for the guest's ``S running`` or ``S paused``.

        :param modern_only: attach ``vd`` as ``virtio-blk-pci,disable-legacy=on`` (1AF4:1042)
            instead of ``-drive if=virtio`` (transitional 1AF4:1001).
        :param vd_blkdebug: a blkdebug configuration file to put under ``vd``'s qcow2 layer
            (QEMU's ``blkdebug:CONFIG:FILE`` syntax), e.g. to inject errors.
        """
        import pexpect
        drives = ["-drive", f"file={ide},format=qcow2,if=ide"]
        if vd is not None and modern_only:
            drives += ["-drive", f"file={vd},format=qcow2,if=none,id=vd0",
                       "-device", "virtio-blk-pci,drive=vd0,disable-legacy=on"]
        elif vd is not None:
            path = f"blkdebug:{vd_blkdebug}:{vd}" if vd_blkdebug else str(vd)
            drives += ["-drive", f"file={path},format=qcow2,if=virtio"]
        cmd = [*emulator.argv, "-machine", "pc", "-m", "64", "-nodefaults", "-display", "none",
               "-serial", "stdio", *drives, "-device", "isa-debug-exit,iobase=0x501,iosize=2"]
        # stderr to a file: on a pty it would interleave with COM1 (emu reports I/O errors there).
        stderr = ide.parent / f"stderr-{emulator.name}.txt"
        child = pexpect.spawn("/bin/sh", ["-c", f'exec "$@" 2>"{stderr}"', "sh", *cmd], encoding="latin-1",
                              timeout=emulator.boot_timeout, cwd=str(ide.parent))
        session = cls(emulator, child)
        child.logfile_read = session.transcript
        session.expect(r"S (running|paused)\r*\n", emulator.boot_timeout)
        return session

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait for ``pattern`` (a regex) on COM1; returns the match. Fails with the log so far."""
        import pexpect
        try:
            self.child.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as err:
            pytest.fail(f"{self.emulator.name}: no {pattern!r} on COM1 ({type(err).__name__})\n"
                        f"--- COM1 (tail) ---\n{self.text[-3000:]}")
        return self.child.match.group(0)

    def command(self, line: str) -> None:
        """Send one command line."""
        self.child.send(line + "\r")

    def run_for(self, seconds: float) -> None:
        """Let the guest run, collecting its output."""
        import pexpect
        self.child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=seconds)

    def wait_count(self, pattern: str, count: int, timeout: float = 30.0) -> None:
        """Wait until ``pattern`` (a regex, searched per line) has matched ``count`` lines of COM1
        output since the start; fails with the log when it does not in ``timeout`` seconds."""
        regex = re.compile(pattern, re.M)
        end = time.monotonic() + timeout
        while len(regex.findall(self.text)) < count:
            if time.monotonic() > end or not self.child.isalive():
                pytest.fail(f"{self.emulator.name}: fewer than {count} lines {pattern!r} on COM1\n"
                            f"--- COM1 (tail) ---\n{self.text[-3000:]}")
            self.run_for(0.1)

    def quit(self, timeout: float = 30.0) -> int:
        """Send ``q``, wait for the end of the run; returns the exit status."""
        import pexpect
        self.command("q")
        self.expect(r"S quit seq=\d+\r*\n", timeout)
        try:
            self.child.expect(pexpect.EOF, timeout=timeout)
        except pexpect.TIMEOUT:
            self.child.terminate(force=True)
            pytest.fail(f"{self.emulator.name} did not exit after 'S quit'")
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        """Kill the emulator if it still runs."""
        if self.child.isalive():
            self.child.terminate(force=True)

    @property
    def text(self) -> str:
        """COM1 output so far."""
        return self.transcript.getvalue()

    def log(self) -> SerialLog:
        """The output parsed by :func:`emu.oracle.records.parse_log` (strict)."""
        return parse_log(self.text)

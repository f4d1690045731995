"""The write cache QEMU reports for a virtio-blk drive follows what the firmware negotiated.

Before the guest runs, ``query-block`` says ``cache.writeback: true`` (QEMU's default); once a
BIOS has driven the device without VIRTIO_BLK_F_FLUSH (SeaBIOS never takes it, nor does ours)
QEMU turns the cache off at DRIVER_OK and says ``false`` (qmp-golden 06 seq 67).  The same run
on emu and on qemu-system-x86_64, both with our BIOS, must give the same answers: modern,
legacy-only and IDE drives (the IDE drive keeps its cache).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import requires_nasm, requires_qemu_system
from firmware_biostest import BIOS, emu_can_boot

pytestmark = [requires_nasm]

EMULATORS = [
    pytest.param(("qemu-system-x86_64",), marks=requires_qemu_system, id="qemu"),
    pytest.param((sys.executable, "-m", "emu"), id="emu"),
]


class Qmp:
    def __init__(self, path: Path, proc: subprocess.Popen) -> None:
        for _ in range(2400):
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.s.connect(str(path))
                break
            except OSError:
                self.s.close()
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.025)
        self.s.settimeout(60)
        self.f = self.s.makefile("rb")
        assert "QMP" in json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str) -> object:
        self.s.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                return msg["return"]

    def writeback(self) -> dict[str, bool]:
        return {d["device"]: d["inserted"]["cache"]["writeback"] for d in self.cmd("query-block")}


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = path.read_text(errors="replace") if path.exists() else ""
        if text in out:
            return out
        assert proc.poll() is None, out
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} on the serial port:\n{out}")


@pytest.mark.parametrize("emulator", EMULATORS)
def test_firmware_virtio_write_cache_follows_negotiation(emulator, tmp_path):
    if emulator[0] != "qemu-system-x86_64":
        reason = emu_can_boot()
        if reason:
            pytest.skip(reason)
    images = {}
    for name in ("ide", "modern", "legacy"):
        images[name] = tmp_path / f"{name}.img"
        with open(images[name], "wb") as f:
            f.truncate(8 << 20)           # blank: nothing boots, the BIOS halts after POST
    sock, serial = tmp_path / "qmp.sock", tmp_path / "serial.txt"
    argv = [*emulator, "-machine", "pc", "-m", "64", "-nodefaults", "-display", "none", "-S",
            "-bios", str(BIOS), "-qmp", f"unix:{sock},server=on,wait=off",
            "-serial", f"file:{serial}",
            "-drive", f"file={images['ide']},format=raw,if=ide",
            "-drive", f"file={images['modern']},format=raw,if=virtio",
            "-drive", f"file={images['legacy']},format=raw,if=none,id=leg",
            "-device", "virtio-blk-pci,drive=leg,id=vleg,disable-modern=on"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        q = Qmp(sock, proc)
        before = q.writeback()
        q.cmd("cont")
        out = _wait_for(serial, "No bootable disk", proc)
        after = q.writeback()
        q.cmd("quit")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert before == {"ide0-hd0": True, "virtio0": True, "leg": True}
    assert after == {"ide0-hd0": True, "virtio0": False, "leg": False}, out
    # (QEMU plugs -device functions before those of -drive if=virtio)
    assert "virtio-blk 00:02.0 (legacy): 8 MiB" in out and "virtio-blk 00:03.0: 8 MiB" in out

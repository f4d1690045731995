"""The guest-visible registers of virtio-blk-pci, compared with qemu-system-x86_64 7.2.

QEMU runs under ``-qtest`` (no guest: port and memory accesses from the test), with
``vectors=0`` because emu has no MSI-X; the same accesses are then made on emu's
function and every answer must be equal.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import requires_qemu_img, requires_qemu_system
from emu.block.qcow2.create import create_qcow2
from virtio_driver import Machine

IO_BASE = 0xC000
MEM_BASE = 0xFE000000
SLOT_ADDR = 0x80001000  # 00:02.0, the first free slot with -nodefaults


def _script() -> list[tuple[str, int, int, int]]:
    """The accesses: (space, address, size, value or -1 for a read)."""
    ops: list[tuple[str, int, int, int]] = []
    for off in range(0, 256, 4):
        ops.append(("cfg", off, 4, -1))
    for bar in range(6):  # sizing as firmware does
        off = 0x10 + 4 * bar
        ops += [("cfg", off, 4, 0xFFFFFFFF), ("cfg", off, 4, -1), ("cfg", off, 4, 0)]
    ops += [("cfg", 0x10, 4, IO_BASE), ("cfg", 0x20, 4, MEM_BASE), ("cfg", 0x24, 4, 0), ("cfg", 0x04, 2, 7)]
    for off in range(0, 256, 4):
        ops.append(("cfg", off, 4, -1))
    for off in (0, 4, 8, 12, 14, 16, 18, 19):  # legacy registers
        ops.append(("io", IO_BASE + off, 4 if off in (0, 4, 8) else (2 if off < 18 else 1), -1))
    for off in range(20, 0x80):
        ops.append(("io", IO_BASE + off, 1, -1))
    ops += [("io", IO_BASE + 14, 2, 1), ("io", IO_BASE + 12, 2, -1), ("io", IO_BASE + 14, 2, 0)]
    for sel in (0, 1, 2):
        ops += [("mem", MEM_BASE, 4, sel), ("mem", MEM_BASE + 4, 4, -1)]
    for off, size in ((0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1), (0x16, 2), (0x18, 2), (0x1A, 2), (0x1C, 2),
                      (0x1E, 2), (0x20, 4), (0x28, 4), (0x30, 4)):
        ops.append(("mem", MEM_BASE + off, size, -1))
    ops += [("mem", MEM_BASE + 0x16, 2, 1), ("mem", MEM_BASE + 0x18, 2, -1), ("mem", MEM_BASE + 0x16, 2, 0)]
    ops += [("mem", MEM_BASE + 0x10, 2, 0), ("mem", MEM_BASE + 0x10, 2, -1)]  # no MSI-X: NO_VECTOR
    for off in range(0, 0x40):
        ops.append(("mem", MEM_BASE + 0x2000 + off, 1, -1))
    ops += [("mem", MEM_BASE + 0x1000, 1, -1)]
    # status handshake up to FEATURES_OK, read back
    for v in (1, 3, 0xB):
        ops += [("mem", MEM_BASE + 0x14, 1, v), ("mem", MEM_BASE + 0x14, 1, -1)]
    ops += [("mem", MEM_BASE + 0x14, 1, 0), ("mem", MEM_BASE + 0x14, 1, -1)]
    return ops


def _run_qemu(image: str, props: str, ops) -> list[int]:
    args = ["qemu-system-x86_64", "-machine", "pc", "-qtest", "stdio", "-display", "none", "-nodefaults", "-S",
            "-drive", f"file={image},format=qcow2,if=none,id=d0", "-device", f"virtio-blk-pci,drive=d0,vectors=0{props}"]
    lines = []
    for space, addr, size, value in ops:
        w = {1: "b", 2: "w", 4: "l"}[size]
        if space == "cfg":
            lines.append(f"outl 0xcf8 {SLOT_ADDR | (addr & ~3):#x}")
            port = 0xCFC + (addr & 3)
            lines.append(f"in{w} {port:#x}" if value < 0 else f"out{w} {port:#x} {value:#x}")
        elif space == "io":
            lines.append(f"in{w} {addr:#x}" if value < 0 else f"out{w} {addr:#x} {value:#x}")
        else:
            lines.append(f"read{w} {addr:#x}" if value < 0 else f"write{w} {addr:#x} {value:#x}")
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    values = []
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("\n".join(lines) + "\n")
        p.stdin.flush()
        answered = 0
        while answered < len(lines):  # qtest answers every command with one line
            line = p.stdout.readline()
            if not line:
                break
            if line.startswith(("OK", "FAIL", "ERR")):
                answered += 1
                if line.startswith("OK "):
                    values.append(int(line.split()[1], 16))
    finally:
        p.kill()
        p.wait(timeout=10)
    return values


def _run_emu(image: str, props: dict, ops) -> list[int]:
    m = Machine(image, assign=False, **props)
    try:
        host, io, mmio = m.pci, m.board.iobus, m.board.mmiobus
        out = []
        for space, addr, size, value in ops:
            if space == "cfg":
                if value < 0:
                    out.append(host.config_read(0x10, addr, size))
                else:
                    host.config_write(0x10, addr, size, value)
            elif space == "io":
                if value < 0:
                    out.append(io.port_read(addr, size))
                else:
                    io.port_write(addr, size, value)
            else:
                if value < 0:
                    out.append(mmio.read(addr, size))
                else:
                    mmio.write(addr, size, value)
        return out
    finally:
        m.close()


@requires_qemu_system
@pytest.mark.parametrize("qemu_props,emu_props", [
    ("", {}),
    (",disable-legacy=on", {"disable_legacy": True}),
    (",disable-modern=on", {"disable_modern": True}),
], ids=["transitional", "modern-only", "legacy-only"])
def test_registers_match_qemu(tmp_path, qemu_props, emu_props):
    image = str(tmp_path / "d.qcow2")
    create_qcow2(image, 40 << 20)
    ops = _script()
    if emu_props.get("disable_modern"):
        # no BAR4: unassigned memory reads 0 on QEMU and all ones on emu's bus (not this device)
        ops = [op for op in ops if op[0] != "mem"]
    if emu_props.get("disable_legacy"):
        ops = [op for op in ops if op[0] != "io"]  # the same for unclaimed ports
    reads = [op for op in ops if op[3] < 0]
    theirs = _run_qemu(image, qemu_props, ops)
    assert len(theirs) == len(reads), "qemu-system-x86_64 -qtest did not answer every access"
    ours = _run_emu(image, emu_props, ops)
    diffs = [f"{space} 0x{addr:x}/{size}: qemu 0x{q:x} emu 0x{e:x}"
             for (space, addr, size, _), q, e in zip(reads, theirs, ours) if q != e]
    assert not diffs, "\n".join(diffs)


BAD_PROPS = ["disable-modern=x", "disable-legacy=x", "disable-legacy=on,disable-modern=on", "queue-size=100",
             "queue-size=2", "queue-size=2048", "queue-size=abc", "num-queues=0", "vectors=x", "config-wce=maybe",
             "bogus=1"]


@requires_qemu_system
def test_property_errors_match_qemu(tmp_path):
    from emu.errors import ConfigError
    from emu.hw.virtio import virtio_blk_pci_options

    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    for spec in BAD_PROPS:
        props = dict(kv.split("=", 1) for kv in spec.split(","))
        with pytest.raises(ConfigError) as err:
            virtio_blk_pci_options({"drive": "d0", **props})
        r = subprocess.run(["qemu-system-x86_64", "-machine", "pc", "-nodefaults", "-display", "none", "-S",
                            "-qtest", "null", "-drive", f"file={image},format=raw,if=none,id=d0",
                            "-device", f"virtio-blk-pci,drive=d0,{spec}"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert r.stderr == f"qemu-system-x86_64: -device virtio-blk-pci,drive=d0,{spec}: {err.value}\n"
    assert virtio_blk_pci_options({"drive": "d0", "disable-legacy": "auto", "serial": "x"})["serial"] == "x"


# ---- the same requests on QEMU and emu ----------------------------------------------------------

def _seg(sector: int, n: int, flags: int) -> bytes:
    return sector.to_bytes(8, "little") + n.to_bytes(4, "little") + flags.to_bytes(4, "little")


DISK = 16 << 20
#: (type, sector, out data, in_len)
REQUESTS = [
    (1, 8, b"\x5A" * 4096, 0), (0, 8, b"", 4096), (0, 7, b"", 512), (4, 0, b"", 0),
    (8, 0, b"", 20), (8, 0, b"", 4), (8, 0, b"", 40), (0, DISK // 512, b"", 512),
    (1, DISK // 512 - 1, b"x" * 1024, 0), (1, 0, b"x" * 100, 0), (0x20, 0, b"", 512),
    (11, 0, _seg(200, 8, 0), 0), (11, 0, _seg(200, 8, 1), 0), (13, 0, _seg(0, 1, 2), 0),
    (13, 0, _seg(0, 1, 0) * 2, 0), (13, 0, _seg(DISK // 512, 1, 0), 0), (13, 0, _seg(9, 4, 1), 0),
    (0, 8, b"", 4096), (2, 0, b"", 64), (5, 0, b"", 0), (9, 0, b"", 20), (0, 0, b"", 0),
    (0x80000000, 8, b"", 512), (13, 0, _seg(12, 0x400000, 0), 0),
]


class _QtestLegacyDriver:
    """The legacy-interface request path of virtio_driver.Driver, over QEMU's qtest protocol."""

    def __init__(self, image: str) -> None:
        args = ["qemu-system-x86_64", "-machine", "pc", "-m", "16", "-qtest", "stdio", "-display", "none",
                "-nodefaults", "-S", "-drive", f"file={image},format=qcow2,if=none,id=d0",
                "-device", "virtio-blk-pci,drive=d0,vectors=0,serial=SN-virtio-0123456789abcdef"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

    def q(self, cmd: str) -> int | None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            assert line, "qemu-system-x86_64 went away"
            if line.startswith(("OK", "FAIL", "ERR")):
                parts = line.split()
                return int(parts[1], 16) if len(parts) > 1 else None

    def write(self, addr: int, data: bytes) -> None:
        self.q(f"write {addr:#x} {len(data)} 0x{data.hex()}")

    def read(self, addr: int, n: int) -> bytes:
        value = self.q(f"read {addr:#x} {n}")
        return (value or 0).to_bytes(n, "big")  # qtest prints the bytes in memory order

    def setup(self) -> None:
        from virtio_driver import RING
        q = self.q
        for off, v in ((0x10, IO_BASE), (0x04, 5)):
            q(f"outl 0xcf8 {SLOT_ADDR | off:#x}")
            q(f"outl 0xcfc {v:#x}")
        b = IO_BASE
        for v in (0, 1, 3):
            q(f"outb {b + 18:#x} {v}")
        feats = q(f"inl {b:#x}") & ~(1 << 30)
        q(f"outl {b + 4:#x} {feats:#x}")
        q(f"outw {b + 14:#x} 0")
        self.size = q(f"inw {b + 12:#x}")
        self.desc, self.avail = RING, RING + 16 * self.size
        self.used = (self.avail + 6 + 2 * self.size + 4095) & ~4095
        self.write(RING, bytes(0x3000))
        q(f"outl {b + 8:#x} {RING >> 12:#x}")
        q(f"outb {b + 18:#x} 7")
        self.avail_idx = 0

    def request(self, rtype: int, sector: int, out: bytes, in_len: int) -> tuple[int, bytes, int]:
        from virtio_driver import DATA, HDR, STATUS
        import struct as st
        self.write(HDR, st.pack("<IIQ", rtype, 0, sector))
        self.write(STATUS, b"\xff")
        bufs = [(HDR, 16, 0)]
        if out:
            self.write(DATA, out)
            bufs.append((DATA, len(out), 0))
        if in_len:
            self.write(DATA, b"\xAA" * in_len)
            bufs.append((DATA, in_len, 2))
        bufs.append((STATUS, 1, 2))
        for i, (a, n, f) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.write(self.desc + 16 * i, st.pack("<QIHH", a, n, f | (0 if last else 1), i + 1))
        self.write(self.avail + 4 + 2 * (self.avail_idx % self.size), b"\0\0")
        self.avail_idx += 1
        self.write(self.avail + 2, st.pack("<H", self.avail_idx))
        self.q(f"outw {IO_BASE + 16:#x} 0")
        deadline = time.monotonic() + 10       # a bound, not a count: a loaded host is slow
        while st.unpack("<H", self.read(self.used + 2, 2))[0] != self.avail_idx:
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not complete the request")
        slot = self.used + 4 + 8 * ((self.avail_idx - 1) % self.size)
        _, used_len = st.unpack("<II", self.read(slot, 8))
        return self.read(STATUS, 1)[0], self.read(DATA, in_len) if in_len else b"", used_len

    def close(self) -> None:
        self.p.kill()
        self.p.wait(timeout=10)


@requires_qemu_system
@requires_qemu_img
def test_requests_match_qemu(tmp_path):
    """Status byte, used length and data of every request type and guest error, legacy interface."""
    from virtio_driver import Driver

    theirs_img, ours_img = str(tmp_path / "q.qcow2"), str(tmp_path / "e.qcow2")
    create_qcow2(theirs_img, DISK)
    create_qcow2(ours_img, DISK)
    qd = _QtestLegacyDriver(theirs_img)
    try:
        qd.setup()
        theirs = [qd.request(*r) for r in REQUESTS]
    finally:
        qd.close()
    m = Machine(ours_img, serial="SN-virtio-0123456789abcdef")
    try:
        d = Driver(m, False)
        ours = [d.request(t, sector=s, out=o, in_len=n) for t, s, o, n in REQUESTS]
    finally:
        m.close()
    diffs = [f"request {i} {REQUESTS[i][0]:#x}: qemu (status {q[0]}, len {q[2]}, data {q[1][:24].hex()}) "
             f"emu (status {e[0]}, len {e[2]}, data {e[1][:24].hex()})"
             for i, (q, e) in enumerate(zip(theirs, ours)) if q != e]
    assert not diffs, "\n".join(diffs)
    # and the two images hold the same data
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", theirs_img, ours_img],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

"""The guest-visible registers of virtio-blk-pci, compared with qemu-system-x86_64 7.2.

QEMU runs under ``-qtest`` (no guest: port and memory accesses from the test), with
``vectors=0`` because emu has no MSI-X; the same accesses are then made on emu's
function and every answer must be equal.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import requires_qemu_system
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

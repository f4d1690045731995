"""PIIX3 IDE on the real board and real images: PIO, DMA, faults, host errors, decode, drain.

The guest side is port I/O through the board's IOBus in the order Linux ata_piix / SeaBIOS
issue it; the storage is emu's own block layer over qcow2 and raw files in tmp_path; guest
RAM is a bytearray the bus master reads and writes.
"""

from __future__ import annotations

import errno
import subprocess
import threading
import time

import pytest
from conftest import requires_qemu_io
from ide_harness import (
    BMIBA,
    EmuRig,
    cfg_read,
    cfg_write,
    make_image,
    pio_read_block,
    pio_write_block,
    select_lba28,
    select_lba48,
    sector_pattern,
    start_dma,
    wait_bm_done,
    wait_not_busy,
    write_prd,
)

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.errors import ConfigError
from emu.hw.ide import IdeDrive
from emu.hw.ide.ata import guess_geometry

P, C = 0x1F0, 0x3F6
MiB = 1 << 20
#: IDENTIFY DEVICE of a 64 MiB ide-hd as qemu-system-x86_64 7.2 returned it (non-zero words).
QEMU_IDENTIFY_64M = {
    0: 0x40, 1: 0x82, 3: 0x10, 4: 0x7E00, 5: 0x200, 6: 0x3F, 10: 0x514D, 11: 0x3030, 12: 0x3030,
    13: 0x3120, 14: 0x2020, 15: 0x2020, 16: 0x2020, 17: 0x2020, 18: 0x2020, 19: 0x2020, 20: 0x3,
    21: 0x200, 22: 0x4, 23: 0x322E, 24: 0x352B, 25: 0x2020, 26: 0x2020, 27: 0x5145, 28: 0x4D55,
    29: 0x2048, 30: 0x4152, 31: 0x4444, 32: 0x4953, 33: 0x4B20, **{i: 0x2020 for i in range(34, 47)},
    47: 0x8010, 48: 0x1, 49: 0xB00, 51: 0x200, 52: 0x200, 53: 0x7, 54: 0x82, 55: 0x10, 56: 0x3F,
    57: 0xFFE0, 58: 0x1, 59: 0x110, 61: 0x2, 62: 0x7, 63: 0x7, 64: 0x3, 65: 0x78, 66: 0x78,
    67: 0x78, 68: 0x78, 69: 0x4000, 80: 0xF0, 81: 0x16, 82: 0x4021, 83: 0x7400, 84: 0x4000,
    85: 0x4021, 86: 0x3400, 87: 0x4000, 88: 0x203F, 93: 0x6001, 101: 0x2, 106: 0x6000, 169: 0x1,
}


def identify(io, unit=0, base=P):
    io.outb(base + 6, 0xA0 | unit << 4)
    io.outb(base + 7, 0xEC)
    assert wait_not_busy(io, base) == 0x58
    raw = pio_read_block(io, 512, base)
    return [int.from_bytes(raw[2 * i : 2 * i + 2], "little") for i in range(256)]


def qemu_io_read(path, fmt, offset, length):
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -v {offset} {length}", path],
                         capture_output=True, text=True, check=True).stdout
    data = bytearray()
    for line in out.splitlines():
        head, sep, rest = line.partition(":  ")
        if sep and all(c in "0123456789abcdef" for c in head):
            data += bytes.fromhex("".join(rest[:48].split()))
    return bytes(data)


@pytest.fixture
def rig_factory(tmp_path):
    rigs = []

    def make(specs, **kw):
        r = EmuRig(specs, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def test_ide_identify_words_match_qemu_and_serials(tmp_path, rig_factory):
    a = make_image(tmp_path, "a", 64 * MiB, "qcow2", fill=False)
    b = make_image(tmp_path, "b", 200 << 30, "qcow2", fill=False)  # sparse, > 2^28 sectors
    r = rig_factory([(a, "qcow2"), None, None, (b, "qcow2")])
    words = identify(r)
    assert {i: w for i, w in enumerate(words) if w} == QEMU_IDENTIFY_64M
    big = identify(r, unit=1, base=0x170)
    nb = (200 << 30) // 512
    assert big[60:62] == [0xFFFF, 0x0FFF]  # LBA28 capacity saturates at 2^28 - 1
    assert big[100:104] == [nb & 0xFFFF, (nb >> 16) & 0xFFFF, nb >> 32, 0]
    assert big[1] == 16383 and big[3] == 16 and big[6] == 63
    serial = bytes(b for w in big[10:20] for b in (w >> 8, w & 0xFF)).decode().strip()
    assert serial == "QM00002"  # QEMU numbers the disks in creation order


def test_ide_geometry_from_partition_table():
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    entry = 0x1BE
    mbr[entry + 5] = 15  # end head -> 16 heads
    mbr[entry + 6] = 32  # end sector -> 32 sectors
    mbr[entry + 12 : entry + 16] = (1000).to_bytes(4, "little")
    g = guess_geometry(131072, bytes(mbr))
    assert (g.cylinders, g.heads, g.sectors, g.cmos_translation) == (256, 16, 32, 0)
    mbr[entry + 5] = 254  # 255 heads: LBA-translated disk, standard physical geometry
    g = guess_geometry(131072, bytes(mbr))
    assert (g.cylinders, g.heads, g.sectors) == (130, 16, 63) and g.cmos_translation == 2  # LARGE
    g = guess_geometry(4 << 21, None)  # 4 GiB without a partition table: LBA
    assert (g.cylinders, g.heads, g.sectors, g.cmos_translation) == (8322, 16, 63, 1)


@requires_qemu_io
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_ide_pio_lba28_lba48_and_multiple_land_in_image(tmp_path, rig_factory, fmt):
    size = (200 << 30) if fmt == "qcow2" else 16 * MiB
    path = make_image(tmp_path, "d", size, fmt)
    r = rig_factory([(path, fmt)])
    # READ SECTORS of 3 (LBA28), 16-bit accesses
    select_lba28(r, 7, 3)
    r.outb(P + 7, 0x20)
    for lba in (7, 8, 9):
        assert wait_not_busy(r) == 0x58
        assert pio_read_block(r, 512) == sector_pattern(lba)
    assert r.inb(P + 7) == 0x50 and r.inb(P + 3) == 10
    # WRITE MULTIPLE of 6 sectors in blocks of 4 with 32-bit accesses
    r.outb(P + 2, 4)
    r.outb(P + 7, 0xC6)
    select_lba28(r, 40, 6)
    r.outb(P + 7, 0xC5)
    for first, blk in ((40, 4), (44, 2)):
        assert wait_not_busy(r) == 0x58
        pio_write_block(r, b"".join(sector_pattern(first + i, 0x77) for i in range(blk)), width=4)
    assert wait_not_busy(r) == 0x50
    # READ MULTIPLE EXT back
    select_lba48(r, 40, 6)
    r.outb(P + 7, 0x29)
    got = b""
    for blk in (4, 2):
        wait_not_busy(r)
        got += pio_read_block(r, 512 * blk, width=4)
    assert got == b"".join(sector_pattern(40 + i, 0x77) for i in range(6))
    hi = 0x1000_0005 if fmt == "qcow2" else (16 * MiB // 512) - 1
    select_lba48(r, hi, 1)
    r.outb(P + 7, 0x34)  # WRITE SECTORS EXT
    pio_write_block(r, sector_pattern(hi, 0x48))
    assert wait_not_busy(r) == 0x50
    r.outb(P + 7, 0xEA)  # FLUSH CACHE EXT
    assert wait_not_busy(r) == 0x50
    r.close()
    assert qemu_io_read(path, fmt, 40 * 512, 6 * 512) == b"".join(sector_pattern(40 + i, 0x77) for i in range(6))
    assert qemu_io_read(path, fmt, 39 * 512, 512) == sector_pattern(39)  # neighbours untouched
    assert qemu_io_read(path, fmt, 46 * 512, 512) == sector_pattern(46)
    assert qemu_io_read(path, fmt, hi * 512, 512) == sector_pattern(hi, 0x48)


def test_ide_dma_multi_prd_irq_and_invalidation(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 16 * MiB, "qcow2")
    r = rig_factory([(path, "qcow2")])
    r.board.pic.irq_line(14)
    table = 0x1000
    regions = [(0x10000, 1024), (0x23000, 512), (0x30000, 0), (0x50000, 512)]  # 0 = 64 KiB
    write_prd(r, table, regions)
    n = (1024 + 512 + 65536 + 512) // 512
    select_lba28(r, 3, n)
    r.outb(P + 7, 0xC8)
    assert r.inb(C) == 0x58 and not r.irq_level()
    start_dma(r, table, to_memory=True)
    assert wait_bm_done(r) == 0x04 | 0x00  # INT, no longer active
    assert r.irq_level() and r.board.pic.irr() & (1 << 14)
    assert r.inb(P + 7) == 0x50 and not r.irq_level()  # reading status acknowledges
    lba = 3
    for addr, length in regions:
        length = length or 0x10000
        for off in range(0, length, 512):
            assert r.memread(addr + off, 512) == sector_pattern(lba), (addr, off)
            lba += 1
    assert sorted(r.invalidated) == sorted((a, ln or 0x10000) for a, ln in regions)
    # DMA write from two regions, engine started before the command (Linux's order is the other)
    r.memwrite(0x60000, sector_pattern(500, 0x44) * 1 + sector_pattern(501, 0x44))
    r.memwrite(0x70000, sector_pattern(502, 0x44))
    write_prd(r, table, [(0x60000, 1024), (0x70000, 512)])
    start_dma(r, table, to_memory=False)
    select_lba48(r, 500, 3)
    r.outb(P + 7, 0x35)
    assert wait_bm_done(r) == 0x04
    assert r.backends[0].read(500 * 512, 1536) == b"".join(sector_pattern(500 + i, 0x44) for i in range(3))
    assert r.backends[0].read(499 * 512, 512) == bytes(512)  # neighbours untouched
    assert r.backends[0].read(503 * 512, 512) == bytes(512)


@pytest.mark.parametrize("case", ["table_outside_ram", "region_outside_ram", "prd_too_short"])
def test_ide_bad_prd_is_guest_error_and_nothing_written(tmp_path, rig_factory, case):
    path = make_image(tmp_path, "d", 4 * MiB, "raw")
    r = rig_factory([(path, "raw")], ram_size=1 * MiB)
    table = 0x1000
    if case == "table_outside_ram":
        table = 0x2000000
    elif case == "region_outside_ram":
        write_prd(r, table, [(0x1000, 512), (0xFFF00, 512)])  # second one crosses the end of RAM
    else:
        write_prd(r, table, [(0x8000, 512)])  # the command moves 2 sectors
    r.memwrite(0x1000, b"\xAB" * 1024)
    select_lba28(r, 9, 2)
    r.outb(P + 7, 0xCA)  # WRITE DMA
    start_dma(r, table, to_memory=False)
    bm = wait_bm_done(r)
    assert bm & 0x02 and bm & 0x04 and not bm & 0x01  # error, interrupt, inactive
    assert r.inb(C) == 0x41 and r.inb(P + 1) == 0x04  # DRDY|ERR, ABRT
    assert r.irq_level()
    assert r.backends[0].in_flight == 0
    assert r.backends[0].read(9 * 512, 1024) == sector_pattern(9) + sector_pattern(10)
    r.outb(BMIBA + 2, 0x06)  # W1C
    assert r.inb(BMIBA + 2) == 0
    # the controller still works afterwards
    select_lba28(r, 9, 1)
    r.outb(P + 7, 0x20)
    wait_not_busy(r)
    assert pio_read_block(r, 512) == sector_pattern(9)


def test_ide_lba_past_end_aborts_and_writes_nothing(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "qcow2")
    r = rig_factory([(path, "qcow2")])
    last = MiB // 512 - 1
    before = r.backends[0].read((last - 1) * 512, 1024)
    # PIO checks each block as it goes (QEMU does too), so PIO starts past the end; DMA
    # checks the whole request before moving anything, so it straddles the end.
    for cmd, dma in ((0x30, False), (0xCA, True), (0x20, False), (0xC8, True), (0xC5, False)):
        if dma:
            select_lba28(r, last - 1, 3)
        else:
            select_lba28(r, last + 1, 1)
        r.outb(P + 7, cmd)
        if dma:
            write_prd(r, 0x1000, [(0x8000, 1536)])
            start_dma(r, 0x1000, to_memory=cmd == 0xC8)
            assert wait_bm_done(r) & 0x04
            r.outb(BMIBA, 0)
        elif cmd in (0x30, 0xC5):
            pio_write_block(r, b"\x66" * 512)
        st = wait_not_busy(r)
        assert st == 0x41 and r.inb(P + 1) == 0x04, hex(cmd)
    assert r.backends[0].read((last - 1) * 512, 1024) == before


def test_ide_host_io_errors_reported_machine_keeps_running(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "raw")
    g = BlockGraph()
    node = g.blockdev_add({"driver": "raw", "node-name": "disk", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": path},
        "inject-error": [{"event": "read_aio", "errno": errno.EIO, "once": True, "sector": 4},
                         {"event": "write_aio", "errno": errno.ENOSPC, "once": True, "sector": 5}]}})
    blk = BlockBackend(node, "ide0-hd0")
    r = rig_factory([], graph=g, backends=[blk])
    select_lba28(r, 4, 1)
    r.outb(P + 7, 0x20)
    assert wait_not_busy(r) == 0x41 and r.inb(P + 1) == 0x04 and r.irq_level()
    select_lba28(r, 4, 1)
    r.outb(P + 7, 0x20)  # once: the retry works
    assert wait_not_busy(r) == 0x58
    assert pio_read_block(r, 512) == sector_pattern(4)
    write_prd(r, 0x1000, [(0x8000, 512)])
    select_lba28(r, 5, 1)
    r.outb(P + 7, 0xCA)
    start_dma(r, 0x1000, to_memory=False)
    assert wait_bm_done(r) & 0x04
    assert r.inb(P + 7) == 0x41 and r.inb(P + 1) == 0x04


def test_ide_drain_completes_dma_in_flight(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "qcow2")
    g = BlockGraph()
    node = g.blockdev_add({"driver": "qcow2", "node-name": "disk", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": path}}})
    dbg = node.file.impl
    blk = BlockBackend(node, "ide0-hd0")
    r = rig_factory([], graph=g, backends=[blk])
    dbg.break_on("write_aio", "hold")
    r.memwrite(0x8000, sector_pattern(20, 0x5A) * 1 + sector_pattern(21, 0x5A))
    write_prd(r, 0x1000, [(0x8000, 1024)])
    select_lba28(r, 20, 2)
    r.outb(P + 7, 0xCA)
    start_dma(r, 0x1000, to_memory=False)
    assert dbg.wait_break("hold")
    assert blk.in_flight == 1 and r.inb(BMIBA + 2) == 0x01 and r.inb(C) == 0x58
    drained = threading.Event()
    t = threading.Thread(target=lambda: (blk.drain(10), drained.set()))
    t.start()
    time.sleep(0.05)
    assert not drained.is_set()  # drain waits for the guest's request
    dbg.resume("hold")
    t.join(10)
    assert drained.is_set() and blk.in_flight == 0
    # the completion reached the guest before drain returned
    assert r.inb(BMIBA + 2) == 0x04 and r.inb(C) == 0x50 and r.irq_level()
    # while drained, a new guest request is held (BSY) and runs at resume
    select_lba28(r, 20, 1)
    r.outb(P + 7, 0x20)
    time.sleep(0.05)
    assert r.inb(C) & 0x80
    blk.resume()
    assert wait_not_busy(r) == 0x58
    assert pio_read_block(r, 512) == sector_pattern(20, 0x5A)


def test_ide_srst_during_dma_drops_the_completion(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "qcow2")
    g = BlockGraph()
    node = g.blockdev_add({"driver": "qcow2", "node-name": "disk", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": path}}})
    dbg = node.file.impl
    blk = BlockBackend(node, "ide0-hd0")
    r = rig_factory([], graph=g, backends=[blk])
    dbg.break_on("read_aio", "hold")
    write_prd(r, 0x1000, [(0x8000, 512)])
    select_lba28(r, 2, 1)
    r.outb(P + 7, 0xC8)
    start_dma(r, 0x1000, to_memory=True)
    assert dbg.wait_break("hold")
    r.outb(C, 0x0E)  # SRST
    r.outb(C, 0x0A)
    assert wait_not_busy(r) == 0x50 and r.inb(P + 1) == 0x01
    dbg.resume("hold")
    blk.drain(10)
    blk.resume()
    assert r.memread(0x8000, 512) == bytes(512)  # the cancelled read never reached RAM
    assert r.inb(BMIBA + 2) & 0x01 == 0


def test_ide_decode_enable_and_bar4(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "raw")
    r = rig_factory([(path, "raw")])
    assert r.inb(P + 7) == 0x50
    cfg_write(r, 0x40, 2, 0x0000)  # primary IDE decode off
    assert r.inb(P + 7) == 0xFF and r.inb(C) == 0xFF and r.inw(P) == 0xFFFF
    assert r.inb(0x376) == 0x00  # the secondary still decodes (no disks: 0)
    cfg_write(r, 0x40, 2, 0x8000)
    assert r.inb(P + 7) == 0x50
    cfg_write(r, 0x04, 2, 0x0004)  # I/O space off: legacy and BAR4 gone
    assert r.inb(P + 7) == 0xFF and r.inb(BMIBA + 2) == 0xFF
    cfg_write(r, 0x20, 4, 0xD000)
    cfg_write(r, 0x04, 2, 0x0005)
    assert cfg_read(r, 0x20) == 0xD001 and r.inb(0xD002) == 0 and r.inb(BMIBA + 2) == 0xFF
    r.ide.reset()  # machine reset: command register 0 again, nothing decodes
    assert r.inb(P + 7) == 0xFF and cfg_read(r, 0x04) == 0x02800000 and cfg_read(r, 0x20) == 1


def test_ide_cdrom_refused():
    with pytest.raises(ConfigError, match="ide-cd"):
        IdeDrive(None, media="cdrom")


def test_ide_pio_data_path_cost(tmp_path, rig_factory):
    """The per-word data path stays short: 64 KiB of PIO reads well under a second."""
    path = make_image(tmp_path, "d", 1 * MiB, "raw")
    r = rig_factory([(path, "raw")])
    r.outb(P + 2, 16)
    r.outb(P + 7, 0xC6)
    select_lba28(r, 0, 128)
    r.outb(P + 7, 0xC4)
    read = r.bus.port_read
    t0 = time.perf_counter()
    for _ in range(8):
        wait_not_busy(r)
        for _ in range(4096):
            read(P, 2)
    dt = time.perf_counter() - t0
    assert r.inb(P + 7) == 0x50
    assert dt < 1.0, f"{dt / 32768 * 1e6:.2f} us per word"


def test_ide_dma_needs_bus_master_enable(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "raw")
    r = rig_factory([(path, "raw")])
    cfg_write(r, 0x04, 2, 0x0001)  # I/O on, bus master off
    write_prd(r, 0x1000, [(0x8000, 512)])
    select_lba28(r, 3, 1)
    r.outb(P + 7, 0xC8)
    start_dma(r, 0x1000, to_memory=True)
    assert wait_bm_done(r) == 0x06 and r.inb(P + 7) == 0x41
    assert r.memread(0x8000, 512) == bytes(512)


def test_ide_read_only_backend_refused(tmp_path):
    path = make_image(tmp_path, "d", 1 * MiB, "raw", fill=False)
    g = BlockGraph()
    blk = BlockBackend(g.open_image(path, "raw", read_only=True), "ro")
    with pytest.raises(ConfigError, match="Block node is read-only"):
        IdeDrive(blk)
    g.close_all()


def test_ide_trim_with_discard_unmap(tmp_path, rig_factory):
    path = make_image(tmp_path, "d", 1 * MiB, "qcow2")
    r = rig_factory([(path, "qcow2")], discard=[True])
    blk = r.backends[0]
    r.memwrite(0x20000, (128 | 128 << 48).to_bytes(8, "little").ljust(512, b"\0"))
    write_prd(r, 0x1000, [(0x20000, 512)])
    r.outb(P + 6, 0x40)
    r.outb(P + 1, 1)
    r.outb(P + 2, 1)
    r.outb(P + 7, 0x06)
    start_dma(r, 0x1000, to_memory=False)
    assert wait_bm_done(r) == 0x04 and r.inb(P + 7) == 0x50
    assert blk.read(128 * 512, 128 * 512) == bytes(128 * 512)  # the range reads as zeroes
    assert blk.read(127 * 512, 512) == sector_pattern(127)


def test_ide_dma_memory_follows_the_pc_memory_map():
    from emu.cpu.vcpu import VCPU
    from emu.hw.clock import VirtualClock
    from emu.hw.ide import DmaMemory
    from emu.hw.pc.board import PcBoard

    board = PcBoard(VirtualClock(manual=True))
    cpu = VCPU(16 << 20, board.iobus.port_read, board.iobus.port_write, board.pic)
    mem = DmaMemory(cpu.ram, None, cpu.dma_view)
    assert mem.write(0x9FE00, b"\x11" * 512) and mem.read(0x9FE00, 512) == b"\x11" * 512
    assert not mem.write(0x9FF00, b"\x22" * 512)  # runs into the VGA window: not RAM
    assert mem.read(0xA0000, 16) is None and not mem.valid(0xBFFF0, 32)
    assert mem.write(0xC0000, b"\x33" * 16) and bytes(cpu.ram[0xC0000:0xC0010]) == b"\x33" * 16
    assert not mem.valid((16 << 20) - 8, 16) and mem.read(0xFFFFF000, 8) is None


@pytest.mark.parametrize("method", ["pio", "dma"])
def test_ide_polling_guest_gets_idle_path_requests_from_the_workers(tmp_path, rig_factory, monkeypatch,
                                                                    method):
    """With the machine's idle path on and a grace no guest would wait out, a guest that polls
    status instead of halting still gets its request: its first status read hands it over."""
    from emu.block import api

    monkeypatch.setattr(api, "IDLE_GRACE", 3600.0)
    api.idle_hook()
    path = make_image(tmp_path, "d", 4 * MiB, "qcow2")
    r = rig_factory([(path, "qcow2")])
    assert r.backends[0].idle_safe()
    if method == "pio":
        select_lba28(r, 7, 1)
        r.outb(P + 7, 0x20)
        assert wait_not_busy(r, timeout=60) & 0x08       # DRQ: the sector is there
        assert pio_read_block(r, 512) == sector_pattern(7)
    else:
        write_prd(r, 0x1000, [(0x20000, 1024)])
        select_lba28(r, 9, 2)
        r.outb(P + 7, 0xC8)
        start_dma(r, 0x1000, to_memory=True)
        assert wait_bm_done(r, timeout=60) == 0x04
        assert r.memread(0x20000, 1024) == sector_pattern(9) + sector_pattern(10)
    assert r.inb(P + 7) & 0x01 == 0 and r.backends[0].in_flight == 0

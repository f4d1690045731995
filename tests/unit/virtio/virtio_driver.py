"""A virtio-blk driver as Linux's virtio_pci + virtio_blk would drive the device, for tests.

It talks to the device only through the board's buses (PCI configuration mechanism #1,
the legacy I/O BAR, the modern memory BAR) and a bytearray guest RAM, and watches the
interrupt line the way the guest sees it (PCI status bit 3 and the 8259's IRR).
"""

from __future__ import annotations

import struct
import time

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.pci.setup import assign_resources
from emu.hw.virtio import GuestMemory, attach_virtio_blk

RAM_SIZE = 8 << 20
SLOT = 2
DEVFN = SLOT << 3

# ring area and scratch buffers in guest RAM
RING = 0x100000
INDIRECT = 0x180000
HDR = 0x200000
DATA = 0x210000
STATUS = 0x300000

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
NEEDS_RESET = 0x40
EVENT_IDX = 29
INDIRECT_DESC = 28
VERSION_1 = 32


class Machine:
    """PcBoard + RAM + one virtio-blk-pci at 00:02.0, resources assigned as SeaBIOS would."""

    def __init__(self, image: str, fmt: str = "qcow2", assign: bool = True, **props) -> None:
        self.graph = BlockGraph()
        self.blk = BlockBackend(self.graph.open_image(image, fmt), "virtio0")
        self.ram = bytearray(RAM_SIZE)
        self.invalidated: list[tuple[int, int]] = []
        self.board = PcBoard(VirtualClock(manual=True), serial_ports=0)
        mem = GuestMemory(self.ram, lambda a, n: self.invalidated.append((a, n)))
        self.fn = attach_virtio_blk(self.board, mem, self.blk, SLOT, **props)
        if assign:
            assign_resources(self.board.pci)
        self.pci = self.board.pci

    def cfg(self, off: int, size: int = 4) -> int:
        return self.pci.config_read(DEVFN, off, size)

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.pci.config_write(DEVFN, off, size, value)

    def config_space(self) -> bytes:
        return b"".join(self.cfg(o).to_bytes(4, "little") for o in range(0, 256, 4))

    def bar(self, i: int) -> int:
        lo = self.cfg(0x10 + 4 * i)
        if lo & 1:
            return lo & ~3
        addr = lo & ~0xF
        if lo & 4:
            addr |= self.cfg(0x14 + 4 * i) << 32
        return addr

    def irq_pending(self) -> bool:
        """The guest's view: the 8259 input the BIOS routed this function to."""
        line = self.cfg(0x3C, 1)
        return bool(self.board.pic.irr() >> line & 1)

    def close(self) -> None:
        self.blk.close()
        self.graph.close_all()


class Driver:
    """Linux's probe/setup sequence and a request queue, legacy or modern.

    :param m: the machine.
    :param modern: use the modern interface (capabilities) rather than the legacy BAR0.
    :param features: bits to accept (masked with what the device offers).
    """

    def __init__(self, m: Machine, modern: bool, features: int | None = None, qsize: int | None = None) -> None:
        self.m = m
        self.modern = modern
        self.ram = m.ram
        self.io = m.board.iobus
        self.mmio = m.board.mmiobus
        if modern:
            self.caps = self._find_caps()
        else:
            self.base = m.bar(0)
        self.features_wanted = features
        self.qsize_wanted = qsize
        self.setup()

    # ---- register access -------------------------------------------------------------
    def _find_caps(self) -> dict[int, tuple[int, int, int]]:
        caps = {}
        ptr = self.m.cfg(0x34, 1)
        while ptr:
            if self.m.cfg(ptr, 1) == 0x09:
                cfg_type, bar = self.m.cfg(ptr + 3, 1), self.m.cfg(ptr + 4, 1)
                off, length = self.m.cfg(ptr + 8), self.m.cfg(ptr + 12)
                caps.setdefault(cfg_type, (self.m.bar(bar) + off if cfg_type != 5 else 0, length, ptr))
            ptr = self.m.cfg(ptr + 1, 1)
        return caps

    def common_r(self, off: int, size: int) -> int:
        return self.mmio.read(self.caps[1][0] + off, size)

    def common_w(self, off: int, size: int, v: int) -> None:
        self.mmio.write(self.caps[1][0] + off, size, v)

    def status(self) -> int:
        if self.modern:
            return self.common_r(0x14, 1)
        return self.io.port_read(self.base + 18, 1)

    def set_status(self, v: int) -> None:
        if self.modern:
            self.common_w(0x14, 1, v)
        else:
            self.io.port_write(self.base + 18, 1, v)

    def read_isr(self) -> int:
        if self.modern:
            return self.mmio.read(self.caps[3][0], 1)
        return self.io.port_read(self.base + 19, 1)

    def config(self, off: int, size: int) -> int:
        if self.modern:
            return self.mmio.read(self.caps[4][0] + off, size)
        return self.io.port_read(self.base + 20 + off, size)

    def device_features(self) -> int:
        if self.modern:
            f = 0
            for sel in (0, 1):
                self.common_w(0, 4, sel)
                f |= self.common_r(4, 4) << (32 * sel)
            return f
        return self.io.port_read(self.base, 4)

    def notify(self, q: int = 0) -> None:
        if self.modern:
            ptr = self.caps[2][2]
            mult = self.m.cfg(ptr + 16)
            self.common_w(0x16, 2, q)
            noff = self.common_r(0x1E, 2)
            self.mmio.write(self.caps[2][0] + noff * mult, 2, q)
        else:
            self.io.port_write(self.base + 16, 2, q)

    # ---- set-up --------------------------------------------------------------------
    def setup(self) -> None:
        self.m.cfg_write(0x04, 2, self.m.cfg(0x04, 2) | 4)  # pci_set_master
        self.set_status(0)
        self.set_status(1)
        self.set_status(1 | 2)
        self.offered = self.device_features()
        # like Linux, never ack VIRTIO_F_BAD_FEATURE (bit 30)
        want = (self.offered if self.features_wanted is None else self.features_wanted & self.offered) & ~(1 << 30)
        self.accepted = want
        if self.modern:
            for sel in (0, 1):
                self.common_w(0x08, 4, sel)
                self.common_w(0x0C, 4, (want >> (32 * sel)) & 0xFFFFFFFF)
            self.set_status(1 | 2 | 8)
            assert self.status() & 8, "FEATURES_OK did not stick"
            self.common_w(0x16, 2, 0)
            self.size = self.common_r(0x18, 2)
            if self.qsize_wanted:
                self.size = self.qsize_wanted
                self.common_w(0x18, 2, self.size)
            self.desc, self.avail = RING, RING + 16 * self.size
            self.used = (self.avail + 6 + 2 * self.size + 3) & ~3
            for off, v in ((0x20, self.desc), (0x28, self.avail), (0x30, self.used)):
                self.common_w(off, 4, v & 0xFFFFFFFF)
                self.common_w(off + 4, 4, v >> 32)
            self.common_w(0x1C, 2, 1)
        else:
            self.io.port_write(self.base + 4, 4, want & 0xFFFFFFFF)
            self.io.port_write(self.base + 14, 2, 0)
            self.size = self.io.port_read(self.base + 12, 2)
            self.desc, self.avail = RING, RING + 16 * self.size
            self.used = (self.avail + 6 + 2 * self.size + 4095) & ~4095
            self.io.port_write(self.base + 8, 4, RING >> 12)
        self.ram[RING : RING + 0x10000] = bytes(0x10000)
        self.set_status(1 | 2 | 4 | (8 if self.modern else 0))
        self.avail_idx = 0
        self.last_used = 0
        self.next_desc = 0

    # ---- rings ---------------------------------------------------------------------
    def u16(self, addr: int) -> int:
        return struct.unpack_from("<H", self.ram, addr)[0]

    def put_u16(self, addr: int, v: int) -> None:
        struct.pack_into("<H", self.ram, addr, v & 0xFFFF)

    def used_idx(self) -> int:
        return self.u16(self.used + 2)

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.ram, table + 16 * i, addr, length, flags, nxt)

    def add_chain(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Put a chain of ``(addr, len, writable)`` in the descriptor table and the avail ring."""
        head = self.next_desc
        if indirect:
            for j, (a, n, w) in enumerate(bufs):
                last = j == len(bufs) - 1
                self.write_desc(INDIRECT, j, a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT), j + 1)
            self.write_desc(self.desc, head, INDIRECT, 16 * len(bufs), F_INDIRECT, 0)
            self.next_desc = (head + 1) % self.size
        else:
            for j, (a, n, w) in enumerate(bufs):
                i = (head + j) % self.size
                last = j == len(bufs) - 1
                self.write_desc(self.desc, i, a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                                (i + 1) % self.size)
            self.next_desc = (head + len(bufs)) % self.size
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put_u16(self.avail + 2, self.avail_idx)

    def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait until ``count`` more used entries appear; returns their (id, len)."""
        end = time.monotonic() + timeout
        while (self.used_idx() - self.last_used) & 0xFFFF < count:
            if time.monotonic() > end:
                raise TimeoutError(f"used idx stuck at {self.used_idx()} (want {self.last_used}+{count})")
            time.sleep(0.001)
        out = []
        for _ in range(count):
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack_from("<II", self.ram, slot))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # ---- virtio-blk requests ---------------------------------------------------------------
    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                indirect: bool = False, wait: bool = True, split: int = 0) -> tuple[int, bytes, int]:
        """One request; returns (status, data read, used len).  ``split``: data in chunks."""
        struct.pack_into("<IIQ", self.ram, HDR, rtype, 0, sector)
        self.ram[STATUS] = 0xFF
        bufs: list[tuple[int, int, bool]] = [(HDR, 16, False)]
        if out:
            self.ram[DATA : DATA + len(out)] = out
            bufs += self._chunks(DATA, len(out), False, split)
        if in_len:
            self.ram[DATA : DATA + in_len] = b"\xAA" * in_len
            bufs += self._chunks(DATA, in_len, True, split)
        bufs.append((STATUS, 1, True))
        self.add_chain(bufs, indirect)
        self.notify()
        if not wait:
            return -1, b"", 0
        (_, used_len), = self.wait_used()
        return self.ram[STATUS], bytes(self.ram[DATA : DATA + in_len]), used_len

    @staticmethod
    def _chunks(addr: int, n: int, w: bool, split: int) -> list[tuple[int, int, bool]]:
        if not split:
            return [(addr, n, w)]
        return [(addr + o, min(split, n - o), w) for o in range(0, n, split)]

    def ack_interrupt(self) -> int:
        return self.read_isr()

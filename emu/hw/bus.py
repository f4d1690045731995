"""Port I/O and MMIO dispatch.

Every device that answers I/O ports is registered on the one :class:`IOBus`
(``bus.register_ports(base, size, device)``, grep that to find them all).  A device
implements::

    io_read(offset: int, size: int) -> int
    io_write(offset: int, size: int, value: int) -> None

where ``offset`` is relative to the registered ``base`` (as QEMU's MemoryRegionOps
and Firecracker's BusDevice do), so a device behind a relocatable PCI BAR never
needs to know where the guest put it.  ``size`` is 1, 2 or 4.  A device that sets
``io_max_size = 1`` gets wide accesses as byte accesses at offsets +0, +1, ... of itself
(little-endian), also past its last port, as QEMU's memory core splits them
(``access_with_adjusted_size``): ``inw`` from a one-port device reads that port twice.
Unaligned accesses are cut at the offset's alignment first (see ``IOBus._pieces``).

The dispatch path is one list index and one call: the vCPU's IN/OUT hook costs
~0.5 µs already (shared/research/unicorn-lab Q2), so no dict lookups or loops.

Ports nobody claims read as all ones (0xFF/0xFFFF/0xFFFFFFFF) and swallow writes,
as on a PC's ISA bus.  Overlapping registrations raise :class:`BusError`.

:class:`MMIOBus` does the same for physical address ranges (PCI memory BARs); the
vCPU maps the ranges with Unicorn's ``mmio_map`` and forwards to :meth:`MMIOBus.read`
/ :meth:`MMIOBus.write`; listeners hear about ranges coming and going.

:class:`Reg` / :class:`RegisterBank` let a device describe its registers as a
table instead of an if/elif chain (v86 style).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from emu.errors import EmuError

#: All-ones value for an unmapped read, by access size.
ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
PORT_SPACE = 0x10000


class BusError(EmuError):
    """A bus registration that cannot be honoured (overlap, out of range, unknown device)."""


class IODevice(Protocol):
    """What the buses call."""

    def io_read(self, offset: int, size: int) -> int: ...

    def io_write(self, offset: int, size: int, value: int) -> None: ...


def _unmapped_read(offset: int, size: int) -> int:
    return ALL_ONES.get(size, 0xFFFFFFFF)


def _unmapped_write(offset: int, size: int, value: int) -> None:
    return None


class IOBus:
    """The 64 K x86 I/O port space.

    Each port holds ``(read, write, base, max_size)``; the tuple is replaced
    atomically, so the vCPU thread may dispatch while another thread (re)maps a BAR.
    """

    def __init__(self) -> None:
        self._unmapped = (_unmapped_read, _unmapped_write, 0, 4)
        self._table: list[tuple[Callable[..., int], Callable[..., None], int, int]] = [self._unmapped] * PORT_SPACE
        self._owner: list[Any] = [None] * PORT_SPACE
        self._names: list[str | None] = [None] * PORT_SPACE
        self._regions: dict[int, tuple[int, int, Any]] = {}  # base -> (base, size, device)
        self._lock = threading.Lock()

    def register_ports(self, base: int, size: int, device: IODevice, name: str | None = None) -> None:
        """Claim ports ``[base, base + size)`` for ``device``.

        :param base: first port.
        :param size: number of ports (>= 1).
        :param device: object with ``io_read``/``io_write`` (offsets relative to ``base``).
        :param name: label for error messages (defaults to the device's class name).
        :raises BusError: if a port is out of range or already claimed.
        """
        label = name or getattr(device, "name", None) or type(device).__name__
        if size < 1 or base < 0 or base + size > PORT_SPACE:
            raise BusError(f"I/O range 0x{base:x}+{size} for {label} is outside the port space")
        with self._lock:
            for port in range(base, base + size):
                owner = self._owner[port]
                if owner is not None:
                    other = self._names[port]
                    raise BusError(f"I/O port 0x{port:x} of {label} is already used by {other}")
            entry = (device.io_read, device.io_write, base, getattr(device, "io_max_size", 4))
            for port in range(base, base + size):
                self._table[port] = entry
                self._owner[port] = device
                self._names[port] = label
            self._regions[base] = (base, size, device)

    def unregister(self, base: int) -> None:
        """Release the region registered at ``base``.

        :raises BusError: if no region starts at ``base``.
        """
        with self._lock:
            region = self._regions.pop(base, None)
            if region is None:
                raise BusError(f"no I/O region is registered at 0x{base:x}")
            _, size, _ = region
            for port in range(base, base + size):
                self._table[port] = self._unmapped
                self._owner[port] = None
                self._names[port] = None

    def owner(self, port: int) -> Any:
        """The device answering ``port``, or None."""
        return self._owner[port & 0xFFFF]

    def regions(self) -> list[tuple[int, int, Any]]:
        """All registered ``(base, size, device)``, sorted by base."""
        with self._lock:
            return sorted(self._regions.values(), key=lambda r: r[0])

    def port_read(self, port: int, size: int) -> int:
        """Dispatch an ``IN`` of ``size`` bytes (the vCPU's callback)."""
        read, _, base, max_size = self._table[port & 0xFFFF]
        off = port - base
        if size <= max_size and not off & (size - 1):
            return read(off, size)
        return self._split_read(port, size)

    def port_write(self, port: int, size: int, value: int) -> None:
        """Dispatch an ``OUT`` of ``size`` bytes (the vCPU's callback)."""
        _, write, base, max_size = self._table[port & 0xFFFF]
        off = port - base
        if size <= max_size and not off & (size - 1):
            write(off, size, value)
        else:
            self._split_write(port, size, value)

    # Wider or unaligned accesses, as QEMU's memory core cuts them (flatview_read_continue,
    # memory_access_size, access_with_adjusted_size): a piece goes to the device the port
    # belongs to, as wide as the rest of the access, at most 4 bytes and at most the
    # alignment of the offset in that device's region (but not bounded by the region's end);
    # a device taking narrower accesses (``io_max_size``) gets the piece as accesses of its
    # width at offsets +0, +1, ...  So ``inl`` from the one-port 0x61 reads it four times,
    # ``inl`` from 0x42 (offset 2 of the PIT) reads PIT offsets 2 and 3 and then 0x44-0x45.
    def _pieces(self, port: int, size: int):
        done = 0
        while done < size:
            p = (port + done) & 0xFFFF
            read, write, base, max_size = self._table[p]
            off = p - base
            n = size - done
            align = off & -off
            if align and align < n:
                n = align
            n = 1 << (n.bit_length() - 1)
            yield done, n, off, read, write, max_size
            done += n

    def _split_read(self, port: int, size: int) -> int:
        value = 0
        for done, n, off, read, _write, max_size in self._pieces(port, size):
            if n <= max_size:
                piece = read(off, n) & ((1 << (8 * n)) - 1)
            else:
                piece = 0
                for i in range(0, n, max_size):
                    piece |= (read(off + i, max_size) & ((1 << (8 * max_size)) - 1)) << (8 * i)
            value |= piece << (8 * done)
        return value

    def _split_write(self, port: int, size: int, value: int) -> None:
        for done, n, off, _read, write, max_size in self._pieces(port, size):
            piece = (value >> (8 * done)) & ((1 << (8 * n)) - 1)
            if n <= max_size:
                write(off, n, piece)
            else:
                for i in range(0, n, max_size):
                    write(off + i, max_size, (piece >> (8 * i)) & ((1 << (8 * max_size)) - 1))


MapListener = Callable[[int, int], None]


class MMIOBus:
    """Physical address ranges answered by devices (PCI memory BARs).

    :meth:`add_listener` lets the vCPU map/unmap each range in Unicorn as it comes and goes.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Any]] = []  # sorted by start: (start, size, device)
        self._listeners: list[tuple[MapListener | None, MapListener | None]] = []
        self._lock = threading.Lock()

    def add_listener(self, on_map: MapListener | None, on_unmap: MapListener | None) -> None:
        """Be told ``on_map(base, size)`` / ``on_unmap(base, size)``; existing ranges are replayed."""
        with self._lock:
            self._listeners.append((on_map, on_unmap))
            existing = list(self._ranges)
        if on_map is not None:
            for start, size, _ in existing:
                on_map(start, size)

    def register(self, base: int, size: int, device: IODevice, name: str | None = None) -> None:
        """Claim ``[base, base + size)``.

        :raises BusError: on overlap or a bad range.
        """
        label = name or getattr(device, "name", None) or type(device).__name__
        if size < 1 or base < 0 or base + size > 1 << 64:
            raise BusError(f"MMIO range 0x{base:x}+0x{size:x} for {label} is invalid")
        with self._lock:
            i = bisect.bisect_right(self._starts, base)
            if i > 0:
                pstart, psize, pdev = self._ranges[i - 1]
                if pstart + psize > base:
                    raise BusError(f"MMIO range 0x{base:x}+0x{size:x} of {label} overlaps 0x{pstart:x}+0x{psize:x}")
            if i < len(self._ranges) and self._ranges[i][0] < base + size:
                nstart, nsize, _ = self._ranges[i]
                raise BusError(f"MMIO range 0x{base:x}+0x{size:x} of {label} overlaps 0x{nstart:x}+0x{nsize:x}")
            self._starts.insert(i, base)
            self._ranges.insert(i, (base, size, device))
            listeners = list(self._listeners)
        for on_map, _ in listeners:
            if on_map is not None:
                on_map(base, size)

    def unregister(self, base: int) -> None:
        """Release the range starting at ``base``.

        :raises BusError: if none starts there.
        """
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i >= len(self._starts) or self._starts[i] != base:
                raise BusError(f"no MMIO range is registered at 0x{base:x}")
            _, size, _ = self._ranges[i]
            del self._starts[i]
            del self._ranges[i]
            listeners = list(self._listeners)
        for _, on_unmap in listeners:
            if on_unmap is not None:
                on_unmap(base, size)

    def find(self, addr: int) -> tuple[int, int, Any] | None:
        """The ``(start, size, device)`` containing ``addr``, or None."""
        ranges = self._ranges
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r[0] + r[1]:
                return r
        return None

    def regions(self) -> list[tuple[int, int, Any]]:
        """All ranges, sorted by start."""
        with self._lock:
            return list(self._ranges)

    def read(self, addr: int, size: int) -> int:
        """Read ``size`` bytes at physical ``addr``; all ones where nothing is mapped."""
        r = self.find(addr)
        if r is None:
            return ALL_ONES.get(size, 0xFFFFFFFF)
        return r[2].io_read(addr - r[0], size)

    def write(self, addr: int, size: int, value: int) -> None:
        """Write ``size`` bytes at physical ``addr``; ignored where nothing is mapped."""
        r = self.find(addr)
        if r is not None:
            r[2].io_write(addr - r[0], size, value)


# ---- declarative register tables ---------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    """One device register.

    :param offset: offset from the device's base.
    :param size: access width in bytes the register answers to.
    :param name: the spec's name (for docs and debugging).
    :param read: ``() -> int``; None makes the register read as the bank's default.
    :param write: ``(value) -> None``; None means writes are ignored.
    """

    offset: int
    size: int
    name: str
    read: Callable[[], int] | None = None
    write: Callable[[int], None] | None = None


class RegisterBank:
    """An ``io_read``/``io_write`` pair built from a list of :class:`Reg`.

    An access that does not hit a register at exactly its offset and size reads
    ``default_read`` (all ones unless given) and is ignored on write.

    :param regs: the register table.
    :param default_read: value for accesses no register claims (None: all ones).
    """

    def __init__(self, regs: list[Reg], default_read: int | None = None) -> None:
        self.regs = {(r.offset, r.size): r for r in regs}
        self.default_read = default_read

    def io_read(self, offset: int, size: int) -> int:
        reg = self.regs.get((offset, size))
        if reg is None or reg.read is None:
            return ALL_ONES[size] if self.default_read is None else self.default_read & ALL_ONES[size]
        return reg.read() & ALL_ONES[size]

    def io_write(self, offset: int, size: int, value: int) -> None:
        reg = self.regs.get((offset, size))
        if reg is not None and reg.write is not None:
            reg.write(value & ALL_ONES[size])

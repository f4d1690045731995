"""Split virtqueues (VIRTIO 1.x §2.7) and guest memory as a virtio device sees it.

A queue is three guest-physical areas the driver sets up: the descriptor table
(16 bytes per entry), the available ring (driver -> device) and the used ring
(device -> driver).  :meth:`VirtQueue.pop` walks one available chain (direct or
through an indirect table) into an :class:`Element`; :meth:`VirtQueue.push` adds it to
the used ring; :meth:`VirtQueue.should_notify` applies interrupt suppression
(``VRING_AVAIL_F_NO_INTERRUPT``, or ``used_event`` with VIRTIO_RING_F_EVENT_IDX).

Everything read from guest memory is hostile: a descriptor index past the table, a
loop, a chain longer than the table, a buffer outside RAM, an available index that
moved by more than the queue size, a nested indirect table.  Each raises
:class:`VirtQueueError`; the device decides whether the request can still be failed
(status byte) or the device must ask for a reset (DEVICE_NEEDS_RESET), as QEMU's
``virtio_error`` does.  No guest value reaches Python as an IndexError.

Callers hold the device lock: the vCPU thread pops on a notify while block
completions push from worker threads.

Device writes of ring metadata (used elements, used index, avail_event) and the request
status byte skip translated-code invalidation: that memory belongs to the driver's live
queue and is never executed, while each invalidation from a worker thread costs a round
trip to the vCPU.  Data the device writes (read requests, GET_ID) is invalidated.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Optional

from emu.errors import EmuError

# Descriptor flags (VIRTIO 1.x §2.7.5).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# Ring flags (§2.7.6, §2.7.8).
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTQUEUE_MAX_SIZE = 1024
#: Legacy interface ring alignment (§4.1.5.1.4.1 "Legacy Interface": the used ring starts on a 4096 boundary).
VIRTIO_PCI_VRING_ALIGN = 4096

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len


class VirtQueueError(EmuError):
    """The driver put something in a queue that no device can follow (a guest fault)."""


class GuestMemory:
    """Guest-physical RAM for device DMA.

    :param ram: guest RAM indexed by guest-physical address (a bytearray or ``vcpu.ram``), or
        None when ``view`` is given.
    :param invalidate: called ``(gpa, length)`` after every device write into RAM (the
        vCPU's ``invalidate_code``, so translated code there is dropped).
    :param view: ``(gpa, length) -> memoryview | None`` for RAM with holes (``vcpu.dma_view``).
    """

    def __init__(self, ram: Any = None, invalidate: Callable[[int, int], None] | None = None,
                 view: Callable[[int, int], Optional[memoryview]] | None = None) -> None:
        if view is None:
            if ram is None:
                raise ValueError("GuestMemory needs ram or view")
            mv = ram if isinstance(ram, memoryview) else memoryview(ram)
            mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            size = len(mv)

            def view(gpa: int, length: int, _mv: memoryview = mv, _size: int = size) -> Optional[memoryview]:
                if gpa < 0 or length < 0 or gpa + length > _size:
                    return None
                return _mv[gpa : gpa + length]

        self._view = view
        self.invalidate = invalidate

    @classmethod
    def from_vcpu(cls, vcpu: Any) -> "GuestMemory":
        """Memory of a :class:`emu.cpu.vcpu.VCPU` (its ``dma_view`` and ``invalidate_code``)."""
        return cls(view=vcpu.dma_view, invalidate=vcpu.invalidate_code)

    def view(self, gpa: int, length: int) -> Optional[memoryview]:
        """The RAM behind ``[gpa, gpa + length)`` (a live view), or None if any of it is not RAM."""
        return self._view(gpa, length)

    def valid(self, gpa: int, length: int) -> bool:
        """True when ``[gpa, gpa + length)`` is all RAM."""
        return self._view(gpa, length) is not None

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``gpa``.

        :raises VirtQueueError: if the range is not all RAM.
        """
        v = self._view(gpa, length)
        if v is None:
            raise VirtQueueError(f"guest address 0x{gpa:x}+0x{length:x} is outside RAM")
        return bytes(v)

    def write(self, gpa: int, data: bytes | bytearray | memoryview, invalidate: bool = True) -> None:
        """Store ``data`` at ``gpa`` and (by default) invalidate translated code there.

        :param invalidate: False for driver-owned metadata (used ring, status byte): it is
            never executed, and from a worker thread each invalidation is a round trip to
            the vCPU; callers that pass False for data call :meth:`invalidate_range` later.
        :raises VirtQueueError: if the range is not all RAM.
        """
        n = len(data)
        v = self._view(gpa, n)
        if v is None:
            raise VirtQueueError(f"guest address 0x{gpa:x}+0x{n:x} is outside RAM")
        v[:] = data
        if invalidate and self.invalidate is not None and n:
            self.invalidate(gpa, n)

    def invalidate_range(self, gpa: int, length: int) -> None:
        """Drop translated code in ``[gpa, gpa + length)`` (after a write with ``invalidate=False``)."""
        if self.invalidate is not None and length:
            self.invalidate(gpa, length)

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.read(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        """Ring metadata: written without code invalidation (see :meth:`write`)."""
        self.write(gpa, _U16.pack(value & 0xFFFF), invalidate=False)


class Element:
    """One popped chain: its head index and the guest buffers in chain order.

    :param index: head descriptor index (what goes back in the used ring).
    :param out_sg: device-readable ``(gpa, length)`` buffers.
    :param in_sg: device-writable ``(gpa, length)`` buffers.
    :param fault: set when a buffer lies outside RAM (the chain itself is well formed).
    """

    __slots__ = ("index", "out_sg", "in_sg", "fault", "out_len", "in_len")

    def __init__(self, index: int, out_sg: list[tuple[int, int]] | None = None,
                 in_sg: list[tuple[int, int]] | None = None, fault: str | None = None) -> None:
        self.index = index
        self.out_sg: list[tuple[int, int]] = out_sg if out_sg is not None else []
        self.in_sg: list[tuple[int, int]] = in_sg if in_sg is not None else []
        #: why a buffer of the chain cannot be used (outside RAM), or None
        self.fault = fault
        #: total bytes of the device-readable / device-writable buffers
        self.out_len = sum(n for _, n in self.out_sg)
        self.in_len = sum(n for _, n in self.in_sg)

    def __repr__(self) -> str:
        return f"Element({self.index}, out={self.out_sg}, in={self.in_sg}, fault={self.fault!r})"


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """VIRTIO 1.x §2.7.10: did ``[old, new)`` cross ``event_idx``? (16-bit wrapping)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


class VirtQueue:
    """One split virtqueue.

    :param memory: guest RAM.
    :param max_size: the largest size the device offers (QEMU's ``queue-size``, 256 for
        virtio-blk); the driver may choose a smaller power of two (modern interface).
    """

    def __init__(self, memory: GuestMemory, max_size: int = 256) -> None:
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Forget the rings (device reset or queue reset)."""
        self.size = self.max_size
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.enabled = False
        self.msix_vector = 0xFFFF
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.event_idx = False  # VIRTIO_RING_F_EVENT_IDX negotiated
        self.in_use = 0  # popped and not yet pushed
        self._rings_key: tuple[int, int, int, int] | None = None
        self._rings_views: tuple[memoryview, memoryview, memoryview] | None = None

    def _rings(self) -> tuple[memoryview, memoryview, memoryview]:
        """Live views of the descriptor table, available and used rings, made once per
        ring layout (the RAM map never changes), so ring accesses are plain struct calls.

        :raises VirtQueueError: if an area is not all RAM.
        """
        key = (self.desc, self.avail, self.used, self.size)
        if key != self._rings_key:
            n = self.size
            m = self.memory
            d, a, u = m.view(self.desc, 16 * n), m.view(self.avail, 6 + 2 * n), m.view(self.used, 6 + 8 * n)
            self._rings_views = None if d is None or a is None or u is None else (d, a, u)
            self._rings_key = key
        if self._rings_views is None:
            raise VirtQueueError(f"queue rings at 0x{self.desc:x}/0x{self.avail:x}/0x{self.used:x} "
                                 f"(size {self.size}) are outside RAM")
        return self._rings_views

    # ---- set-up -------------------------------------------------------------------------
    def set_legacy_pfn(self, pfn: int) -> None:
        """Legacy QUEUE_PFN: the rings laid out contiguously from ``pfn << 12``; 0 disables."""
        if pfn == 0:
            self.reset()
            return
        self.size = self.max_size
        self.desc = pfn << 12
        self.avail = self.desc + 16 * self.size
        used = self.avail + 4 + 2 * self.size + 2  # flags, idx, ring, used_event
        self.used = (used + VIRTIO_PCI_VRING_ALIGN - 1) & ~(VIRTIO_PCI_VRING_ALIGN - 1)
        self.enabled = True

    @property
    def ready(self) -> bool:
        return self.enabled and self.desc != 0

    def rings_valid(self) -> bool:
        """True when all three areas lie in RAM."""
        try:
            self._rings()
        except VirtQueueError:
            return False
        return True

    # ---- driver -> device ---------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._rings()[1], 2)[0]

    def avail_flags(self) -> int:
        return _U16.unpack_from(self._rings()[1], 0)[0]

    def used_event(self) -> int:
        return _U16.unpack_from(self._rings()[1], 4 + 2 * self.size)[0]

    def pending(self) -> int:
        """How many chains the driver has made available and we have not popped.

        :raises VirtQueueError: if the driver moved its index by more than the queue size.
        """
        avail_idx = _U16.unpack_from(self._rings()[1], 2)[0]
        n = (avail_idx - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise VirtQueueError(f"Guest moved used index from {self.last_avail_idx} to {avail_idx}")
        return n

    def pop(self) -> Element | None:
        """Take the next available chain, or None if there is none.

        :raises VirtQueueError: on any malformed chain (the entry is consumed).
        """
        if not self.pending():
            return None
        desc, avail, _used = self._rings()
        head = _U16.unpack_from(avail, 4 + 2 * (self.last_avail_idx % self.size))[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            raise VirtQueueError(f"Guest says index {head} is available (queue size {self.size})")
        elem = Element(head)
        self._walk(elem, desc, self.size, head, indirect_ok=True)
        self.in_use += 1
        return elem

    def _walk(self, elem: Element, table: memoryview, count: int, i: int, indirect_ok: bool) -> None:
        """Follow the chain from entry ``i`` of ``table`` (a view of ``count`` descriptors)."""
        mem = self.memory
        unpack = _DESC.unpack_from
        seen = 0
        out_sg, in_sg = elem.out_sg, elem.in_sg
        while True:
            if seen >= count:
                raise VirtQueueError("Looped descriptor")  # longer than the table: it loops
            seen += 1
            addr, length, flags, nxt = unpack(table, 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                if not indirect_ok:
                    raise VirtQueueError("Nested indirect descriptor")
                if flags & VRING_DESC_F_NEXT:
                    raise VirtQueueError("Indirect descriptor with NEXT set")
                if length == 0 or length % 16:
                    raise VirtQueueError(f"Invalid size for indirect buffer table: {length}")
                if length // 16 > VIRTQUEUE_MAX_SIZE:
                    raise VirtQueueError("Indirect buffer table is too big")
                indirect = mem.view(addr, length)
                if indirect is None:
                    raise VirtQueueError(f"Indirect table at 0x{addr:x} is outside RAM")
                if out_sg or in_sg:
                    # QEMU only follows an indirect descriptor as the head of a chain
                    raise VirtQueueError("Indirect descriptor inside a chain")
                # a copy: the driver may rewrite its table while the device walks it
                self._walk(elem, memoryview(bytes(indirect)), length // 16, 0, indirect_ok=False)
                return
            if not length:
                raise VirtQueueError("zero sized buffers are not allowed")
            if elem.fault is None and mem.view(addr, length) is None:
                # the chain is still well formed: the device can fail the request with a
                # status byte if that one is in RAM
                elem.fault = f"buffer 0x{addr:x}+0x{length:x} is outside RAM"
            if flags & VRING_DESC_F_WRITE:
                in_sg.append((addr, length))
                elem.in_len += length
            else:
                if in_sg:
                    raise VirtQueueError("Incorrect order for descriptors")
                out_sg.append((addr, length))
                elem.out_len += length
            if not flags & VRING_DESC_F_NEXT:
                return
            if nxt >= count:
                raise VirtQueueError(f"Desc next is {nxt}")
            i = nxt

    # ---- device -> driver ---------------------------------------------------------------
    def push(self, elem: Element, written: int) -> None:
        """Return ``elem`` to the driver, ``written`` bytes written into its buffers.

        :raises VirtQueueError: if the used ring is no longer in RAM.
        """
        used = self._rings()[2]
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.size), elem.index, min(written, 0xFFFFFFFF))
        # the element is visible before the index that publishes it (§2.7.8.2)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(used, 2, self.used_idx)
        self.in_use = max(0, self.in_use - 1)

    def set_avail_event(self) -> None:
        """Ask for a notification at the next available entry (event-idx) — written after
        each batch the device has taken."""
        if self.event_idx:
            _U16.pack_into(self._rings()[2], 4 + 8 * self.size, self.last_avail_idx)

    def should_notify(self, notify_on_empty: bool = False) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if notify_on_empty and not self.in_use and not self.pending():
            return True
        if not self.event_idx:
            return not self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        old = self.signalled_used
        self.signalled_used = self.used_idx
        return not valid or vring_need_event(self.used_event(), self.used_idx, old)

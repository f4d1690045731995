"""The ``raw`` format driver: the guest sees the protocol's bytes, optionally a window of them.

Options (as QEMU's raw driver): ``offset`` (bytes skipped at the start) and ``size``
(bytes exposed); both must be multiples of 512 when given through emu, like QEMU.
"""

from __future__ import annotations

from typing import Any

from emu.block.node import BlockDriver, register_driver
from emu.errors import BlockError


def _probe_raw(buf: bytes, filename: str) -> int:
    return 1  # anything is raw; every other format scores higher


@register_driver("raw", probe=_probe_raw)
class RawDriver(BlockDriver):
    """Raw image, with QEMU's offset/size options."""

    def open(self, options: dict[str, Any]) -> None:
        self.offset = int(options.get("offset", 0))
        fsize = self.bs.file.size
        if self.offset < 0:
            raise BlockError("offset cannot be negative")
        if self.offset > fsize:
            raise BlockError("The sum of offset (%d) and size (0) has to be smaller or equal to the "
                             " actual size of the containing file (%d)" % (self.offset, fsize))
        self.fixed_size = options.get("size")
        if self.fixed_size is not None:
            self.fixed_size = int(self.fixed_size)
            if self.offset + self.fixed_size > fsize:
                raise BlockError("The sum of offset (%d) and size (%d) has to be smaller or equal to "
                                 "the  actual size of the containing file (%d)"
                                 % (self.offset, self.fixed_size, fsize))

    @property
    def size(self) -> int:
        if self.fixed_size is not None:
            return self.fixed_size
        return max(0, self.bs.file.size - self.offset)

    takes_buffers = True

    def read(self, offset: int, length: int) -> bytes:
        return self.bs.file.read(self.offset + offset, length)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.bs.file.read_into(self.offset + offset, buf)

    def write(self, offset: int, data: bytes) -> None:
        self.bs.file.write(self.offset + offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.bs.file.write_zeroes(self.offset + offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.bs.file.discard(self.offset + offset, length)

    def truncate(self, size: int) -> None:
        if self.offset or self.fixed_size is not None:
            raise BlockError("Cannot resize fixed-size raw disks")
        self.bs.file.truncate(size)

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        kind, n, host = self.bs.file.block_status(self.offset + offset, length)
        return kind, n, host

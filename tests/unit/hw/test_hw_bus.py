"""IOBus / MMIOBus: registration, overlap refusal, all-ones reads, splitting, register tables."""

import pytest

from emu.hw.bus import BusError, IOBus, MMIOBus, Reg, RegisterBank


class Recorder:
    """A device that remembers accesses and answers offset-derived values."""

    def __init__(self, max_size=4):
        self.io_max_size = max_size
        self.log = []

    def io_read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x10 + offset

    def io_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_unmapped_reads_are_all_ones_and_writes_ignored():
    bus = IOBus()
    assert bus.port_read(0x1234, 1) == 0xFF
    assert bus.port_read(0x1234, 2) == 0xFFFF
    assert bus.port_read(0x1234, 4) == 0xFFFFFFFF
    bus.port_write(0x1234, 4, 0xDEADBEEF)  # no effect, no error
    assert bus.owner(0x1234) is None


def test_dispatch_passes_offset_from_base():
    bus = IOBus()
    dev = Recorder()
    bus.register_ports(0x3F8, 8, dev)
    assert bus.port_read(0x3FD, 1) == 0x15
    bus.port_write(0x3F8, 1, 0x41)
    assert dev.log == [("r", 5, 1), ("w", 0, 1, 0x41)]
    assert bus.owner(0x3FF) is dev and bus.owner(0x400) is None


def test_overlap_refused_and_unregister_frees():
    bus = IOBus()
    a, b = Recorder(), Recorder()
    bus.register_ports(0x60, 5, a, "kbd")
    with pytest.raises(BusError, match="0x64 .*already used by kbd"):
        bus.register_ports(0x64, 1, b, "other")
    with pytest.raises(BusError):
        bus.register_ports(0xFFFF, 2, b)
    # the failed registration claimed nothing
    assert bus.owner(0x65) is None
    bus.unregister(0x60)
    assert bus.port_read(0x60, 1) == 0xFF
    bus.register_ports(0x64, 1, b)
    assert bus.owner(0x64) is b
    with pytest.raises(BusError):
        bus.unregister(0x60)


def test_byte_devices_get_wide_accesses_split():
    """As QEMU's memory core: the device the access starts in gets it all, as byte accesses
    at offsets +0..+3 (past its two ports too), when the offset is 4-aligned."""
    bus = IOBus()
    dev = Recorder(max_size=1)
    bus.register_ports(0x70, 2, dev)
    assert bus.port_read(0x70, 4) == 0x13121110
    assert dev.log[-4:] == [("r", 0, 1), ("r", 1, 1), ("r", 2, 1), ("r", 3, 1)]
    bus.port_write(0x70, 2, 0xBBAA)
    assert dev.log[-2:] == [("w", 0, 1, 0xAA), ("w", 1, 1, 0xBB)]


def test_unaligned_wide_accesses_are_cut_at_the_offsets_alignment():
    """A piece is at most as wide as its offset's alignment in the region it falls in:
    ``inl`` at offset 1 reads one byte there, then goes on at the next port's owner."""
    bus = IOBus()
    dev = Recorder(max_size=1)
    bus.register_ports(0x70, 2, dev)
    # offset 1 (0x71) -> one byte; 0x72/0x73 unmapped (all ones, at 0x72: 2-aligned, 2 bytes)
    # then 0x74 -> one byte of the unmapped space
    assert bus.port_read(0x71, 4) == 0xFFFFFF11
    wide = Recorder(max_size=4)
    bus.register_ports(0x40, 4, wide)
    assert bus.port_read(0x42, 4) == 0xFFFF0012    # offset 2: a 2-byte piece, then 0x44-0x45
    assert wide.log[-1] == ("r", 2, 2)
    bus.port_write(0x41, 2, 0xBBAA)
    assert wide.log[-2:] == [("w", 1, 1, 0xAA), ("w", 2, 1, 0xBB)]


def test_mmio_bus_overlap_lookup_and_listeners():
    bus = MMIOBus()
    events = []
    bus.add_listener(lambda b, s: events.append(("map", b, s)), lambda b, s: events.append(("unmap", b, s)))
    dev = Recorder()
    bus.register(0xFEBF0000, 0x1000, dev)
    with pytest.raises(BusError):
        bus.register(0xFEBF0800, 0x1000, Recorder())
    with pytest.raises(BusError):
        bus.register(0xFEBEF000, 0x1001, Recorder())
    bus.register(0xFEBF1000, 0x1000, Recorder())  # adjacent is fine
    assert bus.read(0xFEBF0004, 4) == 0x14
    assert bus.read(0xFEC00000, 4) == 0xFFFFFFFF
    bus.write(0xFEBF0008, 2, 7)
    assert dev.log[-1] == ("w", 8, 2, 7)
    bus.unregister(0xFEBF0000)
    assert bus.read(0xFEBF0004, 4) == 0xFFFFFFFF
    assert events == [("map", 0xFEBF0000, 0x1000), ("map", 0xFEBF1000, 0x1000), ("unmap", 0xFEBF0000, 0x1000)]


def test_register_bank_table():
    state = {"ctl": 0}
    bank = RegisterBank(
        [
            Reg(0, 4, "ID", read=lambda: 0x12345678),
            Reg(4, 1, "CTL", read=lambda: state["ctl"], write=lambda v: state.__setitem__("ctl", v)),
        ]
    )
    bus = IOBus()
    bus.register_ports(0xC000, 8, bank, "bank")
    assert bus.port_read(0xC000, 4) == 0x12345678
    bus.port_write(0xC004, 1, 0x1FF)
    assert bus.port_read(0xC004, 1) == 0xFF
    assert bus.port_read(0xC002, 2) == 0xFFFF  # no register there

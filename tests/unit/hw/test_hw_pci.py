"""PCI config mechanism #1, i440FX/PIIX3, BAR sizing and mapping, INTx through PIRQ routing."""

from emu.hw.bus import IOBus, MMIOBus
from emu.hw.pc.pic import PicPair
from emu.hw.pci.chipset import I440FX, PIIX3
from emu.hw.pci.device import PciFunction
from emu.hw.pci.host import PciHost


class Regs:
    """A device's register window: remembers writes, reads back offset-tagged values."""

    def __init__(self):
        self.writes = []

    def io_read(self, offset, size):
        return 0xA0 + offset

    def io_write(self, offset, size, value):
        self.writes.append((offset, size, value))


class SampleFunction(PciFunction):
    def __init__(self, device_id=0x1001):
        super().__init__(0x1AF4, device_id, 0x010000, interrupt_pin=1, name=f"test-{device_id:x}")
        self.io = Regs()
        self.mem = Regs()
        self.add_bar(0, 0x20, self.io, io=True)
        self.add_bar(1, 0x1000, self.mem, io=False)
        self.add_bar(2, 0x4000, Regs(), io=False, mem64=True, prefetch=True)


def make():
    iobus, mmio = IOBus(), MMIOBus()
    pic = PicPair()
    pic.register(iobus)
    host = PciHost(iobus, mmio)
    host.register()
    resets = []
    piix = PIIX3(pic, on_reset=lambda: resets.append(1))
    host.add(I440FX(), 0)
    host.add(piix, 1)
    host.set_irq_router(piix)
    host.set_reset_control(piix)
    dev = SampleFunction()
    host.add(dev, 3)
    return iobus, mmio, host, pic, piix, dev, resets


def cfg_addr(slot, fn, reg, bus=0):
    return 0x80000000 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC)


def rd(iobus, slot, fn, reg, size=4, bus=0):
    iobus.port_write(0xCF8, 4, cfg_addr(slot, fn, reg, bus))
    return iobus.port_read(0xCFC + (reg & 3), size)


def wr(iobus, slot, fn, reg, value, size=4):
    iobus.port_write(0xCF8, 4, cfg_addr(slot, fn, reg))
    iobus.port_write(0xCFC + (reg & 3), size, value)


def test_enumeration_ids_and_widths():
    iobus, *_ = make()
    assert rd(iobus, 0, 0, 0) == 0x12378086
    assert rd(iobus, 0, 0, 0x08) == 0x06000002  # class host bridge, rev 2
    assert rd(iobus, 1, 0, 0) == 0x70008086
    assert rd(iobus, 1, 0, 0x0A, 2) == 0x0601
    assert rd(iobus, 1, 0, 0x0E, 1) == 0x80  # multi-function header
    assert rd(iobus, 1, 0, 0x2C) == 0x11001AF4  # QEMU's default subsystem IDs
    assert rd(iobus, 0, 0, 0x02, 2) == 0x1237
    assert rd(iobus, 0, 0, 0x03, 1) == 0x12
    assert rd(iobus, 2, 0, 0) == 0xFFFFFFFF  # empty slot
    assert rd(iobus, 1, 1, 0) == 0xFFFFFFFF  # absent function
    assert rd(iobus, 0, 0, 0, bus=1) == 0xFFFFFFFF
    iobus.port_write(0xCF8, 4, 0x00000000)  # enable bit clear
    assert iobus.port_read(0xCFC, 4) == 0xFFFFFFFF
    # PIRQ route registers reset to "disabled"
    assert rd(iobus, 1, 0, 0x60) == 0x80808080


def test_linux_conf1_probe_sequence():
    iobus, *_ = make()
    iobus.port_write(0xCFB, 1, 0x01)  # ignored: not a dword write to 0xCF8
    tmp = iobus.port_read(0xCF8, 4)
    iobus.port_write(0xCF8, 4, 0x80000000)
    assert iobus.port_read(0xCF8, 4) == 0x80000000
    iobus.port_write(0xCF8, 4, tmp)


def test_read_only_and_write_masks():
    iobus, mmio, host, pic, piix, dev, _ = make()
    wr(iobus, 3, 0, 0x00, 0xFFFFFFFF)
    assert rd(iobus, 3, 0, 0x00) == 0x10011AF4
    wr(iobus, 3, 0, 0x3C, 0x0B, 1)
    wr(iobus, 3, 0, 0x3D, 0x04, 1)
    assert rd(iobus, 3, 0, 0x3C, 2) == 0x010B  # line writable, pin read-only
    dev.config[0x07] |= 0x20 | 0x10  # 66 MHz (RO), master abort (W1C)... set by "hardware"
    wr(iobus, 3, 0, 0x06, 0x1000, 2)  # write 1 to clear received master abort
    assert rd(iobus, 3, 0, 0x06, 2) & 0x3000 == 0x2000


def test_bar_sizing_and_types():
    iobus, mmio, host, pic, piix, dev, _ = make()
    assert rd(iobus, 3, 0, 0x10) == 0x00000001
    wr(iobus, 3, 0, 0x10, 0xFFFFFFFF)
    assert rd(iobus, 3, 0, 0x10) == 0xFFFFFFE1
    wr(iobus, 3, 0, 0x14, 0xFFFFFFFF)
    assert rd(iobus, 3, 0, 0x14) == 0xFFFFF000
    wr(iobus, 3, 0, 0x18, 0xFFFFFFFF)
    wr(iobus, 3, 0, 0x1C, 0xFFFFFFFF)
    assert rd(iobus, 3, 0, 0x18) == 0xFFFFC00C  # 64-bit prefetchable
    assert rd(iobus, 3, 0, 0x1C) == 0xFFFFFFFF
    assert rd(iobus, 3, 0, 0x20) == 0  # unimplemented BAR reads 0 and stays 0
    wr(iobus, 3, 0, 0x20, 0xFFFFFFFF)
    assert rd(iobus, 3, 0, 0x20) == 0


def test_bar_mapping_follows_command_and_moves():
    iobus, mmio, host, pic, piix, dev, _ = make()
    wr(iobus, 3, 0, 0x10, 0xC040)
    wr(iobus, 3, 0, 0x14, 0xFEBF1000)
    assert iobus.port_read(0xC040, 1) == 0xFF  # decode off
    wr(iobus, 3, 0, 0x04, 0x0003, 2)
    assert iobus.port_read(0xC044, 4) == 0xA4
    assert mmio.read(0xFEBF1008, 4) == 0xA8
    iobus.port_write(0xC05F, 1, 7)
    assert dev.io.writes == [(0x1F, 1, 7)]
    wr(iobus, 3, 0, 0x10, 0xC100)  # move
    assert iobus.port_read(0xC044, 4) == 0xFFFFFFFF and iobus.port_read(0xC100, 1) == 0xA0
    wr(iobus, 3, 0, 0x04, 0x0002, 2)  # I/O decode off
    assert iobus.port_read(0xC100, 1) == 0xFF and mmio.read(0xFEBF1000, 4) == 0xA0
    # sizing while decode is on must not map the BAR at the top of the space
    wr(iobus, 3, 0, 0x14, 0xFFFFFFFF)
    assert mmio.regions() == []
    wr(iobus, 3, 0, 0x14, 0xFEBF2000)
    assert [r[0] for r in mmio.regions()] == [0xFEBF2000]
    # 64-bit BAR above 4 GiB
    wr(iobus, 3, 0, 0x18, 0x0000000C)
    wr(iobus, 3, 0, 0x1C, 0x00000080)
    assert mmio.find(0x80_0000_0000) is not None
    host.reset()
    assert mmio.regions() == [] and rd(iobus, 3, 0, 0x10) == 1


def test_bar_over_another_device_is_left_unmapped():
    iobus, mmio, host, pic, piix, dev, _ = make()
    wr(iobus, 3, 0, 0x10, 0x0020)  # over the PIC
    wr(iobus, 3, 0, 0x04, 0x0001, 2)
    assert dev.bars[0].mapped_at is None
    assert iobus.port_read(0x21, 1) == 0  # PIC IMR still answers
    wr(iobus, 3, 0, 0x10, 0xC000)
    assert dev.bars[0].mapped_at == 0xC000


def test_intx_routed_through_pirq_to_pic():
    iobus, mmio, host, pic, piix, dev, _ = make()
    # slot 3 INTA# -> PIRQC (register 0x62)
    assert PIIX3.pirq_of(dev.devfn, 0) == 2
    iobus.port_write(0x4D1, 1, 0x08)  # IRQ 11 level-triggered (what firmware does)
    wr(iobus, 1, 0, 0x60, 0x0B0B0A0A)  # SeaBIOS's 10, 10, 11, 11
    dev.set_intx(True)
    assert rd(iobus, 3, 0, 0x06, 2) & 0x08  # interrupt status
    assert pic.irr() & (1 << 11)
    wr(iobus, 3, 0, 0x04, 0x0400, 2)  # INTx disable masks it
    assert not pic.irr() & (1 << 11)
    wr(iobus, 3, 0, 0x04, 0x0000, 2)
    assert pic.irr() & (1 << 11)
    wr(iobus, 1, 0, 0x62, 0x85, 1)  # route disabled
    assert not pic.irr() & (1 << 11)
    wr(iobus, 1, 0, 0x62, 0x05, 1)
    assert pic.slave.irr == 0 and pic.master.last_irr & (1 << 5)
    wr(iobus, 1, 0, 0x62, 0x0B, 1)
    dev.set_intx(False)
    assert not pic.irr() & (1 << 11) and not rd(iobus, 3, 0, 0x06, 2) & 0x08


def test_shared_irq_is_wired_or():
    iobus, mmio, host, pic, piix, dev, _ = make()
    other = SampleFunction(0x1002)
    host.add(other, 7)  # slot 7 INTA# -> PIRQC too ((0 + 7 - 1) & 3 == 2)
    iobus.port_write(0x4D1, 1, 0x08)
    wr(iobus, 1, 0, 0x62, 0x0B, 1)
    dev.set_intx(True)
    other.intx_line().raise_()
    dev.set_intx(False)
    assert pic.irr() & (1 << 11)  # still held by the other device
    other.set_intx(False)
    assert not pic.irr() & (1 << 11)


def test_reset_control_cf9():
    iobus, mmio, host, pic, piix, dev, resets = make()
    iobus.port_write(0xCF9, 1, 0x02)
    assert iobus.port_read(0xCF9, 1) == 0x02 and resets == []
    iobus.port_write(0xCF9, 1, 0x06)
    assert resets == [1]
    # dword config address access is unaffected
    iobus.port_write(0xCF8, 4, 0x80000800)
    assert iobus.port_read(0xCF8, 4) == 0x80000800


def test_capability_list():
    f = PciFunction(0x1AF4, 0x1042, 0x010000)
    a = f.add_capability(0x09, 16)
    b = f.add_capability(0x05, 12)
    assert f.config_read(0x06, 2) & 0x10
    assert f.config_read(0x34, 1) == b
    assert f.config_read(b, 1) == 0x05 and f.config_read(b + 1, 1) == a
    assert f.config_read(a, 1) == 0x09 and f.config_read(a + 1, 1) == 0
    f.config_write(a + 4, 4, 0xFFFFFFFF)
    assert f.config_read(a + 4, 4) == 0  # capability bodies start read-only
    f.wmask[a + 4] = 0xFF
    f.config_write(a + 4, 4, 0xFFFFFFFF)
    assert f.config_read(a + 4, 4) == 0xFF


def test_hostile_config_traffic_never_raises():
    iobus, mmio, host, pic, piix, dev, _ = make()
    for slot in (0, 1, 3):
        for reg in range(0, 256, 4):
            wr(iobus, slot, 0, reg, 0xFFFFFFFF)
            wr(iobus, slot, 0, reg, 0x5A5A5A5A)
            rd(iobus, slot, 0, reg)
    for lane in range(4):
        for size in (1, 2, 4):
            iobus.port_write(0xCF8, 4, cfg_addr(3, 0, 0))
            iobus.port_read(0xCFC + lane, size)
            iobus.port_write(0xCFC + lane, size, 0)

"""SeaBIOS-style PCI resource assignment for firmware-less boots."""

from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.pci.device import PciFunction
from emu.hw.pci.setup import assign_resources


class Window:
    def io_read(self, offset, size):
        return offset

    def io_write(self, offset, size, value):
        pass


def test_assign_like_seabios():
    board = PcBoard(VirtualClock(manual=True))
    ide = PciFunction(0x8086, 0x7010, 0x010180, name="piix3-ide")
    ide.add_bar(4, 16, Window(), io=True)
    vblk = PciFunction(0x1AF4, 0x1001, 0x010000, interrupt_pin=1, name="virtio-blk")
    vblk.add_bar(0, 0x40, Window(), io=True)
    vblk.add_bar(1, 0x1000, Window(), io=False)
    vblk.add_bar(4, 0x4000, Window(), io=False, mem64=True, prefetch=True)
    board.pci.add(ide, 1, 1)
    board.pci.add(vblk, 3)
    assign_resources(board.pci)
    cfg = board.pci.config_read
    assert cfg(0x08, 0x60, 4) == 0x0B0B0A0A
    assert board.iobus.port_read(0x4D0, 1) == 0x00 and board.iobus.port_read(0x4D1, 1) == 0x0C
    assert cfg(0x18, 0x3C, 1) == 11  # slot 3 INTA# -> PIRQC -> IRQ 11
    assert cfg(0x18, 0x10, 4) == 0xC001
    assert cfg(0x09, 0x20, 4) == 0xC041
    assert cfg(0x18, 0x20, 4) == 0xFEBFC00C and cfg(0x18, 0x24, 4) == 0
    assert cfg(0x18, 0x14, 4) == 0xFEBFB000
    assert cfg(0x18, 0x04, 2) & 0x3 == 0x3
    assert cfg(0x09, 0x04, 2) & 0x1 and cfg(0x09, 0x40, 2) & 0x8000 and cfg(0x09, 0x42, 2) & 0x8000
    assert board.iobus.port_read(0xC004, 1) == 4  # mapped through the bus
    assert board.mmiobus.read(0xFEBFB010, 4) == 0x10
    # the INTx of the virtio function now reaches the PIC as a level IRQ 11
    vblk.set_intx(True)
    assert board.pic.irr() & (1 << 11)

"""i8042 (reset, A20, probes), port 0x92, isa-debug-exit and port 0x80 through the bus."""

import pytest

from emu.errors import ConfigError
from emu.hw.bus import IOBus
from emu.hw.irq import IrqLine
from emu.hw.pc.debugexit import DebugExit, PostPort
from emu.hw.pc.i8042 import I8042


class Level:
    def __init__(self):
        self.levels = {}
        self.rises = {}

    def set_irq(self, irq, level):
        if level and not self.levels.get(irq):
            self.rises[irq] = self.rises.get(irq, 0) + 1
        self.levels[irq] = level


def make():
    bus = IOBus()
    events = []
    pic = Level()
    kbc = I8042(IrqLine(pic, 1), IrqLine(pic, 12), on_reset=lambda: events.append("reset"),
                on_a20=lambda on: events.append(("a20", on)))
    kbc.register(bus)
    return bus, kbc, pic, events


def drain(bus):
    out = []
    while bus.port_read(0x64, 1) & 0x01:
        out.append(bus.port_read(0x60, 1))
    return out


def test_reset_via_0xfe_and_via_output_port():
    bus, kbc, pic, events = make()
    bus.port_write(0x64, 1, 0xFE)
    assert events == ["reset"]
    bus.port_write(0x64, 1, 0xFF)  # bit 0 set: pulses nothing
    assert events == ["reset"]
    bus.port_write(0x64, 1, 0xD1)
    bus.port_write(0x60, 1, 0x02)  # reset line low, A20 on
    assert events == ["reset", ("a20", True), "reset"]


def test_a20_via_output_port_and_port92():
    bus, kbc, pic, events = make()
    bus.port_write(0x64, 1, 0xD0)
    assert drain(bus) == [0xCF]  # QEMU's output port after reset
    bus.port_write(0x64, 1, 0xD1)
    bus.port_write(0x60, 1, 0xCD)  # A20 off
    bus.port_write(0x64, 1, 0xDF)  # A20 on
    assert events == [("a20", False), ("a20", True)]
    bus.port_write(0x64, 1, 0xD0)
    assert drain(bus) == [0xCF]
    events.clear()
    assert bus.port_read(0x92, 1) == 0x00
    bus.port_write(0x92, 1, 0x00)
    bus.port_write(0x92, 1, 0x02)
    assert events == [("a20", False), ("a20", True)]
    assert bus.port_read(0x92, 1) == 0x02
    bus.port_write(0x92, 1, 0x03)  # fast reset on bit 0 rising
    assert events[-1] == "reset"


def test_controller_self_test_command_byte_and_irq1():
    bus, kbc, pic, events = make()
    assert bus.port_read(0x64, 1) & 0x01 == 0
    bus.port_write(0x64, 1, 0xAA)
    assert drain(bus) == [0x55]
    assert bus.port_read(0x64, 1) & 0x04  # system flag
    bus.port_write(0x64, 1, 0x20)
    assert pic.levels[1]  # output waiting and IRQ1 enabled in the command byte
    assert drain(bus) == [0x03]
    assert not pic.levels[1]
    bus.port_write(0x64, 1, 0x60)
    bus.port_write(0x60, 1, 0x44)  # interrupts off, SYS, translate
    bus.port_write(0x64, 1, 0x20)
    assert not pic.levels[1]
    assert drain(bus) == [0x44]
    bus.port_write(0x64, 1, 0xAB)
    assert drain(bus) == [0x00]


def test_keyboard_and_mouse_identify_like_linux_probes():
    bus, kbc, pic, events = make()
    bus.port_write(0x60, 1, 0xFF)
    assert drain(bus) == [0xFA, 0xAA]
    bus.port_write(0x60, 1, 0xF2)
    assert drain(bus) == [0xFA, 0xAB, 0x83]
    bus.port_write(0x60, 1, 0xF0)
    bus.port_write(0x60, 1, 0x00)
    assert drain(bus) == [0xFA, 0xFA, 0x02]
    bus.port_write(0x64, 1, 0xD4)
    bus.port_write(0x60, 1, 0xF2)
    assert bus.port_read(0x64, 1) & 0x21 == 0x21  # aux data
    assert pic.levels[12]
    assert drain(bus) == [0xFA, 0x00]
    bus.port_write(0x64, 1, 0xD3)  # loop a byte back as from the mouse (i8042 aux probe)
    bus.port_write(0x60, 1, 0x5A)
    assert bus.port_read(0x64, 1) & 0x20 and drain(bus) == [0x5A]


def test_unmapped_data_read_and_hostile_input():
    bus, kbc, pic, events = make()
    assert bus.port_read(0x60, 1) == 0x00
    for v in range(256):
        if v in (0xFE, 0xF0, 0xF2, 0xF4, 0xF6, 0xF8, 0xFA, 0xFC, 0xD1):
            continue
        bus.port_write(0x64, 1, v)
        bus.port_write(0x60, 1, v)
    drain(bus)
    assert len(kbc.queue) == 0


def test_debug_exit_status_and_post_port():
    codes = []
    bus = IOBus()
    dx = DebugExit(codes.append)
    dx.register(bus)
    bus.port_write(0x501, 1, 0x00)
    bus.port_write(0x501, 2, 0x0031)
    bus.port_write(0x502, 1, 0x02)
    assert codes == [1, 0x63, 5]
    assert bus.port_read(0x501, 1) == 0
    assert bus.port_read(0x503, 1) == 0xFF  # outside iosize=2
    seen = []
    post = PostPort(seen.append)
    post.register(bus)
    bus.port_write(0x80, 1, 0x42)
    assert post.last_code == 0x42 and seen == [0x42] and bus.port_read(0x80, 1) == 0xFF
    dx2 = DebugExit(codes.append, iobase=0xF4, iosize=4)
    dx2.register(bus)
    bus.port_write(0xF4, 4, 0x10)
    assert codes[-1] == 0x21
    DebugExit(codes.append, iobase=0xFFFF, iosize=300).register(IOBus())  # cut at 0xFFFF, as QEMU
    DebugExit(codes.append, iosize=0).register(bus)  # maps nothing


@pytest.mark.parametrize(
    "props, expect",
    [
        ({"iobase": "0xf4", "iosize": "0x04"}, (0xF4, 4)),
        ({"iobase": "010"}, (8, 2)),
        ({"iobase": " 5"}, (5, 2)),
        ({"iobase": "foo"}, "Parameter 'iobase' expects integer"),
        ({"iobase": "1e3"}, "Parameter 'iobase' expects integer"),
        ({"iobase": ""}, "Parameter 'iobase' expects integer"),
        ({"iobase": "-1"}, "Parameter 'iobase' expects uint32_t"),
        ({"iobase": "0x100000000"}, "Parameter 'iobase' expects uint32_t"),
        ({"bogus": "1"}, "Property 'isa-debug-exit.bogus' not found"),
    ],
)
def test_debug_exit_properties_parse_like_qemu(props, expect):
    if isinstance(expect, str):
        with pytest.raises(ConfigError) as err:
            DebugExit.from_qemu_props(props, lambda s: None)
        assert str(err.value) == expect
    else:
        dx = DebugExit.from_qemu_props(props, lambda s: None)
        assert (dx.iobase, dx.iosize) == expect


def test_one_irq1_edge_per_byte_of_a_multi_byte_reply():
    bus, kbc, pic, events = make()
    bus.port_write(0x60, 1, 0xF2)  # identify: FA AB 83
    assert pic.rises[1] == 1
    got = [bus.port_read(0x60, 1) for _ in range(3)]
    assert got == [0xFA, 0xAB, 0x83]
    assert pic.rises[1] == 3 and not pic.levels[1]

"""The wired PC platform: a guest-like interrupt consumer counts timer, RTC and UART IRQs."""

import io

import pytest

from emu.hw.clock import VirtualClock
from emu.hw.pc.board import PcBoard
from emu.hw.pc.serial import FileBackend

US = 1000


class Cpu:
    """The vCPU's side of the contract: INTA when INTR is up, EOI like an IRQ handler."""

    def __init__(self, board):
        self.board = board
        self.vectors = []

    def step(self):
        pic = self.board.pic
        bus = self.board.iobus
        while pic.has_interrupt():
            v = pic.acknowledge()
            self.vectors.append(v)
            if v == 0x28:  # RTC: read register C, EOI both
                bus.port_write(0x70, 1, 0x0C)
                bus.port_read(0x71, 1)
                bus.port_write(0xA0, 1, 0x20)
            elif v == 0x24:  # UART: read IIR, drain RX
                bus.port_read(0x3FA, 1)
                while bus.port_read(0x3FD, 1) & 1:
                    bus.port_read(0x3F8, 1)
            bus.port_write(0x20, 1, 0x20)


def make():
    clock = VirtualClock(manual=True)
    kicks = []
    out = io.BytesIO()
    board = PcBoard(clock, notify=lambda: kicks.append(clock.now()), serial_backend=FileBackend(out),
                    debug_exit=(0x501, 2), on_exit=lambda s: kicks.append(("exit", s)))
    bus = board.iobus
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                      (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01)):
        bus.port_write(port, 1, val)
    return clock, board, kicks, out


def test_pit_1khz_exact_irq_count_and_kicks():
    clock, board, kicks, _ = make()
    bus = board.iobus
    bus.port_write(0x21, 1, 0xFE)  # only IRQ0
    bus.port_write(0xA1, 1, 0xFF)
    bus.port_write(0x43, 1, 0x34)
    bus.port_write(0x40, 1, 1193 & 0xFF)
    bus.port_write(0x40, 1, 1193 >> 8)
    cpu = Cpu(board)
    cpu.step()  # the reset-time tick (QEMU's PIT raises OUT0 at reset) is masked but latched
    kicks.clear()
    cpu.vectors.clear()
    for _ in range(500):  # 50 ms in 100 us steps
        clock.advance(100 * US)
        cpu.step()
    assert cpu.vectors == [0x20] * 50
    assert len(kicks) == 50


def test_rtc_and_uart_irqs_with_priorities():
    clock, board, kicks, out = make()
    bus = board.iobus
    bus.port_write(0x21, 1, 0xFA & ~0x10)  # IRQ0 masked; 2 and 4 open
    bus.port_write(0xA1, 1, 0xFE)  # IRQ8
    bus.port_write(0x70, 1, 0x0B)
    bus.port_write(0x71, 1, 0x02 | 0x40)  # PIE, 1024 Hz
    bus.port_write(0x3F9, 1, 0x01)  # UART RDA interrupts
    bus.port_write(0x3FC, 1, 0x08)  # OUT2
    cpu = Cpu(board)
    board.serial.receive(b"k")
    cpu.step()
    assert cpu.vectors == [0x24]
    cpu.vectors.clear()
    for _ in range(100):
        clock.advance(100 * US)
        cpu.step()
    assert cpu.vectors == [0x28] * 10  # 10 ms at 1024 Hz -> 10 periodic interrupts
    for ch in b"ok":
        bus.port_write(0x3F8, 1, ch)
    assert out.getvalue() == b"ok"
    bus.port_write(0x501, 1, 0x10)
    assert kicks[-1] == ("exit", 0x21)


def test_reset_and_port_map():
    clock, board, kicks, _ = make()
    bus = board.iobus
    names = {base: getattr(dev, "name", type(dev).__name__) for base, _, dev in bus.regions()}
    for port in (0x20, 0xA0, 0x4D0, 0x40, 0x61, 0x60, 0x64, 0x92, 0x70, 0x3F8, 0x80, 0xCF8, 0x501):
        assert port in names, hex(port)
    assert bus.port_read(0x2F8, 1) == 0xFF  # no COM2: all ones, as Linux expects
    board.reset()
    assert board.pic.imr() == 0 and board.pic.master.irq_base == 0
    with pytest.raises(ValueError):
        PcBoard(clock, debug_exit=(0x501, 2))


def test_serial_ports_follow_qemu_order():
    clock = VirtualClock(manual=True)
    none = PcBoard(clock, serial_ports=0)
    assert none.serial is None and none.iobus.port_read(0x3FD, 1) == 0xFF
    board = PcBoard(clock, serial_ports=2)
    board.add_serial(None)
    assert [(u.base, u.irq.irq) for u in board.serials] == [(0x3F8, 4), (0x2F8, 3), (0x3E8, 4)]
    assert board.iobus.port_read(0x2FD, 1) == 0x60 and board.iobus.port_read(0x2EE, 1) == 0xFF
    board.add_serial(None)
    with pytest.raises(ValueError):
        board.add_serial(None)


def test_random_port_flood_never_raises_and_platform_recovers():
    import random

    clock = VirtualClock(manual=True)
    events = []
    board = PcBoard(clock, notify=lambda: None, on_reset=lambda: events.append("reset"),
                    on_a20=lambda on: None, on_exit=lambda s: events.append(s), debug_exit=(0x501, 2))
    bus = board.iobus
    rng = random.Random(4)
    hot = [0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0x92,
           0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0x4D0, 0x4D1, 0xCF8, 0xCF9, 0xCFC, 0xCFE]
    for i in range(20000):
        port = rng.choice(hot) if i % 2 else rng.randrange(0x10000)
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            value = bus.port_read(port, size)
            assert 0 <= value < 1 << (8 * size)
        else:
            bus.port_write(port, size, rng.getrandbits(32) & ((1 << (8 * size)) - 1))
        if i % 1000 == 0:
            clock.advance(rng.randrange(10_000_000))
        for _ in range(4):  # a level-triggered source may stay asserted: take a few, like a CPU
            if not board.pic.has_interrupt():
                break
            board.pic.acknowledge()
            bus.port_write(0x20, 1, 0x20)
            bus.port_write(0xA0, 1, 0x20)
    # the platform still works after the flood: a system reset and a clean PIC/PIT set-up
    board.reset()
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        bus.port_write(port, 1, val)
    bus.port_write(0x43, 1, 0x34)
    bus.port_write(0x40, 1, 100)
    bus.port_write(0x40, 1, 0)
    clock.advance(1_000_000)
    assert board.pic.has_interrupt() and board.pic.acknowledge() == 0x20

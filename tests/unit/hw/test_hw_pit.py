"""8254 PIT on a manual virtual clock: counts, latches, read-back, IRQ 0 rate, port 0x61."""

from emu.hw.bus import IOBus
from emu.hw.clock import NS_PER_SEC, VirtualClock
from emu.hw.pc.pit import PIT_FREQ, Pit

US = 1000
MS = 1_000_000


def ticks_ns(t):
    """Virtual ns for t PIT ticks (rounded up, as the counter sees it)."""
    return -(-t * NS_PER_SEC // PIT_FREQ)


class Counter:
    """Counts IRQ 0 edges the way the PIC sees them."""

    def __init__(self):
        self.level = False
        self.rises = 0

    def set_irq(self, irq, level):
        if level and not self.level:
            self.rises += 1
        self.level = level


def make(with_irq=True):
    clock = VirtualClock(manual=True)
    bus = IOBus()
    sink = Counter()
    from emu.hw.irq import IrqLine

    pit = Pit(clock, IrqLine(sink, 0) if with_irq else None)
    pit.register(bus)
    return clock, bus, pit, sink


def program(bus, ch, mode, count, access=3, bcd=0):
    bus.port_write(0x43, 1, (ch << 6) | (access << 4) | (mode << 1) | bcd)
    if access in (1, 3):
        bus.port_write(0x40 + ch, 1, count & 0xFF)
    if access in (2, 3):
        bus.port_write(0x40 + ch, 1, (count >> 8) & 0xFF)


def latch_read(bus, ch):
    bus.port_write(0x43, 1, ch << 6)  # counter latch
    lo = bus.port_read(0x40 + ch, 1)
    hi = bus.port_read(0x40 + ch, 1)
    return lo | hi << 8


def test_mode2_count_via_latch_and_irq_rate():
    clock, bus, pit, sink = make()
    assert sink.rises == 1 and sink.level  # reset state: mode 3 with OUT high, as QEMU
    program(bus, 0, 2, 1193)  # ~1 kHz, Linux/BIOS style 0x34
    assert not sink.level  # mode 2 OUT is low between reloads (QEMU's model)
    sink.rises = 0
    clock.advance(ticks_ns(100))
    assert latch_read(bus, 0) == 1193 - 100
    clock.advance(ticks_ns(1193) - ticks_ns(100))
    assert sink.rises == 1 and not sink.level
    # exactly one IRQ per period: 1000 periods of 1193 ticks = 1193000 ticks
    clock.advance(ticks_ns(1193 * 1000) - ticks_ns(1193))
    assert sink.rises == 1000
    assert 999_000 * US <= clock.now() <= 1_000_000 * US


def test_mode3_square_wave_counts_by_two():
    clock, bus, pit, sink = make()
    program(bus, 0, 2, 1000)
    program(bus, 0, 3, 1000)
    assert sink.level  # first half of the period: high
    sink.rises = 0
    clock.advance(ticks_ns(100))
    assert latch_read(bus, 0) == 1000 - 200
    clock.advance(ticks_ns(600) - ticks_ns(100))
    assert not pit.channels[0].get_out(clock.now()) and not sink.level
    clock.advance(ticks_ns(10_000) - ticks_ns(600))
    assert sink.rises == 10


def test_mode0_one_shot_interrupt_on_terminal_count():
    clock, bus, pit, sink = make()
    program(bus, 0, 0, 5000)
    assert not sink.level
    sink.rises = 0
    clock.advance(ticks_ns(4999))
    assert sink.rises == 0 and latch_read(bus, 0) == 1
    clock.advance(ticks_ns(5000) - ticks_ns(4999))
    assert sink.rises == 1 and sink.level  # OUT stays high
    clock.advance(10 * MS)
    assert sink.rises == 1
    # counter wraps and keeps counting down after terminal count
    assert latch_read(bus, 0) == (5000 - (ticks_ns(5000) + 10 * MS) * PIT_FREQ // NS_PER_SEC) % 65536


def test_mode4_linux_oneshot_strobe():
    clock, bus, pit, sink = make()
    bus.port_write(0x43, 1, 0x38)  # Linux: ch0, LSB/MSB, mode 4
    bus.port_write(0x40, 1, 0xE8)
    bus.port_write(0x40, 1, 0x03)  # 1000 ticks
    sink.rises = 0
    clock.advance(ticks_ns(999))
    assert sink.rises == 0
    clock.advance(ticks_ns(1000) - ticks_ns(999))
    assert sink.rises == 1 and not sink.level
    clock.advance(5 * MS)
    assert sink.rises == 1


def test_lsb_only_msb_only_and_bcd():
    clock, bus, pit, _ = make(with_irq=False)
    program(bus, 2, 0, 0x80, access=1)  # LSB only
    assert pit.channels[2].count == 0x80
    program(bus, 2, 0, 0x1200, access=2)  # MSB only
    assert pit.channels[2].count == 0x1200
    bus.port_write(0x43, 1, 0x70 | 0x01 | (0 << 1))  # ch1 mode 0 BCD word
    bus.port_write(0x41, 1, 0x34)
    bus.port_write(0x41, 1, 0x12)  # BCD 1234
    assert pit.channels[1].count == 1234
    clock.advance(ticks_ns(34))
    assert latch_read(bus, 1) == 0x1200  # read back in BCD


def test_reset_access_mode_reads_and_writes_lsb():
    clock, bus, pit, _ = make(with_irq=False)
    bus.port_write(0x41, 1, 0x40)  # access mode 0 after reset: a write loads the LSB
    assert pit.channels[1].count == 0x40
    assert bus.port_read(0x41, 1) == 0x40 and bus.port_read(0x41, 1) == 0x40
    assert bus.port_read(0x43, 1) == 0


def test_latch_holds_value_until_read_and_unlatched_reads_are_live():
    clock, bus, pit, _ = make(with_irq=False)
    program(bus, 0, 2, 50000)
    bus.port_write(0x43, 1, 0x00)
    clock.advance(ticks_ns(1000))
    bus.port_write(0x43, 1, 0x00)  # second latch ignored until the first is read
    lo = bus.port_read(0x40, 1)
    hi = bus.port_read(0x40, 1)
    assert lo | hi << 8 == 50000
    lo = bus.port_read(0x40, 1)
    hi = bus.port_read(0x40, 1)
    assert lo | hi << 8 == 50000 - 1000


def test_read_back_status_and_count():
    clock, bus, pit, _ = make(with_irq=False)
    program(bus, 2, 0, 0xFFFF)
    clock.advance(ticks_ns(10))
    bus.port_write(0x43, 1, 0xC8)  # read-back ch2: count and status
    status = bus.port_read(0x42, 1)
    assert status == (0 << 7) | (3 << 4) | (0 << 1)  # OUT low, word, mode 0
    count = bus.port_read(0x42, 1) | bus.port_read(0x42, 1) << 8
    assert count == 0xFFFF - 10  # counts whatever the gate, as QEMU
    bus.port_write(0x43, 1, 0x32)  # ch0 mode 1 word, no count yet: applies to the running count
    bus.port_write(0x43, 1, 0xE2)  # status only of ch0
    assert bus.port_read(0x40, 1) == 0x80 | (3 << 4) | (1 << 1)  # mode 1: OUT high before TC
    bus.port_write(0x43, 1, 0xD2)  # count only of ch0
    c = bus.port_read(0x40, 1) | bus.port_read(0x40, 1) << 8
    assert c == (0x10000 - 10) & 0xFFFF


def test_port61_gate_out2_calibration_loop_and_refresh_toggle():
    clock, bus, pit, _ = make(with_irq=False)
    assert bus.port_read(0x61, 1) & 0x01 == 0
    val = bus.port_read(0x61, 1)
    bus.port_write(0x61, 1, (val & ~0x02) | 0x01)  # gate on, speaker off
    bus.port_write(0x43, 1, 0xB0)  # ch2 mode 0 word (Linux's pit_calibrate_tsc)
    bus.port_write(0x42, 1, 0xFF)
    bus.port_write(0x42, 1, 0xFF)
    assert bus.port_read(0x61, 1) & 0x20 == 0
    clock.advance(ticks_ns(0xFFFF) - 1)
    assert bus.port_read(0x61, 1) & 0x20 == 0
    clock.advance(1)
    assert bus.port_read(0x61, 1) & 0x21 == 0x21
    bits = [bus.port_read(0x61, 1) & 0x10 for _ in range(4)]
    assert bits in ([0, 0x10, 0, 0x10], [0x10, 0, 0x10, 0])
    bus.port_write(0x61, 1, 0x0F)
    assert bus.port_read(0x61, 1) & 0x0F == 0x03  # bits 2-3 do not read back


def test_reset_state_ticks_at_18hz_and_pause_stops_time():
    clock, bus, pit, sink = make()
    sink.rises = 0
    clock.advance(NS_PER_SEC)
    assert sink.rises == 18  # 1193182 / 65536 = 18.2 Hz
    clock.pause()
    assert not clock.running


def test_hostile_writes_do_not_raise():
    clock, bus, pit, _ = make()
    for v in range(256):
        bus.port_write(0x43, 1, v)
        bus.port_write(0x40, 1, v)
        bus.port_write(0x42, 1, v)
        bus.port_read(0x40, 1)
        bus.port_read(0x43, 1)
    clock.advance(MS)


def test_channel2_gate_retriggers_mode1():
    clock, bus, pit, _ = make(with_irq=False)
    program(bus, 2, 1, 1000)
    clock.advance(ticks_ns(500))
    assert latch_read(bus, 2) == 500 and bus.port_read(0x61, 1) & 0x20  # OUT high before TC
    bus.port_write(0x61, 1, 0x01)  # gate rises: counting restarts from the count
    clock.advance(ticks_ns(400))
    assert latch_read(bus, 2) == 600
    clock.advance(ticks_ns(1000) - ticks_ns(400))
    assert not bus.port_read(0x61, 1) & 0x20  # terminal count: OUT low (QEMU's mode 1)


def test_late_timer_thread_still_delivers_the_pulse():
    clock, bus, pit, sink = make()
    program(bus, 0, 2, 100)
    sink.rises = 0
    clock.advance(ticks_ns(100) * 50)  # one step over 50 periods: every period still fires in order
    assert sink.rises == 50

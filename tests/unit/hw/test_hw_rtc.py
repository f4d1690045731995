"""MC146818 RTC/CMOS through ports 0x70/0x71 on a manual virtual clock."""

import calendar

import pytest

from emu.errors import ConfigError
from emu.hw.bus import IOBus
from emu.hw.clock import NS_PER_SEC, VirtualClock
from emu.hw.irq import IrqLine
from emu.hw.pc.rtc import Rtc

MS = 1_000_000
# 2026-12-02 10:59:58 UTC, a Wednesday
T0 = calendar.timegm((2026, 12, 2, 10, 59, 58))


class Level:
    def __init__(self):
        self.level = False
        self.rises = 0

    def set_irq(self, irq, level):
        if level and not self.level:
            self.rises += 1
        self.level = level


def make(t=T0):
    clock = VirtualClock(manual=True)
    bus = IOBus()
    irq = Level()
    rtc = Rtc(clock, IrqLine(irq, 8), start_time=t)
    rtc.register(bus)
    return clock, bus, rtc, irq


def cmos(bus, idx):
    bus.port_write(0x70, 1, idx)
    return bus.port_read(0x71, 1)


def cmos_w(bus, idx, v):
    bus.port_write(0x70, 1, idx)
    bus.port_write(0x71, 1, v)


def test_time_in_bcd_24h_then_binary_and_12h():
    clock, bus, rtc, _ = make()
    assert cmos(bus, 0x0B) == 0x02  # 24h, BCD
    assert [cmos(bus, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32, 0x37)] == [0x58, 0x59, 0x10, 0x04, 0x02, 0x12, 0x26, 0x20, 0x20]
    cmos_w(bus, 0x0B, 0x06)  # binary
    assert [cmos(bus, i) for i in (0, 2, 4, 7, 8, 9)] == [58, 59, 10, 2, 12, 26]
    clock.advance(2 * NS_PER_SEC + 2 * 3600 * NS_PER_SEC)  # 13:00:00
    cmos_w(bus, 0x0B, 0x00)  # BCD, 12h
    assert cmos(bus, 4) == 0x80 | 0x01  # 1 PM
    assert cmos(bus, 2) == 0x00 and cmos(bus, 0) == 0x00


def test_time_advances_with_virtual_clock_and_stops_when_paused():
    clock, bus, rtc, _ = make()
    clock.advance(3 * NS_PER_SEC)
    assert cmos(bus, 0) == 0x01 and cmos(bus, 2) == 0x00 and cmos(bus, 4) == 0x11


def test_uip_in_last_244us_before_update():
    clock, bus, rtc, _ = make()
    assert cmos(bus, 0x0A) == 0x26
    clock.advance(NS_PER_SEC - 250_000)
    assert cmos(bus, 0x0A) & 0x80 == 0
    clock.advance(10_000)
    assert cmos(bus, 0x0A) == 0xA6
    clock.advance(240_000)
    assert cmos(bus, 0x0A) & 0x80 == 0 and cmos(bus, 0) == 0x59


def test_periodic_interrupt_rate_and_register_c_clearing():
    clock, bus, rtc, irq = make()
    cmos_w(bus, 0x0A, 0x26)  # 1024 Hz
    cmos_w(bus, 0x0B, 0x02 | 0x40)  # PIE
    count = 0
    for _ in range(1000):  # 1000 * 0.5 ms = 0.5 s -> 512 periods
        clock.advance(MS // 2)
        if irq.level:
            c = cmos(bus, 0x0C)
            assert c & 0xC0 == 0xC0
            assert not irq.level
            count += 1
    assert count == 512
    assert cmos(bus, 0x0C) == 0  # read clears
    cmos_w(bus, 0x0A, 0x2F)  # rate 15: 2 Hz
    clock.advance(NS_PER_SEC // 2)
    assert irq.rises == 513
    clock.advance(NS_PER_SEC // 2)
    assert irq.rises == 513  # IRQF still set: no new edge until register C is read
    cmos(bus, 0x0C)
    clock.advance(NS_PER_SEC // 2)
    assert irq.rises == 514


def test_no_pf_without_pie_as_qemu():
    clock, bus, rtc, irq = make()
    cmos(bus, 0x0C)
    clock.advance(2 * MS)  # two 1024 Hz periods
    assert cmos(bus, 0x0C) == 0x00
    assert irq.rises == 0


def test_update_ended_and_alarm_interrupts():
    clock, bus, rtc, irq = make()
    cmos_w(bus, 0x0B, 0x02 | 0x10)  # UIE
    clock.advance(NS_PER_SEC)  # 10:59:59
    assert irq.level
    assert cmos(bus, 0x0C) == 0x90 and not irq.level
    # alarm at 11:00:03 (BCD), hours "don't care"
    cmos_w(bus, 0x0B, 0x02 | 0x20)  # AIE only
    cmos(bus, 0x0C)
    cmos_w(bus, 0x01, 0x03)
    cmos_w(bus, 0x03, 0x00)
    cmos_w(bus, 0x05, 0xC0)
    clock.advance(3 * NS_PER_SEC)  # 11:00:02
    assert not irq.level
    assert cmos(bus, 0x0C) & 0x20 == 0
    clock.advance(NS_PER_SEC)
    assert irq.level and cmos(bus, 0x0C) & 0xA0 == 0xA0


def test_set_bit_freezes_and_guest_sets_time():
    clock, bus, rtc, _ = make()
    cmos_w(bus, 0x0B, 0x82 | 0x10)  # SET (UIE is cleared by SET)
    assert cmos(bus, 0x0B) == 0x82
    cmos_w(bus, 0x04, 0x23)
    cmos_w(bus, 0x02, 0x30)
    cmos_w(bus, 0x00, 0x00)
    cmos_w(bus, 0x09, 0x30)
    clock.advance(5 * NS_PER_SEC)
    assert cmos(bus, 0x00) == 0x00  # frozen
    cmos_w(bus, 0x0B, 0x02)
    clock.advance(5 * NS_PER_SEC)
    assert [cmos(bus, i) for i in (4, 2, 0, 9, 8, 7)] == [0x23, 0x30, 0x05, 0x30, 0x12, 0x02]


def test_register_d_and_cmos_ram_and_nmi_bit():
    clock, bus, rtc, _ = make()
    assert cmos(bus, 0x0D) == 0x80
    cmos_w(bus, 0x0D, 0)
    assert cmos(bus, 0x0D) == 0x80
    cmos_w(bus, 0x40, 0x5A)
    bus.port_write(0x70, 1, 0x80 | 0x40)  # NMI disabled, index 0x40
    assert rtc.nmi_disabled and bus.port_read(0x71, 1) == 0x5A
    assert bus.port_read(0x70, 1) == 0xFF


def test_pc_cmos_config_fields():
    clock, bus, rtc, _ = make()
    rtc.set_pc_config(32 * 1024 * 1024, hard_disks=[(1024, 16, 63)], boot_order="cd")
    assert cmos(bus, 0x15) | cmos(bus, 0x16) << 8 == 640
    assert cmos(bus, 0x17) | cmos(bus, 0x18) << 8 == 31 * 1024
    assert cmos(bus, 0x30) | cmos(bus, 0x31) << 8 == 31 * 1024
    assert cmos(bus, 0x34) | cmos(bus, 0x35) << 8 == 256
    assert [cmos(bus, i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]
    assert cmos(bus, 0x3D) == 0x32 and cmos(bus, 0x38) == 0x00
    assert cmos(bus, 0x14) == 0x06
    assert cmos(bus, 0x12) == 0xF0 and cmos(bus, 0x19) == 47 and cmos(bus, 0x1A) == 0
    assert [cmos(bus, 0x1B + i) for i in range(9)] == [0x00, 0x04, 16, 0xFF, 0xFF, 0xC8, 0x00, 0x04, 63]
    assert cmos(bus, 0x39) == 0x00
    rtc.set_pc_config(32 * 1024 * 1024, hard_disks=[None, (16383, 16, 63), (100, 4, 17, 2)])
    assert cmos(bus, 0x39) == (1 << 2) | (2 << 4)  # slave auto -> LBA, secondary master LARGE
    assert cmos(bus, 0x12) == 0x0F and cmos(bus, 0x19) == 0 and cmos(bus, 0x1A) == 47
    rtc.set_pc_config(6 * 1024**3)
    assert cmos(bus, 0x17) | cmos(bus, 0x18) << 8 == 65535
    assert cmos(bus, 0x34) | cmos(bus, 0x35) << 8 == (0xC0000000 - 16 * 1024 * 1024) // 65536
    high = cmos(bus, 0x5B) | cmos(bus, 0x5C) << 8 | cmos(bus, 0x5D) << 16
    assert high == (6 * 1024**3 - 0xC0000000) // 65536
    with pytest.raises(ConfigError, match="Too many boot devices for PC"):
        rtc.set_boot_order("cdna")
    with pytest.raises(ConfigError, match="Invalid boot device for PC: 'z'"):
        rtc.set_boot_order("z")


def test_hostile_writes_never_raise():
    clock, bus, rtc, _ = make()
    for idx in range(0x10):
        for v in (0x00, 0x7F, 0x99, 0xFF):
            cmos_w(bus, idx, v)
            cmos(bus, idx)
    clock.advance(3 * NS_PER_SEC)
    cmos_w(bus, 0x0B, 0x02)
    cmos(bus, 0)

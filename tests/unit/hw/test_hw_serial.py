"""16550A UART through the port bus: probing as Linux does, divisor, loopback, FIFO, interrupts."""

import io
import os

from emu.hw.bus import IOBus
from emu.hw.clock import VirtualClock
from emu.hw.irq import IrqLine
from emu.hw.pc.serial import COM1, FileBackend, Serial16550

US = 1000


class Level:
    def __init__(self):
        self.level = False
        self.rises = 0

    def set_irq(self, irq, level):
        if level and not self.level:
            self.rises += 1
        self.level = level


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


def make():
    clock = VirtualClock(manual=True)
    bus = IOBus()
    irq = Level()
    out = Sink()
    uart = Serial16550(IrqLine(irq, 4), clock, out)
    uart.register(bus)
    return clock, bus, uart, irq, out


def rd(bus, off):
    return bus.port_read(COM1 + off, 1)


def wr(bus, off, v):
    bus.port_write(COM1 + off, 1, v)


def test_reset_values_and_linux_autoconfig_probe():
    clock, bus, uart, irq, out = make()
    assert rd(bus, 5) == 0x60  # THRE | TEMT
    assert rd(bus, 6) == 0xB0  # DCD DSR CTS
    assert rd(bus, 4) == 0x08  # OUT2 after reset, as QEMU
    assert rd(bus, 2) == 0x01  # no interrupt
    # IER test: bits 0-3 stick, upper bits read 0
    wr(bus, 1, 0x00)
    assert rd(bus, 1) == 0
    wr(bus, 1, 0xFF)
    assert rd(bus, 1) == 0x0F
    wr(bus, 1, 0)
    # scratch register
    for v in (0xA5, 0x5A):
        wr(bus, 7, v)
        assert rd(bus, 7) == v
    # FIFO: IIR bits 7-6 set -> 16550A
    wr(bus, 2, 0x01)
    assert rd(bus, 2) & 0xC0 == 0xC0
    wr(bus, 2, 0x00)
    assert rd(bus, 2) & 0xC0 == 0


def test_divisor_latch_and_lcr():
    clock, bus, uart, irq, out = make()
    wr(bus, 3, 0x80)  # DLAB
    wr(bus, 0, 0x01)
    wr(bus, 1, 0x00)  # 115200 baud
    assert rd(bus, 0) == 0x01 and rd(bus, 1) == 0x00
    wr(bus, 3, 0x03)  # 8N1, DLAB off
    assert uart.divisor == 1 and rd(bus, 3) == 0x03
    wr(bus, 0, ord("A"))  # THR, not the divisor
    assert uart.divisor == 1 and bytes(out.data) == b"A"


def test_loopback_msr_and_data():
    clock, bus, uart, irq, out = make()
    wr(bus, 4, 0x10 | 0x0A)  # LOOP | RTS | OUT2  (Linux's check: MSR & 0xF0 == 0x90)
    assert rd(bus, 6) & 0xF0 == 0x90
    wr(bus, 4, 0x1F)
    assert rd(bus, 6) & 0xF0 == 0xF0
    wr(bus, 0, 0x55)
    assert out.data == b""  # loopback never reaches the line
    assert rd(bus, 5) & 0x01
    assert rd(bus, 0) == 0x55
    assert rd(bus, 5) & 0x01 == 0
    uart.receive(b"x")  # line input is ignored while looped back
    assert rd(bus, 5) & 0x01 == 0
    wr(bus, 4, 0x0B)
    assert rd(bus, 6) & 0xF0 == 0xB0


def test_thre_interrupt_set_on_enable_and_cleared_by_iir_read():
    clock, bus, uart, irq, out = make()
    wr(bus, 1, 0x02)  # ETBEI with THR empty -> THRE interrupt at once
    assert irq.level and rd(bus, 2) == 0x02
    assert not irq.level and rd(bus, 2) == 0x01  # the IIR read cleared it
    wr(bus, 0, ord("h"))
    assert irq.level  # transmitted instantly -> THRE again
    wr(bus, 0, ord("i"))
    wr(bus, 1, 0x00)
    assert not irq.level and bytes(out.data) == b"hi"


def test_fifo_trigger_level_and_character_timeout():
    clock, bus, uart, irq, out = make()
    wr(bus, 3, 0x80)
    wr(bus, 0, 1)
    wr(bus, 3, 0x03)
    wr(bus, 2, 0xC7 & ~0x40)  # enable + clear, trigger 8 (0x80)
    assert uart.trigger_level == 8
    wr(bus, 1, 0x01)  # RDA interrupts
    uart.receive(b"abcde")  # below trigger
    assert not irq.level
    assert rd(bus, 5) & 0x01
    # character timeout: 4 char times at 115200 8N1 = 4 * 10 bits * 16 / 1.8432 MHz ~ 347 us
    clock.advance(340 * US)
    assert not irq.level
    clock.advance(10 * US)
    assert irq.level and rd(bus, 2) == 0xCC  # CTI, FIFO enabled
    assert bytes(rd(bus, 0) for _ in range(5)) == b"abcde"
    assert not irq.level and rd(bus, 2) == 0xC1
    uart.receive(b"0123456789")  # at/above trigger: RDA at once
    assert irq.level and rd(bus, 2) == 0xC4
    data = bytearray()
    while rd(bus, 5) & 0x01:
        data.append(rd(bus, 0))
    assert bytes(data) == b"0123456789" and not irq.level


def test_large_input_is_queued_not_overrun():
    clock, bus, uart, irq, out = make()
    wr(bus, 2, 0x01)
    payload = bytes(range(256)) * 4
    uart.receive(payload)
    assert len(uart.rx) == 16
    got = bytearray()
    while rd(bus, 5) & 0x01:
        got.append(rd(bus, 0))
    assert bytes(got) == payload and rd(bus, 5) & 0x02 == 0


def test_non_fifo_mode_one_byte_at_a_time_and_priority():
    clock, bus, uart, irq, out = make()
    wr(bus, 1, 0x03)  # RDA + THRE
    assert rd(bus, 2) == 0x02
    uart.receive(b"QR")
    assert rd(bus, 2) == 0x04  # RDA outranks THRE
    assert rd(bus, 0) == ord("Q")
    assert rd(bus, 0) == ord("R")
    assert rd(bus, 2) == 0x01  # THRE was cleared by the first IIR read


def test_loopback_overrun_sets_oe_and_lsr_interrupt():
    clock, bus, uart, irq, out = make()
    wr(bus, 4, 0x10)
    wr(bus, 1, 0x04)  # line status interrupts
    wr(bus, 0, 1)
    wr(bus, 0, 2)  # non-FIFO: second byte overruns
    assert irq.level and rd(bus, 2) == 0x06
    assert rd(bus, 5) & 0x02
    assert rd(bus, 5) & 0x02 == 0 and not irq.level
    assert rd(bus, 0) == 2


def test_loopback_msr_has_no_deltas_and_no_msi_as_qemu():
    clock, bus, uart, irq, out = make()
    wr(bus, 1, 0x08)
    wr(bus, 4, 0x10)
    assert rd(bus, 6) == 0x00
    wr(bus, 4, 0x12)  # RTS -> CTS
    assert rd(bus, 6) == 0x10 and not irq.level
    wr(bus, 4, 0x08)
    assert rd(bus, 6) == 0xB0


def test_file_backend_stdio_like(tmp_path):
    r, w = os.pipe()
    outbuf = io.BytesIO()
    backend = FileBackend(outbuf, os.fdopen(r, "rb", buffering=0))
    bus = IOBus()
    uart = Serial16550(None, None, backend)
    uart.register(bus)
    for ch in b"ok\n":
        bus.port_write(COM1, 1, ch)
    assert outbuf.getvalue() == b"ok\n"
    os.write(w, b"cmd\n")
    os.close(w)
    backend._thread.join(5)
    got = bytearray()
    while bus.port_read(COM1 + 5, 1) & 1:
        got.append(bus.port_read(COM1, 1))
    assert bytes(got) == b"cmd\n"
    fb = FileBackend.open_file(str(tmp_path / "log"))
    fb.write(b"abc")
    fb.close()
    assert (tmp_path / "log").read_bytes() == b"abc"


def test_chardev_style_backend_gets_receiver():
    class Chardevish:
        def __init__(self):
            self.out = bytearray()
            self.receiver = None

        def set_receiver(self, fn):
            self.receiver = fn

        def write(self, data):
            self.out += data

    cd = Chardevish()
    bus = IOBus()
    uart = Serial16550(None, None, cd)
    uart.register(bus)
    cd.receiver(b"z")
    assert bus.port_read(COM1, 1) == ord("z")
    bus.port_write(COM1, 1, ord("y"))
    assert cd.out == b"y"

"""Hostile queues: the device fails the request (IOERR) or asks for a reset (NEEDS_RESET),
never raises, and answers a reset afterwards."""

from __future__ import annotations

import struct
import time

import pytest

from emu.block.qcow2.create import create_qcow2
from virtio_driver import (DATA, F_INDIRECT, F_NEXT, F_WRITE, HDR, INDIRECT, NEEDS_RESET, RAM_SIZE, S_IOERR,
                           S_OK, STATUS, T_IN, T_OUT, Driver, Machine)

SIZE = 4 << 20


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("hostile") / "d.qcow2")
    create_qcow2(p, SIZE)
    m = Machine(p)
    yield m
    m.close()


def _hdr(d: Driver, rtype: int = T_IN, sector: int = 0) -> None:
    struct.pack_into("<IIQ", d.ram, HDR, rtype, 0, sector)
    d.ram[STATUS] = 0xFF


def _loop(d):
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 1)
    d.write_desc(d.desc, 1, DATA, 512, F_NEXT | F_WRITE, 0)
    d.publish(0)


def _self_loop(d):  # a chain longer than the queue
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 0)
    d.publish(0)


def _head_past_queue(d):
    d.publish(d.size + 44)


def _next_past_queue(d):
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 500)
    d.publish(0)


def _bad_avail_idx(d):
    d.avail_idx = (d.avail_idx + d.size + 1) & 0xFFFF
    d.put_u16(d.avail + 2, d.avail_idx)


def _no_status(d):
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 1)
    d.write_desc(d.desc, 1, DATA, 512, 0, 0)
    d.publish(0)


def _status_past_ram(d):
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 1)
    d.write_desc(d.desc, 1, RAM_SIZE + 4096, 1, F_WRITE, 0)
    d.publish(0)


def _zero_sized(d):
    d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 1)
    d.write_desc(d.desc, 1, DATA, 0, F_NEXT | F_WRITE, 2)
    d.write_desc(d.desc, 2, STATUS, 1, F_WRITE, 0)
    d.publish(0)


def _nested_indirect(d):
    d.write_desc(INDIRECT, 0, INDIRECT + 0x100, 32, F_INDIRECT, 0)
    d.write_desc(d.desc, 0, INDIRECT, 16, F_INDIRECT, 0)
    d.publish(0)


def _indirect_past_ram(d):
    d.write_desc(d.desc, 0, RAM_SIZE - 16, 64, F_INDIRECT, 0)
    d.publish(0)


def _writable_then_readable(d):
    d.write_desc(d.desc, 0, DATA, 512, F_NEXT | F_WRITE, 1)
    d.write_desc(d.desc, 1, HDR, 16, F_NEXT, 2)
    d.write_desc(d.desc, 2, STATUS, 1, F_WRITE, 0)
    d.publish(0)


def _short_header(d):
    d.write_desc(d.desc, 0, HDR, 8, F_NEXT, 1)
    d.write_desc(d.desc, 1, STATUS, 1, F_WRITE, 0)
    d.publish(0)


def _rings_past_ram(d):
    d.set_status(0)  # set the queue up again, its rings at 4 GiB
    for v in (1, 3):
        d.set_status(v)
    d.common_w(0x0C, 4, 0)
    d.common_w(0x08, 4, 1)
    d.common_w(0x0C, 4, 1)
    d.set_status(0xB)
    d.common_w(0x16, 2, 0)
    for off in (0x20, 0x28, 0x30):
        d.common_w(off, 4, 0)
        d.common_w(off + 4, 4, 1)
    d.common_w(0x1C, 2, 1)
    d.set_status(0xF)


def _enable_zero(d):
    d.common_w(0x1C, 2, 0)


FATAL = [_loop, _self_loop, _head_past_queue, _next_past_queue, _bad_avail_idx, _no_status,
         _status_past_ram, _zero_sized, _nested_indirect, _indirect_past_ram, _writable_then_readable,
         _short_header, _rings_past_ram, _enable_zero]


def _wait_status(d: Driver, bit: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not d.status() & bit:
        assert time.monotonic() < end, f"status 0x{d.status():x} never got 0x{bit:x}"
        time.sleep(0.001)


@pytest.mark.parametrize("attack", FATAL, ids=[f.__name__.strip("_") for f in FATAL])
def test_fatal_queue_faults_need_reset(machine, attack):
    m = machine
    d = Driver(m, True)
    d.read_isr()
    _hdr(d)
    attack(d)
    d.notify()
    _wait_status(d, NEEDS_RESET)
    assert d.used_idx() == 0 and m.ram[STATUS] == 0xFF  # nothing completed
    assert m.irq_pending() and d.read_isr() == 2  # configuration-change interrupt
    # the queue is stopped: a good request now is ignored until the reset
    if attack not in (_rings_past_ram, _enable_zero):
        d.next_desc = 8
        d.request(T_IN, sector=0, in_len=512, wait=False)
        time.sleep(0.05)
        assert d.used_idx() == 0
    # the device still answers a reset, and works again
    d = Driver(m, True)
    assert d.status() == 0xF
    assert d.request(T_OUT, sector=3, out=b"\x42" * 512)[0] == S_OK
    st, data, _ = d.request(T_IN, sector=3, in_len=512)
    assert st == S_OK and data == b"\x42" * 512


@pytest.mark.parametrize("attack", [_loop, _no_status, _head_past_queue], ids=["loop", "no_status", "head"])
def test_legacy_faults_stop_the_queue(machine, attack):
    """A legacy driver has no NEEDS_RESET bit: the queue stops, status stays, a reset revives it."""
    m = machine
    d = Driver(m, False)
    _hdr(d)
    attack(d)
    d.notify()
    time.sleep(0.02)
    assert d.status() == 7 and d.used_idx() == 0
    assert m.fn.device.broken
    d = Driver(m, False)
    assert d.request(T_IN, sector=3, in_len=512)[0] == S_OK


@pytest.mark.parametrize("buf", [(RAM_SIZE - 256, 512), (0x400000, 0xFFFFFFFF), (1 << 40, 512)],
                         ids=["straddles_end", "huge_length", "far_address"])
@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_buffers_outside_ram_get_ioerr(machine, buf, modern):
    m = machine
    d = Driver(m, modern)
    for writable in (True, False):
        _hdr(d, T_IN if writable else T_OUT, 3)
        addr, n = buf
        d.write_desc(d.desc, 0, HDR, 16, F_NEXT, 1)
        d.write_desc(d.desc, 1, addr, n, F_NEXT | (F_WRITE if writable else 0), 2)
        d.write_desc(d.desc, 2, STATUS, 1, F_WRITE, 0)
        d.publish(0)
        d.notify()
        d.wait_used()
        assert m.ram[STATUS] == S_IOERR
    assert not d.status() & NEEDS_RESET
    d.next_desc = 4
    assert d.request(T_IN, sector=3, in_len=512)[0] == S_OK  # no reset needed


def test_reset_drops_completions_in_flight(machine):
    """A request held in the backend when the driver resets never touches RAM afterwards."""
    m = machine
    d = Driver(m, True)
    m.blk.drain()
    d.request(T_IN, sector=3, in_len=512, wait=False)
    d.set_status(0)
    m.blk.resume()
    m.blk.drain()  # returns once the held read has completed (its callback ran)
    m.blk.resume()
    assert d.used_idx() == 0 and m.ram[STATUS] == 0xFF and not m.irq_pending()

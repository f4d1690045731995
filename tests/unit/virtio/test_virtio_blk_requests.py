"""virtio-blk-pci driven like Linux's virtio_pci (legacy and modern) through the real buses."""

from __future__ import annotations

import subprocess

import pytest

from conftest import requires_qemu_io
from emu.block.qcow2.create import create_qcow2
from virtio_driver import (DATA, EVENT_IDX, HDR, INDIRECT_DESC, S_IOERR, S_OK, S_UNSUPP, STATUS, T_DISCARD,
                           T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, VERSION_1, Driver, Machine)

SIZE = 16 << 20


@pytest.fixture
def qcow(tmp_path):
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, SIZE)
    return p


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "d.raw"
    p.write_bytes(b"\x11" * SIZE)
    return str(p)


def qemu_io_pattern(path: str, fmt: str, offset: int, length: int, pattern: int) -> bool:
    r = subprocess.run(["qemu-io", "-f", fmt, "-r", "-c", f"read -P 0x{pattern:02x} {offset} {length}", path],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr


@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_negotiation_and_config(qcow, modern):
    m = Machine(qcow)
    try:
        d = Driver(m, modern)
        if modern:
            assert d.offered == 0x10130006E54  # QEMU 7.2: + VERSION_1, RING_RESET; no legacy-only bits
            assert d.size == 256
        else:
            assert d.offered == 0x79006E54  # QEMU 7.2's legacy HOST_FEATURES for this disk
            assert d.size == 256
        assert d.status() == (0xF if modern else 0x7)
        assert d.config(0, 8) == SIZE // 512  # capacity
        assert d.config(12, 4) == 254  # seg_max
        assert (d.config(16, 2), d.config(18, 1), d.config(19, 1)) == (32, 16, 63)  # geometry
        assert d.config(20, 4) == 512 and d.config(32, 1) == 1 and d.config(34, 2) == 1
        assert d.config(36, 4) == 0x3FFFFF and d.config(40, 4) == 1 and d.config(56, 1) == 1
        assert d.config(57, 1) == 0xFF  # past QEMU 7.2's 57-byte config
        # a driver without FLUSH gets a write-through device, and reset restores the write cache
        d2 = Driver(m, modern, features=d.offered & ~(1 << 9))
        assert d2.config(32, 1) == 0
        d2.set_status(0)
        assert d2.config(32, 1) == 1 and d2.status() == 0
    finally:
        m.close()


@requires_qemu_io
@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_read_write_flush_get_id(qcow, modern):
    m = Machine(qcow, serial="SN-virtio-0123456789abcdef")
    try:
        d = Driver(m, modern)
        st, _, ulen = d.request(T_OUT, sector=8, out=b"\x5A" * 4096)
        assert (st, ulen) == (S_OK, 1)
        st, data, ulen = d.request(T_IN, sector=8, in_len=4096, split=1000)
        assert (st, ulen) == (S_OK, 4097) and data == b"\x5A" * 4096
        assert any(a <= DATA < a + n for a, n in m.invalidated)  # DMA into RAM invalidates code
        st, data, _ = d.request(T_IN, sector=7, in_len=512)
        assert st == S_OK and data == bytes(512)  # neighbour untouched
        assert d.request(T_FLUSH)[0] == S_OK
        st, data, _ = d.request(T_GET_ID, in_len=20)
        assert st == S_OK and data == b"SN-virtio-0123456789"  # 20 bytes, no NUL
        st, data, _ = d.request(T_GET_ID, in_len=4)
        assert data == b"SN-v"
        # the INTx line: raised at completion, lowered by reading ISR
        assert m.irq_pending() and m.fn.irq_level
        assert d.read_isr() == 1
        assert not m.irq_pending() and not m.fn.irq_level
        assert d.read_isr() == 0
        # guest errors: past the end, unaligned length, unknown type
        assert d.request(T_IN, sector=SIZE // 512, in_len=512)[0] == S_IOERR
        assert d.request(T_OUT, sector=SIZE // 512 - 1, out=b"x" * 1024)[0] == S_IOERR
        assert d.request(T_OUT, sector=0, out=b"x" * 100)[0] == S_IOERR
        assert d.request(0x20, in_len=512)[0] == S_UNSUPP
        m.blk.flush()
        assert m.blk.in_flight == 0
    finally:
        m.close()
    assert qemu_io_pattern(qcow, "qcow2", 8 * 512, 4096, 0x5A)
    assert qemu_io_pattern(qcow, "qcow2", 0, 8 * 512, 0)
    assert qemu_io_pattern(qcow, "qcow2", 8 * 512 + 4096, 65536, 0)


@requires_qemu_io
def test_indirect_discard_write_zeroes_raw(raw):
    m = Machine(raw, fmt="raw", disable_legacy=True)
    try:
        d = Driver(m, True)
        assert d.accepted >> INDIRECT_DESC & 1
        st, _, _ = d.request(T_OUT, sector=100, out=b"\x77" * 8192, indirect=True, split=512)
        assert st == S_OK
        st, data, _ = d.request(T_IN, sector=100, in_len=8192, indirect=True, split=3000)
        assert st == S_OK and data == b"\x77" * 8192
        seg = lambda sector, n, flags: (sector.to_bytes(8, "little") + n.to_bytes(4, "little")
                                        + flags.to_bytes(4, "little"))
        assert d.request(T_WRITE_ZEROES, out=seg(104, 4, 1))[0] == S_OK  # with UNMAP
        assert d.request(T_WRITE_ZEROES, out=seg(110, 2, 0))[0] == S_OK
        st, data, _ = d.request(T_IN, sector=100, in_len=8192)
        assert data == b"\x77" * 2048 + bytes(2048) + b"\x77" * 1024 + bytes(1024) + b"\x77" * 2048
        assert d.request(T_DISCARD, out=seg(200, 8, 0))[0] == S_OK
        assert d.request(T_DISCARD, out=seg(200, 8, 1))[0] == S_UNSUPP  # UNMAP on discard
        assert d.request(T_WRITE_ZEROES, out=seg(0, 1, 2))[0] == S_UNSUPP  # unknown flag
        assert d.request(T_WRITE_ZEROES, out=seg(0, 1, 0) * 2)[0] == S_UNSUPP  # two segments
        assert d.request(T_WRITE_ZEROES, out=seg(SIZE // 512, 1, 0))[0] == S_IOERR
    finally:
        m.close()
    assert qemu_io_pattern(raw, "raw", 100 * 512, 2048, 0x77)
    assert qemu_io_pattern(raw, "raw", 104 * 512, 2048, 0)
    assert qemu_io_pattern(raw, "raw", 108 * 512, 1024, 0x77)
    assert qemu_io_pattern(raw, "raw", 110 * 512, 1024, 0)
    assert qemu_io_pattern(raw, "raw", 112 * 512, 2048, 0x77)
    assert qemu_io_pattern(raw, "raw", 99 * 512, 512, 0x11)
    assert qemu_io_pattern(raw, "raw", 116 * 512, 512, 0x11)


def test_event_idx_and_no_interrupt(qcow):
    m = Machine(qcow, disable_legacy=True)
    try:
        d = Driver(m, True)
        assert d.accepted >> EVENT_IDX & 1
        used_event = d.avail + 4 + 2 * d.size
        avail_event = d.used + 4 + 8 * d.size
        assert d.request(T_FLUSH)[0] == S_OK  # the first completion after reset always interrupts
        assert m.irq_pending() and d.read_isr() == 1
        d.put_u16(used_event, 5)  # "interrupt me when used entry 5 is written"
        for i in range(2, 6):
            assert d.request(T_FLUSH)[0] == S_OK
            assert not m.irq_pending(), f"interrupt after request {i}"
            assert d.u16(avail_event) == i  # device asks to be kicked at the next entry
        assert d.request(T_FLUSH)[0] == S_OK
        assert m.irq_pending() and d.read_isr() == 1
        # without event-idx, VRING_AVAIL_F_NO_INTERRUPT suppresses
        d = Driver(m, True, features=d.offered & ~(1 << EVENT_IDX))
        d.put_u16(d.avail, 1)
        assert d.request(T_FLUSH)[0] == S_OK and not m.irq_pending()
        d.put_u16(d.avail, 0)
        assert d.request(T_FLUSH)[0] == S_OK and m.irq_pending()
        # a smaller queue chosen by the driver
        d = Driver(m, True, qsize=16)
        for _ in range(20):  # wraps the 16-entry ring
            assert d.request(T_IN, sector=1, in_len=512)[0] == S_OK
    finally:
        m.close()


def test_async_io_keeps_vcpu_thread_free(qcow):
    """The notify returns before the backend's I/O completes; the completion comes later."""
    m = Machine(qcow)
    try:
        d = Driver(m, True)
        m.blk.drain()  # hold new requests, as a quiesce does
        d.request(T_OUT, sector=0, out=b"q" * 512, wait=False)
        assert d.used_idx() == 0 and m.ram[STATUS] == 0xFF and not m.irq_pending()
        m.blk.resume()
        (_, ulen), = d.wait_used()
        assert ulen == 1 and m.ram[STATUS] == S_OK and m.irq_pending()
    finally:
        m.close()


def test_queue_reset_and_pci_cfg_window(qcow):
    """VIRTIO_F_RING_RESET drops the queue (and what is in flight on it); the
    VIRTIO_PCI_CAP_PCI_CFG window reads the common configuration through config space."""
    m = Machine(qcow)
    try:
        d = Driver(m, True)
        cap = d.caps[5][2]
        m.cfg_write(cap + 4, 1, 4)  # bar
        m.cfg_write(cap + 8, 4, 0x12)  # offset: num_queues
        m.cfg_write(cap + 12, 4, 2)  # length
        assert m.cfg(cap + 16) == 1
        m.cfg_write(cap + 8, 4, 0x16)  # queue_select, written through the window
        m.cfg_write(cap + 16, 4, 1)
        assert d.common_r(0x16, 2) == 1
        d.common_w(0x16, 2, 0)
        m.blk.drain()
        d.request(T_IN, sector=0, in_len=512, wait=False)
        d.common_w(0x3A, 2, 1)  # queue_reset
        assert d.common_r(0x1C, 2) == 0 and d.common_r(0x20, 4) == 0
        m.blk.resume()
        m.blk.drain()
        m.blk.resume()
        assert d.used_idx() == 0 and m.ram[STATUS] == 0xFF
    finally:
        m.close()


def test_guest_toggles_write_cache(qcow):
    """VIRTIO_BLK_F_CONFIG_WCE: the writeback byte is the guest-visible write cache; the
    machine hears about changes; writes stay correct in write-through mode."""
    seen = []
    m = Machine(qcow)
    try:
        m.fn.device.on_write_cache = seen.append
        for modern in (False, True):
            d = Driver(m, modern)
            if modern:
                m.board.mmiobus.write(d.caps[4][0] + 32, 1, 0)
            else:
                m.board.iobus.port_write(d.base + 20 + 32, 1, 0)
            assert d.config(32, 1) == 0 and not m.fn.device.writeback
            assert d.request(T_OUT, sector=40, out=b"\x99" * 1024)[0] == S_OK
            st, data, _ = d.request(T_IN, sector=40, in_len=1024)
            assert st == S_OK and data == b"\x99" * 1024
            d.set_status(0)  # reset restores the configured write cache
            assert d.config(32, 1) == 1
        assert seen == [False, True, False, True]
    finally:
        m.close()


def test_config_change_interrupt(qcow):
    """What the machine calls after block_resize: ISR bit 1, the line, a new generation."""
    m = Machine(qcow)
    try:
        d = Driver(m, True)
        gen = d.common_r(0x15, 1)
        m.fn.device.config_changed()
        assert m.irq_pending() and d.read_isr() == 2 and not m.irq_pending()
        assert d.common_r(0x15, 1) == (gen + 1) & 0xFF
        d.set_status(0)
        m.fn.device.config_changed()  # no driver: no interrupt
        assert not m.irq_pending()
    finally:
        m.close()


def test_scsi_cmd_is_unsupported(qcow):
    """VIRTIO_BLK_T_SCSI_CMD as QEMU 7.2 with scsi=off: short chains IOERR; a full one UNSUPP
    with errors=255 in its virtio_scsi_inhdr."""
    m = Machine(qcow, disable_modern=True)
    try:
        d = Driver(m, False)
        assert d.request(2, in_len=64)[0] == S_IOERR
        st, data, _ = d.request(2, out=b"\x12" * 16, in_len=96 + 16, split=96)  # cdb; sense, scsi inhdr
        assert st == S_UNSUPP and data[96:100] == (255).to_bytes(4, "little")
    finally:
        m.close()

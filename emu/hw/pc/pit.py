"""Intel 8254 programmable interval timer at 0x40-0x43, and port 0x61.

Counters are not ticked: like QEMU's i8254 each channel remembers when its count
was loaded and derives the current count and OUT level from the virtual clock
(:mod:`emu.hw.clock`), so reading a counter costs O(1) and time stands still while
the VM is paused.  PIT ticks run at 1 193 182 Hz.

Guest-visible details follow QEMU 7.2 where it departs from the datasheet, because
test guests compare verdicts with QEMU (checked by tests/unit/hw/test_hw_qemu_compare.py):
OUT levels per mode (see :meth:`PitChannel.out_at`), the null-count status bit
(always 0), a control word that does not restart the count, the gate only
retriggering modes 1/2/3/5, access mode 0 after reset, reading 0x43 as 0, and
port 0x61's refresh bit flipping on every read.  BCD counting is implemented
(QEMU ignores the BCD bit).

* Channel 0: OUT drives IRQ 0.  A :class:`~emu.hw.clock.Timer` fires at each
  transition of OUT; the one-tick pulses of modes 2, 4 and 5 are delivered as a
  raise + lower at once (one timer event per period).  When the timer thread is
  late (host load) the missed periods merge into one, as the 8259's IRR would.
* Channel 1: a plain counter (DRAM refresh on the PC, unused by software).
* Channel 2: gate and OUT on port 0x61 (bits 0 and 5) — Linux calibrates the TSC
  by polling OUT2 in mode 0, BIOSes time delays with it.  Bit 1 is the speaker
  data enable (no sound).

Latch and read-back (count and status latches) and LSB/MSB/word access follow the
Intel 82C54 datasheet.
"""

from __future__ import annotations

import ctypes

from emu.hw import hot
from emu.hw.bus import IOBus
from emu.hw.clock import NS_PER_SEC, VirtualClock
from emu.hw.irq import IrqLine

PIT_BASE = 0x40
PORT_61 = 0x61
PIT_FREQ = 1193182

# Access modes (control word bits 5-4) and read/write states.
RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3
RW_WORD_MSB_NEXT = 4  # internal: the second byte of a word access

# Read-back command bits.
RB_NO_COUNT = 0x20
RB_NO_STATUS = 0x10

# Port 0x61 bits.
P61_GATE2 = 0x01
P61_SPEAKER = 0x02
P61_REFRESH = 0x10
P61_OUT2 = 0x20


def _bcd_to_bin(v: int) -> int:
    return ((v >> 12) & 0xF) * 1000 + ((v >> 8) & 0xF) * 100 + ((v >> 4) & 0xF) * 10 + (v & 0xF)


def _bin_to_bcd(v: int) -> int:
    v %= 10000
    return ((v // 1000) << 12) | (((v // 100) % 10) << 8) | (((v // 10) % 10) << 4) | (v % 10)


class PitChannel:
    """One counter.  ``count`` is the reload value in ticks (0 is loaded as 65536 or BCD 10000)."""

    def __init__(self, pit: "Pit", index: int) -> None:
        self.pit = pit
        self.index = index
        self.reset()

    def reset(self) -> None:
        """Power-on state as QEMU's: mode 3, access mode 0 (reads/writes act as LSB), count 65536."""
        self.gate = self.index != 2  # channels 0 and 1 are hard-wired to 1; channel 2 follows 0x61
        self.mode = 3
        self.bcd = False
        self.rw_mode = 0
        self.read_state = 0
        self.write_state = 0
        self.write_latch = 0
        self.count = 0x10000
        self.load_time = self.pit.clock.now()
        self.latched_count = 0
        self.count_latched = 0  # RW_* state of a pending count latch, 0 = none
        self.status = 0
        self.status_latched = False

    # ---- time ---------------------------------------------------------------------------------

    def elapsed(self, now: int) -> int:
        """PIT ticks since the count was loaded."""
        return (now - self.load_time) * PIT_FREQ // NS_PER_SEC

    def tick_time(self, ticks: int) -> int:
        """Virtual ns at which ``ticks`` ticks have elapsed since load."""
        return self.load_time + -(-ticks * NS_PER_SEC // PIT_FREQ)

    def get_count(self, now: int) -> int:
        """The counting element's value now (binary)."""
        d = self.elapsed(now)
        count = self.count
        mode = self.mode
        if mode in (0, 1, 4, 5):
            return (count - d) % (10000 if self.bcd else 0x10000)
        if mode == 3:
            return count - ((2 * d) % count)  # counts down by two, twice per period
        return count - (d % count)

    def out_at(self, d: int) -> bool:
        """OUT after ``d`` ticks, as QEMU's i8254 models it (guest-visible through the read-back
        status and port 0x61 bit 5, so it follows QEMU rather than the datasheet): mode 0 rises at
        terminal count; mode 1 is high until terminal count; modes 2, 4 and 5 are high for the one
        tick at each reload / terminal count; mode 3 is high for the first half of each period.
        """
        count = self.count
        mode = self.mode
        if mode == 0:
            return d >= count
        if mode == 1:
            return d < count
        if mode == 2:
            return d % count == 0 and d != 0
        if mode == 3:
            return d % count < (count + 1) >> 1
        return d == count  # modes 4 and 5

    def get_out(self, now: int) -> bool:
        """The OUT pin now."""
        return self.out_at(self.elapsed(now))

    def next_transition(self, d: int) -> int | None:
        """Tick count (since load) of the next change of OUT after ``d`` ticks, or None."""
        count = self.count
        mode = self.mode
        if mode in (0, 1):
            return count if d < count else None
        if mode == 2:
            base = d - d % count
            return base + 1 if d == base and d != 0 else base + count
        if mode == 3:
            base = d - d % count
            half = (count + 1) >> 1
            return base + half if d - base < half else base + count
        if d < count:  # modes 4 and 5
            return count
        return count + 1 if d == count else None

    # ---- programming ----------------------------------------------------------------------------

    def load_count(self, value: int) -> None:
        """A full count was written: (re)start counting from it."""
        if self.bcd:
            value = _bcd_to_bin(value)
            if value == 0:
                value = 10000
        elif value == 0:
            value = 0x10000
        self.count = value
        self.load_time = self.pit.clock.now()

    def control(self, val: int) -> None:
        """A control word for this channel (not the read-back command).

        As on QEMU, the new mode applies to the count already running until a new count is written.
        """
        access = (val >> 4) & 3
        if access == RW_LATCH:
            self.latch_count()
            return
        self.rw_mode = access
        self.read_state = access
        self.write_state = access
        mode = (val >> 1) & 7
        self.mode = mode & 3 if mode >= 6 else mode
        self.bcd = bool(val & 1)

    def latch_count(self) -> None:
        """Counter latch command (ignored while a previous latch is unread)."""
        if not self.count_latched:
            c = self.get_count(self.pit.clock.now())
            self.latched_count = _bin_to_bcd(c) if self.bcd else c & 0xFFFF
            self.count_latched = self.rw_mode

    def latch_status(self) -> None:
        """Read-back status latch: OUT, access mode, mode, BCD (null count reads 0, as QEMU)."""
        if not self.status_latched:
            out = self.get_out(self.pit.clock.now())
            self.status = (0x80 if out else 0) | (self.rw_mode << 4) | (self.mode << 1) | self.bcd
            self.status_latched = True

    def set_gate(self, level: bool) -> None:
        """Gate input (channel 2 only on a PC): a rising edge (re)starts modes 1, 2, 3 and 5."""
        if level and not self.gate and self.mode in (1, 2, 3, 5):
            self.load_time = self.pit.clock.now()
        self.gate = level

    def read(self) -> int:
        """Guest read of the channel's data port: status latch, count latch, or live count."""
        if self.status_latched:
            self.status_latched = False
            return self.status
        if self.count_latched:
            c = self.latched_count
            state = self.count_latched
            if state == RW_LSB:
                self.count_latched = 0
                return c & 0xFF
            if state == RW_MSB:
                self.count_latched = 0
                return c >> 8
            if state == RW_WORD:
                self.count_latched = RW_WORD_MSB_NEXT
                return c & 0xFF
            self.count_latched = 0
            return c >> 8
        c = self.get_count(self.pit.clock.now())
        if self.bcd:
            c = _bin_to_bcd(c)
        state = self.read_state
        if state == RW_MSB:
            return (c >> 8) & 0xFF
        if state == RW_WORD:
            self.read_state = RW_WORD_MSB_NEXT
            return c & 0xFF
        if state == RW_WORD_MSB_NEXT:
            self.read_state = RW_WORD
            return (c >> 8) & 0xFF
        return c & 0xFF  # LSB, and access mode 0 after reset

    def write(self, val: int) -> bool:
        """A data byte; True when a new count was loaded."""
        state = self.write_state
        if state == RW_MSB:
            self.load_count(val << 8)
            return True
        if state == RW_WORD:
            self.write_latch = val
            self.write_state = RW_WORD_MSB_NEXT
            return False
        if state == RW_WORD_MSB_NEXT:
            self.write_state = RW_WORD
            self.load_count(self.write_latch | (val << 8))
            return True
        self.load_count(val)  # LSB, and access mode 0 after reset
        return True


class Pit:
    """The 8254 and port 0x61.

    :param clock: the VM's virtual clock.
    :param irq0: the line OUT0 drives (ISA IRQ 0).
    """

    io_max_size = 1
    name = "pit"

    def __init__(self, clock: VirtualClock, irq0: IrqLine | None) -> None:
        self.clock = clock
        self.irq0 = irq0
        self._lock = hot.device_lock()
        #: Channel 0's timer state (next transition, OUT0), shared with the C tick when the
        #: clock and the PIC behind IRQ 0 are native: channel 0's expiries then run in C
        #: (:meth:`VirtualClock.attach_pit`), the Python copy of mode/count/load time is
        #: pushed there after every change (:meth:`_sync0`).
        self.state = st = hot.Pit0State()
        st.deadline_ticks = -1
        st.deadline_ns = hot.NONE
        sink = irq0.sink if irq0 is not None else None
        self.native = bool(getattr(clock, "native", False) and getattr(sink, "native", False))
        self.channels = [PitChannel(self, i) for i in range(3)]
        self.port61 = 0  # bits 0-3 as written (gate2, speaker, parity/IOCHK enables)
        self._timer = clock.timer(self._on_timer)
        self._refresh = 0
        self.port61_io = _Port61(self)
        if self.native:
            st.pic = ctypes.pointer(sink.state)
            st.irq = irq0.irq
            clock.attach_pit(st, sink)
        self.reset()

    @property
    def _irq_level(self) -> bool:
        return bool(self.state.irq_level)

    @_irq_level.setter
    def _irq_level(self, level: bool) -> None:
        self.state.irq_level = level

    @property
    def _deadline_ticks(self) -> int | None:
        d = self.state.deadline_ticks
        return None if d < 0 else d

    @_deadline_ticks.setter
    def _deadline_ticks(self, d: int | None) -> None:
        self.state.deadline_ticks = -1 if d is None else d

    def _sync0(self) -> None:
        """Copy channel 0's mode, count and load time to the shared state (lock held)."""
        ch = self.channels[0]
        st = self.state
        st.mode = ch.mode
        st.count = ch.count
        st.load_time = ch.load_time

    def register(self, bus: IOBus) -> None:
        """Claim 0x40-0x43 and 0x61."""
        bus.register_ports(PIT_BASE, 4, self, "pit")
        bus.register_ports(PORT_61, 1, self.port61_io, "port61")

    def reset(self) -> None:
        """System reset: every channel back to mode 3 / 65536, so IRQ 0 ticks at 18.2 Hz (as QEMU)."""
        with self._lock:
            for ch in self.channels:
                ch.reset()
            self.port61 = 0
            self._refresh = 0
            self._irq_level = False
            if self.irq0 is not None:
                self.irq0.lower()
            self._sync0()
            self._irq_update(self.clock.now())

    # ---- guest ports ----------------------------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0  # the control register is write-only; QEMU reads it as 0
        with self._lock:
            return self.channels[offset].read()

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 3:
                sel = value >> 6
                if sel == 3:  # read-back
                    for i in range(3):
                        if value & (2 << i):
                            ch = self.channels[i]
                            if not value & RB_NO_COUNT:
                                ch.latch_count()
                            if not value & RB_NO_STATUS:
                                ch.latch_status()
                    return
                self.channels[sel].control(value)
                if sel == 0:
                    self._sync0()
                return
            if self.channels[offset].write(value) and offset == 0:
                self._sync0()
                self._irq_update(self.clock.now())

    # ---- channel 0 -> IRQ 0 ---------------------------------------------------------------------

    def _set_irq0(self, level: bool) -> None:
        if level != self._irq_level:
            self._irq_level = level
            if self.irq0 is not None:
                self.irq0.set(level)

    def _irq_update(self, now: int) -> None:
        """Drive IRQ 0 from OUT0 at ``now`` and arm the next transition (lock held)."""
        ch = self.channels[0]
        d = ch.elapsed(now)
        self._set_irq0(ch.out_at(d))
        self._arm(d)

    def _arm(self, d: int) -> None:
        ch = self.channels[0]
        nxt = ch.next_transition(d)
        if self.native:
            st = self.state
            if nxt is None:
                st.deadline_ticks, st.deadline_ns = -1, hot.NONE
            else:
                st.deadline_ticks = nxt
                st.deadline_ns = deadline = ch.tick_time(nxt)
                self.clock.pit_armed(deadline)
        elif nxt is None:
            self._timer.cancel()
            self._deadline_ticks = None
        else:
            self._deadline_ticks = nxt
            self._timer.mod(ch.tick_time(nxt))

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer.pending:
                return  # re-armed by a reprogramming after this expiry was taken: stale
            ch = self.channels[0]
            d = self._deadline_ticks
            if d is None:
                return
            # Evaluate OUT at the scheduled tick, not at "now": a late timer thread must not
            # miss a one-tick pulse.  Missed periods beyond this one merge, as in the 8259's IRR.
            level = ch.out_at(d)
            if level and ch.mode in (2, 4, 5):
                # one tick high: deliver the edge, skip the falling event
                if not self._irq_level and self.irq0 is not None:
                    self.irq0.pulse()
                else:
                    self._set_irq0(True)
                    self._set_irq0(False)
                d += 1
            else:
                self._set_irq0(level)
            self._arm(max(d, ch.elapsed(self.clock.now())))

    # ---- port 0x61 ------------------------------------------------------------------------------

    def read_61(self) -> int:
        """Guest read of port 0x61."""
        with self._lock:
            # The refresh bit flips on every read (QEMU's pcspk), so BIOS delay loops that wait
            # for it to toggle never stall; only the gate and speaker bits read back.
            self._refresh ^= P61_REFRESH
            val = (self.port61 & (P61_GATE2 | P61_SPEAKER)) | self._refresh
            if self.channels[2].get_out(self.clock.now()):
                val |= P61_OUT2
            return val

    def write_61(self, value: int) -> None:
        """Guest write of port 0x61 (channel 2 gate, speaker data enable)."""
        with self._lock:
            self.port61 = value & 0x0F
            self.channels[2].set_gate(bool(value & P61_GATE2))


class _Port61:
    """System control port B (0x61)."""

    io_max_size = 1
    name = "port61"

    def __init__(self, pit: Pit) -> None:
        self.pit = pit

    def io_read(self, offset: int, size: int) -> int:
        return self.pit.read_61()

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.pit.write_61(value)

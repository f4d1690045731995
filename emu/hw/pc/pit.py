"""Intel 8254 programmable interval timer at 0x40-0x43, and port 0x61.

Counters are not ticked: like QEMU's i8254 each channel remembers when its count
was loaded and derives the current count and OUT level from the virtual clock
(:mod:`emu.hw.clock`), so reading a counter costs O(1) and time stands still while
the VM is paused.  PIT ticks run at 1 193 182 Hz.

* Channel 0: OUT drives IRQ 0.  A :class:`~emu.hw.clock.Timer` fires at each
  rising edge of OUT (mode 0/1 terminal count, every period in modes 2/3, the
  strobe in modes 4/5) and pulses or raises the line.  When the timer thread is
  late (host load) the missed edges merge into one, as the 8259's IRR would.
* Channel 1: a plain counter (DRAM refresh on the PC, unused by software).
* Channel 2: gate and OUT on port 0x61 (bits 0 and 5) — Linux calibrates the TSC
  by polling OUT2 in mode 0, BIOSes time delays with it.  Bit 1 is the speaker
  data enable (no sound), bit 4 the refresh toggle that flips every 15.085 µs.

Modes 0-5 (6 and 7 alias 2 and 3), binary and BCD counting, LSB/MSB/word access,
counter latch, and the read-back command (count and status latches) follow the
Intel 82C54 datasheet.
"""

from __future__ import annotations

import threading

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
REFRESH_PERIOD_NS = 15085


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
        self.gate = index != 2  # channels 0 and 1 are hard-wired to 1; channel 2 follows 0x61
        self.reset()

    def reset(self) -> None:
        """Power-on state: mode 3 binary, word access, counting from 65536 (as QEMU)."""
        self.mode = 3
        self.bcd = False
        self.rw_mode = RW_WORD
        self.read_state = RW_WORD
        self.write_state = RW_WORD
        self.write_latch = 0
        self.count = 0x10000
        self.load_time = self.pit.clock.now()
        self.latched_count = 0
        self.count_latched = 0  # RW_* state of a pending count latch, 0 = none
        self.status = 0
        self.status_latched = False
        self.null_count = False
        self.loaded = True  # False between a control word and its count
        self.frozen_at: int | None = None  # gate low in modes 0/4: ticks elapsed when it fell
        self.awaiting_trigger = False  # modes 1/5 on a gated channel: loaded, no gate edge yet

    # ---- time ---------------------------------------------------------------------------------

    def elapsed(self, now: int) -> int:
        """PIT ticks since the count was loaded."""
        if self.frozen_at is not None:
            return self.frozen_at
        return (now - self.load_time) * PIT_FREQ // NS_PER_SEC

    def tick_time(self, ticks: int) -> int:
        """Virtual ns at which ``ticks`` ticks have elapsed since load."""
        return self.load_time + -(-ticks * NS_PER_SEC // PIT_FREQ)

    def get_count(self, now: int) -> int:
        """The counting element's value now (binary, 0..count-1 or wrapped)."""
        d = self.elapsed(now)
        count = self.count
        mode = self.mode
        if not self.loaded or self.awaiting_trigger:
            return count & 0xFFFF
        if mode in (0, 1, 4, 5):
            wrap = 10000 if self.bcd else 0x10000
            return (count - d) % wrap
        if mode == 2:
            return count - (d % count)
        # mode 3 counts down by two, twice per period
        return (count - ((2 * d) % count)) & 0xFFFF

    def get_out(self, now: int) -> bool:
        """The OUT pin now."""
        mode = self.mode
        if not self.loaded or self.awaiting_trigger:
            return mode != 0  # mode 0 drives OUT low from the control word on; others high
        d = self.elapsed(now)
        count = self.count
        if mode == 0:
            return d >= count
        if mode == 1:
            return d >= count
        if mode == 2:
            if not self.gate:
                return True
            return d % count != count - 1  # low for the last tick of each period
        if mode == 3:
            if not self.gate:
                return True
            return d % count < (count + 1) >> 1
        # modes 4 and 5: one-tick low strobe at terminal count
        return d != count

    def next_edge(self, now: int) -> int | None:
        """Tick count (since load) of the next rising edge of OUT strictly after ``now``, or None."""
        if not self.loaded or self.awaiting_trigger or self.frozen_at is not None or not self.gate and self.mode in (2, 3):
            return None
        d = self.elapsed(now)
        count = self.count
        mode = self.mode
        if mode in (0, 1):
            return count if d < count else None
        if mode in (4, 5):
            return count + 1 if d < count + 1 else None
        return (d // count + 1) * count  # modes 2 and 3: a new period starts

    # ---- programming ----------------------------------------------------------------------------

    def load_count(self, value: int) -> None:
        """A full count was written: (re)start counting."""
        if self.bcd:
            value = _bcd_to_bin(value)
            if value == 0:
                value = 10000
        elif value == 0:
            value = 0x10000
        if self.mode in (2, 3) and value == 1:
            value = 2  # count 1 is illegal in modes 2/3 (82C54); avoid a zero-width period
        self.count = value
        self.load_time = self.pit.clock.now()
        self.loaded = True
        self.null_count = False
        self.frozen_at = None if self.gate or self.mode not in (0, 4) else 0
        # Channel 2's gate is software-driven: modes 1 and 5 start only on its rising edge.
        # Channels 0/1 have the gate tied high and start at once, as QEMU does.
        self.awaiting_trigger = self.index == 2 and self.mode in (1, 5)

    def control(self, val: int) -> None:
        """A control word for this channel (not the read-back command)."""
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
        self.null_count = True
        self.loaded = False
        self.frozen_at = None
        self.awaiting_trigger = False
        self.count_latched = 0

    def latch_count(self) -> None:
        """Counter latch command (ignored while a previous latch is unread)."""
        if not self.count_latched:
            c = self.get_count(self.pit.clock.now())
            self.latched_count = _bin_to_bcd(c) if self.bcd else c & 0xFFFF
            self.count_latched = self.rw_mode

    def latch_status(self) -> None:
        """Read-back status latch: OUT, null count, access mode, mode, BCD."""
        if not self.status_latched:
            out = self.get_out(self.pit.clock.now())
            self.status = (
                (0x80 if out else 0) | (0x40 if self.null_count else 0) | (self.rw_mode << 4) | (self.mode << 1) | self.bcd
            )
            self.status_latched = True

    def set_gate(self, level: bool) -> None:
        """Gate input (channel 2 only on a PC)."""
        now = self.pit.clock.now()
        if level == self.gate:
            return
        mode = self.mode
        if level:
            if mode in (1, 2, 3, 5):
                self.load_time = now  # a rising gate (re)triggers: counting restarts from the count
                self.awaiting_trigger = False
            elif self.frozen_at is not None:
                self.load_time = now - self.frozen_at * NS_PER_SEC // PIT_FREQ
                self.frozen_at = None
        elif mode in (0, 4) and self.loaded:
            self.frozen_at = self.elapsed(now)  # gate low suspends counting
        self.gate = level

    def read(self) -> int:
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
        if state == RW_LSB:
            return c & 0xFF
        if state == RW_MSB:
            return (c >> 8) & 0xFF
        if state == RW_WORD:
            self.read_state = RW_WORD_MSB_NEXT
            return c & 0xFF
        self.read_state = RW_WORD
        return (c >> 8) & 0xFF

    def write(self, val: int) -> bool:
        """A data byte; True when a new count was loaded."""
        state = self.write_state
        if state == RW_LSB:
            self.load_count(val)
            return True
        if state == RW_MSB:
            self.load_count(val << 8)
            return True
        if state == RW_WORD:
            self.write_latch = val
            self.write_state = RW_WORD_MSB_NEXT
            return False
        self.write_state = RW_WORD
        self.load_count(self.write_latch | (val << 8))
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
        self._lock = threading.Lock()
        self.channels = [PitChannel(self, i) for i in range(3)]
        self.port61 = 0  # bits 0-3 as written (gate2, speaker, parity/IOCHK enables)
        self._timer = clock.timer(self._on_timer)
        self.port61_io = _Port61(self)
        self.reset()

    def register(self, bus: IOBus) -> None:
        """Claim 0x40-0x43 and 0x61."""
        bus.register_ports(PIT_BASE, 4, self, "pit")
        bus.register_ports(PORT_61, 1, self.port61_io, "port61")

    def reset(self) -> None:
        """System reset."""
        with self._lock:
            for ch in self.channels:
                ch.reset()
            self.channels[2].gate = False
            self.port61 = 0
            if self.irq0 is not None:
                self.irq0.lower()
            # As QEMU: channel 0 runs in mode 3 from 65536 after reset, i.e. IRQ 0 at 18.2 Hz.
            self._arm(self.clock.now())

    # ---- guest ports ----------------------------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0xFF  # the control register is write-only
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
                if sel == 0 and value & 0x30:
                    self._program_irq0()
                return
            if self.channels[offset].write(value) and offset == 0:
                self._program_irq0()

    # ---- channel 0 -> IRQ 0 ---------------------------------------------------------------------

    def _program_irq0(self) -> None:
        """New mode or count on channel 0: set OUT's level and arm the next edge (lock held)."""
        ch = self.channels[0]
        if self.irq0 is not None and ch.mode in (0, 1) and not ch.get_out(self.clock.now()):
            self.irq0.lower()  # OUT goes low until terminal count; the PIC sees the next rise
        self._arm(self.clock.now())

    def _arm(self, now: int) -> None:
        ch = self.channels[0]
        edge = ch.next_edge(now)
        if edge is None:
            self._timer.cancel()
        else:
            self._timer.mod(ch.tick_time(edge))

    def _on_timer(self) -> None:
        with self._lock:
            ch = self.channels[0]
            now = self.clock.now()
            if ch.loaded and self.irq0 is not None:
                if ch.mode in (0, 1):
                    self.irq0.raise_()  # OUT stays high after terminal count
                else:
                    self.irq0.pulse()
            self._arm(now)

    # ---- port 0x61 ------------------------------------------------------------------------------

    def read_61(self) -> int:
        with self._lock:
            now = self.clock.now()
            val = self.port61 & 0x0F
            if (now // REFRESH_PERIOD_NS) & 1:
                val |= P61_REFRESH
            if self.channels[2].get_out(now):
                val |= P61_OUT2
            return val

    def write_61(self, value: int) -> None:
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

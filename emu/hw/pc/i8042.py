"""i8042 keyboard controller (0x60 data, 0x64 status/command) and port 0x92.

Replies, status bits and reset values follow QEMU 7.2 (compared byte for byte by
tests/unit/hw/test_hw_qemu_compare.py): e.g. the status register's command/data bit keeps its
reset value, unknown controller commands are ignored, and with translation on (command byte
bit 6) the keyboard's ID and scancode-set replies come translated.

Enough of the controller for BIOSes and Linux's i8042/atkbd/psmouse probes: the
controller command set (read/write command byte, self tests, enable/disable ports,
read/write output port, write to the aux device, pulse output lines), a PS/2
keyboard and mouse that answer their identification and set-up commands with
the bytes real devices send, IRQ 1 / IRQ 12 when output is waiting and enabled.
No keys are ever pressed (no display, no input source): the emulator is headless.

System functions:

* command 0xFE (any 0xF0-0xFF with bit 0 clear pulses the reset line) and output
  port bit 0 cleared via command 0xD1 -> ``on_reset()``;
* output port bit 1 via command 0xD1, commands 0xDD/0xDF, and port 0x92 bit 1
  ("fast A20") -> ``on_a20(enabled)``; port 0x92 bit 0 rising -> ``on_reset()``.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from emu.hw.bus import IOBus
from emu.hw.irq import IrqLine

I8042_DATA = 0x60
I8042_CMD = 0x64
PORT_92 = 0x92

# Status register
KBD_STAT_OBF = 0x01
KBD_STAT_IBF = 0x02
KBD_STAT_SELFTEST = 0x04
KBD_STAT_CMD = 0x08
KBD_STAT_UNLOCKED = 0x10
KBD_STAT_MOUSE_OBF = 0x20

# Command byte (controller RAM byte 0)
KBD_MODE_KBD_INT = 0x01
KBD_MODE_MOUSE_INT = 0x02
KBD_MODE_SYS = 0x04
KBD_MODE_DISABLE_KBD = 0x10
KBD_MODE_DISABLE_MOUSE = 0x20
KBD_MODE_KCC = 0x40

# Output port
KBD_OUT_RESET = 0x01  # 0 = assert CPU reset
KBD_OUT_A20 = 0x02
KBD_OUT_ONES = 0xCC  # unused lines, pulled high
KBD_OUT_OBF = 0x10
KBD_OUT_MOUSE_OBF = 0x20

# Controller commands
KBD_CCMD_READ_MODE = 0x20
KBD_CCMD_WRITE_MODE = 0x60
KBD_CCMD_MOUSE_DISABLE = 0xA7
KBD_CCMD_MOUSE_ENABLE = 0xA8
KBD_CCMD_TEST_MOUSE = 0xA9
KBD_CCMD_SELF_TEST = 0xAA
KBD_CCMD_KBD_TEST = 0xAB
KBD_CCMD_KBD_DISABLE = 0xAD
KBD_CCMD_KBD_ENABLE = 0xAE
KBD_CCMD_READ_INPORT = 0xC0
KBD_CCMD_READ_OUTPORT = 0xD0
KBD_CCMD_WRITE_OUTPORT = 0xD1
KBD_CCMD_WRITE_OBUF = 0xD2
KBD_CCMD_WRITE_AUX_OBUF = 0xD3
KBD_CCMD_WRITE_MOUSE = 0xD4
KBD_CCMD_DISABLE_A20 = 0xDD
KBD_CCMD_ENABLE_A20 = 0xDF

# Device replies
REPLY_ACK = 0xFA
REPLY_RESEND = 0xFE
REPLY_POR = 0xAA
KBD_ID = (0xAB, 0x83)
#: What the controller's set-2 -> set-1 translation (command byte bit 6) makes of the keyboard's
#: ID byte 0x83 and of the scancode-set numbers 1-3, as QEMU's ps2 keyboard reports them.
KBD_ID_TRANSLATED = (0xAB, 0x41)
SCANCODE_SET_TRANSLATED = {1: 0x43, 2: 0x41, 3: 0x3F}
MOUSE_ID = 0x00


class I8042:
    """The keyboard controller with a PS/2 keyboard and mouse attached.

    :param kbd_irq: ISA IRQ 1.
    :param mouse_irq: ISA IRQ 12.
    :param on_reset: called when the guest pulses the CPU reset line.
    :param on_a20: called with the new A20 state.
    """

    io_max_size = 1
    name = "i8042"

    def __init__(
        self,
        kbd_irq: IrqLine | None,
        mouse_irq: IrqLine | None,
        on_reset: Callable[[], None] | None = None,
        on_a20: Callable[[bool], None] | None = None,
    ) -> None:
        self.kbd_irq = kbd_irq
        self.mouse_irq = mouse_irq
        self.on_reset = on_reset
        self.on_a20 = on_a20
        self._lock = threading.RLock()
        self.port92 = Port92(self)
        self.reset()

    def register(self, bus: IOBus) -> None:
        """Claim 0x60, 0x64 and 0x92."""
        bus.register_ports(I8042_DATA, 1, _Port(self, 0), "i8042-data")
        bus.register_ports(I8042_CMD, 1, _Port(self, 4), "i8042-cmd")
        bus.register_ports(PORT_92, 1, self.port92, "port92")

    def reset(self) -> None:
        """Power-on state (A20 on; the output port reads 0xCF and port 0x92 reads 0, as on QEMU)."""
        with self._lock:
            self.mode = KBD_MODE_KBD_INT | KBD_MODE_MOUSE_INT
            self.status = KBD_STAT_CMD | KBD_STAT_UNLOCKED
            self.outport = KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES  # reads 0xCF, as QEMU
            self.pending_cmd = 0  # controller command awaiting its data byte
            self.kbd_pending = 0  # keyboard command awaiting its argument
            self.mouse_pending = 0
            self.queue: collections.deque[tuple[int, bool]] = collections.deque()  # (byte, from_aux)
            self.scancode_set = 2
            self.kbd_enabled = True
            self.mouse_sample_rate = 100
            self.mouse_resolution = 2
            self.mouse_scaling = 1
            self.mouse_enabled = False
            self.mouse_wrap = False
            self._irq_levels = (False, False)
            self._update()
        self.port92.value = 0

    # ---- output buffer --------------------------------------------------------------------------

    def _push(self, byte: int, aux: bool = False) -> None:
        if len(self.queue) < 64:
            self.queue.append((byte & 0xFF, aux))

    def _update(self) -> None:
        """Status OBF bits and IRQ lines from the head of the output queue."""
        self.status &= ~(KBD_STAT_OBF | KBD_STAT_MOUSE_OBF)
        kbd = mouse = False
        if self.queue:
            _, aux = self.queue[0]
            self.status |= KBD_STAT_OBF | (KBD_STAT_MOUSE_OBF if aux else 0)
            if aux:
                mouse = bool(self.mode & KBD_MODE_MOUSE_INT)
            else:
                kbd = bool(self.mode & KBD_MODE_KBD_INT)
        if (kbd, mouse) != self._irq_levels:
            self._irq_levels = (kbd, mouse)
            if self.kbd_irq is not None:
                self.kbd_irq.set(kbd)
            if self.mouse_irq is not None:
                self.mouse_irq.set(mouse)

    def read_data(self) -> int:
        """Guest read of port 0x60: the next output byte (0 when empty)."""
        with self._lock:
            if not self.queue:
                return 0x00
            byte, _ = self.queue.popleft()
            if self.queue and any(self._irq_levels):
                # Drop the line before presenting the next byte, so the edge-triggered 8259
                # sees one interrupt per byte (as QEMU's i8042 does when OBF is refilled).
                self._irq_levels = (False, False)
                if self.kbd_irq is not None:
                    self.kbd_irq.set(False)
                if self.mouse_irq is not None:
                    self.mouse_irq.set(False)
            self._update()
            return byte

    def read_status(self) -> int:
        """Guest read of port 0x64: the status register."""
        with self._lock:
            return self.status

    # ---- controller commands --------------------------------------------------------------------

    def write_command(self, val: int) -> None:
        """Guest write of port 0x64: a controller command."""
        reset = False
        with self._lock:
            self.pending_cmd = 0
            if val == KBD_CCMD_READ_MODE:
                self._push(self.mode)
            elif val in (KBD_CCMD_WRITE_MODE, KBD_CCMD_WRITE_OUTPORT, KBD_CCMD_WRITE_OBUF,
                         KBD_CCMD_WRITE_AUX_OBUF, KBD_CCMD_WRITE_MOUSE):
                self.pending_cmd = val
            elif val == KBD_CCMD_MOUSE_DISABLE:
                self.mode |= KBD_MODE_DISABLE_MOUSE
            elif val == KBD_CCMD_MOUSE_ENABLE:
                self.mode &= ~KBD_MODE_DISABLE_MOUSE
            elif val in (KBD_CCMD_TEST_MOUSE, KBD_CCMD_KBD_TEST):
                self._push(0x00)
            elif val == KBD_CCMD_SELF_TEST:
                self.status |= KBD_STAT_SELFTEST
                self._push(0x55)
            elif val == KBD_CCMD_KBD_DISABLE:
                self.mode |= KBD_MODE_DISABLE_KBD
            elif val == KBD_CCMD_KBD_ENABLE:
                self.mode &= ~KBD_MODE_DISABLE_KBD
            elif val == KBD_CCMD_READ_INPORT:
                self._push(0x80)  # keyboard not inhibited
            elif val == KBD_CCMD_READ_OUTPORT:
                out = self.outport & ~(KBD_OUT_OBF | KBD_OUT_MOUSE_OBF)
                if self.status & KBD_STAT_OBF:
                    out |= KBD_OUT_MOUSE_OBF if self.status & KBD_STAT_MOUSE_OBF else KBD_OUT_OBF
                self._push(out)
            elif val == KBD_CCMD_DISABLE_A20:
                self._set_outport(self.outport & ~KBD_OUT_A20)
            elif val == KBD_CCMD_ENABLE_A20:
                self._set_outport(self.outport | KBD_OUT_A20)
            elif val >= 0xF0:
                reset = not val & 0x01  # pulse output port bit 0 (reset line)
            self._update()
        if reset and self.on_reset is not None:
            self.on_reset()

    def _set_outport(self, val: int) -> bool:
        """Apply an output port value; True if it asserts reset (lock held)."""
        self.outport = val
        if self.on_a20 is not None:
            self.on_a20(bool(val & KBD_OUT_A20))  # every output port write drives A20, as QEMU
        return not val & KBD_OUT_RESET

    def write_data(self, val: int) -> None:
        """Guest write of port 0x60: a command's data byte, or a byte for the keyboard."""
        reset = False
        with self._lock:
            cmd = self.pending_cmd
            self.pending_cmd = 0
            if cmd == KBD_CCMD_WRITE_MODE:
                self.mode = val
                self.status = (self.status & ~KBD_STAT_SELFTEST) | (KBD_STAT_SELFTEST if val & KBD_MODE_SYS else 0)
            elif cmd == KBD_CCMD_WRITE_OUTPORT:
                reset = self._set_outport(val)
            elif cmd == KBD_CCMD_WRITE_OBUF:
                self._push(val)
            elif cmd == KBD_CCMD_WRITE_AUX_OBUF:
                self._push(val, aux=True)
            elif cmd == KBD_CCMD_WRITE_MOUSE:
                self._mouse_write(val)
            else:
                self.mode &= ~KBD_MODE_DISABLE_KBD  # writing to the keyboard enables its port
                self._kbd_write(val)
            self._update()
        if reset and self.on_reset is not None:
            self.on_reset()

    # ---- the PS/2 keyboard ----------------------------------------------------------------------

    def _kbd_write(self, val: int) -> None:
        pending = self.kbd_pending
        if pending:
            self.kbd_pending = 0
            if pending == 0xF0 and val == 0:
                self._push(REPLY_ACK)
                if self.mode & KBD_MODE_KCC:
                    self._push(SCANCODE_SET_TRANSLATED[self.scancode_set])
                else:
                    self._push(self.scancode_set)
                return
            if pending == 0xF0 and val in (1, 2, 3):
                self.scancode_set = val
            self._push(REPLY_ACK)
            return
        if val in (0xED, 0xF3, 0xF0):  # set LEDs / typematic / scancode set: argument follows
            self.kbd_pending = val
            self._push(REPLY_ACK)
        elif val == 0xEE:
            self._push(0xEE)  # echo
        elif val == 0xF2:
            self._push(REPLY_ACK)
            for b in KBD_ID_TRANSLATED if self.mode & KBD_MODE_KCC else KBD_ID:
                self._push(b)
        elif val in (0xF4, 0xF5, 0xF6):
            self.kbd_enabled = val != 0xF5
            self._push(REPLY_ACK)
        elif val == 0xFF:
            self.scancode_set = 2
            self.kbd_enabled = True
            self._push(REPLY_ACK)
            self._push(REPLY_POR)
        elif 0xF7 <= val <= 0xFD:
            self._push(REPLY_ACK)
        else:
            self._push(REPLY_RESEND)

    # ---- the PS/2 mouse -------------------------------------------------------------------------

    def _mouse_write(self, val: int) -> None:
        pending = self.mouse_pending
        if pending:
            self.mouse_pending = 0
            if pending == 0xF3:
                self.mouse_sample_rate = val
            elif pending == 0xE8:
                self.mouse_resolution = val & 3
            self._push(REPLY_ACK, aux=True)
            return
        if self.mouse_wrap and val not in (0xEC, 0xFF):
            self._push(val, aux=True)
            return
        if val in (0xF3, 0xE8):
            self.mouse_pending = val
            self._push(REPLY_ACK, aux=True)
        elif val == 0xF2:
            self._push(REPLY_ACK, aux=True)
            self._push(MOUSE_ID, aux=True)
        elif val == 0xE9:  # status request
            self._push(REPLY_ACK, aux=True)
            self._push((0x20 if self.mouse_enabled else 0) | (0x10 if self.mouse_scaling == 2 else 0), aux=True)
            self._push(self.mouse_resolution, aux=True)
            self._push(self.mouse_sample_rate, aux=True)
        elif val == 0xEB:  # read data: no movement
            self._push(REPLY_ACK, aux=True)
            for b in (0x08, 0x00, 0x00):
                self._push(b, aux=True)
        elif val == 0xFF:
            self.mouse_enabled = False
            self.mouse_sample_rate = 100
            self.mouse_resolution = 2
            self.mouse_scaling = 1
            self.mouse_wrap = False
            self._push(REPLY_ACK, aux=True)
            self._push(REPLY_POR, aux=True)
            self._push(MOUSE_ID, aux=True)
        elif val in (0xE6, 0xE7):
            self.mouse_scaling = 1 if val == 0xE6 else 2
            self._push(REPLY_ACK, aux=True)
        elif val in (0xF4, 0xF5, 0xF6):
            self.mouse_enabled = val == 0xF4
            self._push(REPLY_ACK, aux=True)
        elif val in (0xEA, 0xF0):
            self._push(REPLY_ACK, aux=True)
        elif val == 0xEE:
            self.mouse_wrap = True
            self._push(REPLY_ACK, aux=True)
        elif val == 0xEC:
            self.mouse_wrap = False
            self._push(REPLY_ACK, aux=True)
        else:
            self._push(REPLY_RESEND, aux=True)


class Port92:
    """System control port A (0x92): bit 1 fast A20, bit 0 fast reset on a 0->1 write."""

    io_max_size = 1
    name = "port92"

    def __init__(self, kbc: I8042) -> None:
        self.kbc = kbc
        self.value = 0  # QEMU reads 0 here after reset although A20 starts enabled

    def io_read(self, offset: int, size: int) -> int:
        return self.value

    def io_write(self, offset: int, size: int, value: int) -> None:
        old = self.value
        self.value = value & 0xFF  # read back as written (QEMU)
        if self.kbc.on_a20 is not None:
            self.kbc.on_a20(bool(value & 0x02))  # every write drives the A20 line
        if value & 0x01 and not old & 0x01 and self.kbc.on_reset is not None:
            self.kbc.on_reset()


class _Port:
    io_max_size = 1

    def __init__(self, kbc: I8042, which: int) -> None:
        self.kbc = kbc
        self.which = which
        self.name = "i8042-cmd" if which else "i8042-data"

    def io_read(self, offset: int, size: int) -> int:
        return self.kbc.read_status() if self.which else self.kbc.read_data()

    def io_write(self, offset: int, size: int, value: int) -> None:
        if self.which:
            self.kbc.write_command(value & 0xFF)
        else:
            self.kbc.write_data(value & 0xFF)

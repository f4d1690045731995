"""The PC's cascaded 8259A programmable interrupt controllers.

Master at 0x20/0x21 (IRQ 0-7), slave at 0xA0/0xA1 (IRQ 8-15) on the master's
IRQ 2, and PIIX3's edge/level control registers (ELCR) at 0x4D0/0x4D1.
Implements (Intel 8259A datasheet): ICW1-ICW4, OCW1 (IMR), OCW2 (non-specific,
specific and rotating EOI, set priority, rotate in automatic EOI), OCW3 (IRR/ISR
read select, poll, special mask), automatic EOI, special fully nested mode,
edge and level triggering (ICW1.LTIM or ELCR), and spurious IRQ 7/15.

The vCPU asks :meth:`PicPair.has_interrupt` (a plain attribute read, it is on the
run loop's hot path) and :meth:`PicPair.acknowledge` (the INTA cycle, returns the
vector); ``notify`` is called whenever the INTR output rises so the machine can
kick a halted or running vCPU.  All state changes happen under one lock because
the vCPU thread (port I/O, INTA) and the timer / I/O threads (IRQ lines) race.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from emu.hw import hot
from emu.hw.bus import IOBus
from emu.hw.irq import IrqLine

PIC_MASTER_BASE = 0x20
PIC_SLAVE_BASE = 0xA0
ELCR_BASE = 0x4D0
#: Master input the slave's INT output is wired to.
CASCADE_IRQ = 2

# ICW1 bits
ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_INIT = 0x10
# ICW4 bits
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
# OCW3 bits
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SEL = 0x08
OCW3_SMM = 0x20
OCW3_ESMM = 0x40
# OCW2 commands (bits 7-5)
OCW2_ROTATE_AEOI_CLEAR = 0
OCW2_NONSPECIFIC_EOI = 1
OCW2_NOP = 2
OCW2_SPECIFIC_EOI = 3
OCW2_ROTATE_AEOI_SET = 4
OCW2_ROTATE_NONSPECIFIC_EOI = 5
OCW2_SET_PRIORITY = 6
OCW2_ROTATE_SPECIFIC_EOI = 7

#: ELCR bits that PIIX3 lets software set: IRQ 0, 1, 2, 8 and 13 are always edge.
ELCR_MASK_MASTER = 0xF8
ELCR_MASK_SLAVE = 0xDE


class I8259(hot.I8259State):
    """One 8259A chip; the pair's lock is held by every caller.  Its registers are the fields
    of :class:`emu.hw.hot.I8259State` (shared with the C tick when that is loaded).

    :param master: True for the master (its IRQ 2 input is the cascade).
    """

    def __init__(self, master: bool) -> None:
        super().__init__()
        self._setup(master)

    @classmethod
    def view(cls, buffer: ctypes.Structure, offset: int, master: bool) -> "I8259":
        """A chip whose registers live at ``offset`` in ``buffer`` (kept alive by the chip)."""
        chip = cls.from_buffer(buffer, offset)
        chip._setup(master)
        return chip

    def _setup(self, master: bool) -> None:
        self.master = master
        self.elcr = 0
        self.elcr_mask = ELCR_MASK_MASTER if master else ELCR_MASK_SLAVE
        self.reset()

    def reset(self) -> None:
        """Power-on state (ELCR survives: it belongs to PIIX3, not to the 8259)."""
        self.last_irr = 0  # input levels seen, for edge detection
        self.irr = 0
        self.imr = 0
        self.isr = 0
        self.priority_add = 0  # lowest-priority rotation: IRQ priority_add has the highest priority
        self.irq_base = 0
        self.read_reg_select = 0  # 0: IRR, 1: ISR
        self.poll = False
        self.special_mask = False
        self.init_state = 0  # 0 ready, 1 expects ICW2, 2 ICW3, 3 ICW4
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.init4 = False
        self.single_mode = False
        self.ltim = False

    # ---- priority resolution --------------------------------------------------------------------

    def _priority(self, mask: int) -> int:
        """Priority (0 highest) of the highest-priority bit set in ``mask``; 8 if none."""
        if not mask:
            return 8
        p = 0
        add = self.priority_add
        while not mask & (1 << ((p + add) & 7)):
            p += 1
        return p

    def get_irq(self) -> int:
        """The input that would be delivered now, or -1 (``_priority`` inlined: this runs
        several times per interrupt)."""
        mask = self.irr & ~self.imr & 0xFF
        if not mask:
            return -1
        add = self.priority_add
        rot = ((mask >> add) | (mask << (8 - add))) & 0xFF
        priority = (rot & -rot).bit_length() - 1
        # Compare with the highest in service; in special mask mode masked in-service levels
        # do not block, and in special fully nested mode the cascade input never does.
        mask = self.isr
        if mask:
            if self.special_mask:
                mask &= ~self.imr
            if self.special_fully_nested and self.master:
                mask &= ~(1 << CASCADE_IRQ)
            mask &= 0xFF
            if mask:
                rot = ((mask >> add) | (mask << (8 - add))) & 0xFF
                if priority >= (rot & -rot).bit_length() - 1:
                    return -1
        return (priority + add) & 7

    def set_input(self, irq: int, level: bool) -> None:
        """Drive input ``irq`` (0-7) to ``level``."""
        mask = 1 << irq
        if self.ltim or self.elcr & mask:
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        else:
            if level:
                if not self.last_irr & mask:
                    self.irr |= mask
                self.last_irr |= mask
            else:
                self.last_irr &= ~mask

    def intack(self, irq: int) -> None:
        """The INTA cycle for ``irq``: move it from IRR to ISR (or EOI it at once in AEOI)."""
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        # A level-triggered request stays in IRR while its line is high.
        if not (self.ltim or self.elcr & (1 << irq)):
            self.irr &= ~(1 << irq)

    # ---- guest access ---------------------------------------------------------------------------

    def write(self, addr: int, val: int) -> None:
        """Guest write to port offset ``addr`` (0 or 1)."""
        if addr == 0:
            if val & ICW1_INIT:
                self.reset_for_icw1()
                self.init_state = 1
                self.init4 = bool(val & ICW1_IC4)
                self.single_mode = bool(val & ICW1_SNGL)
                self.ltim = bool(val & ICW1_LTIM)
            elif val & OCW3_SEL:
                if val & OCW3_POLL:
                    self.poll = True
                if val & OCW3_RR:
                    self.read_reg_select = val & OCW3_RIS
                if val & OCW3_ESMM:
                    self.special_mask = bool(val & OCW3_SMM)
            else:
                self._ocw2(val)
        else:
            state = self.init_state
            if state == 0:
                self.imr = val
            elif state == 1:
                self.irq_base = val & 0xF8
                if self.single_mode:
                    self.init_state = 3 if self.init4 else 0
                else:
                    self.init_state = 2
            elif state == 2:
                self.init_state = 3 if self.init4 else 0  # ICW3: the cascade wiring is fixed on a PC
            else:
                self.special_fully_nested = bool(val & ICW4_SFNM)
                self.auto_eoi = bool(val & ICW4_AEOI)
                self.init_state = 0

    def reset_for_icw1(self) -> None:
        """ICW1 clears the mask and in-service registers and edge memory, keeps ELCR."""
        elcr = self.elcr
        irr = self.irr & elcr  # level requests whose line is still high stay pending
        self.reset()
        self.irr = irr

    def _ocw2(self, val: int) -> None:
        cmd = val >> 5
        if cmd in (OCW2_ROTATE_AEOI_CLEAR, OCW2_ROTATE_AEOI_SET):
            self.rotate_on_auto_eoi = cmd == OCW2_ROTATE_AEOI_SET
        elif cmd in (OCW2_NONSPECIFIC_EOI, OCW2_ROTATE_NONSPECIFIC_EOI):
            priority = self._priority(self.isr)
            if priority != 8:
                irq = (priority + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if cmd == OCW2_ROTATE_NONSPECIFIC_EOI:
                    self.priority_add = (irq + 1) & 7
        elif cmd == OCW2_SPECIFIC_EOI:
            self.isr &= ~(1 << (val & 7))
        elif cmd == OCW2_SET_PRIORITY:
            self.priority_add = (val + 1) & 7
        elif cmd == OCW2_ROTATE_SPECIFIC_EOI:
            irq = val & 7
            self.isr &= ~(1 << irq)
            self.priority_add = (irq + 1) & 7

    def read(self, addr: int) -> int:
        """Guest read of port offset ``addr`` (poll word, IRR/ISR, or IMR)."""
        if self.poll:
            self.poll = False
            irq = self.get_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if addr == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr


class PicPair:
    """Master + slave 8259A with ELCR, as wired on a PC.

    :param notify: called (outside the lock) each time INTR rises, and when a device raises a
        request while INTR is already up; the machine passes ``vcpu.interrupt_raised``.
    """

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        #: Both chips' registers and the INTR output, shared with the C tick when it is loaded
        #: (:attr:`native`): the vCPU then takes INTR, INTA and EOIs there.
        self.state = st = hot.PicState()
        self.native = hot.native()
        self.master = I8259.view(st, hot.PicState.m.offset, master=True)
        self.slave = I8259.view(st, hot.PicState.s.offset, master=False)
        self.notify = notify
        self._lock = hot.device_lock()
        self._master_io = _PicPort(self, self.master)
        self._slave_io = _PicPort(self, self.slave)
        self._elcr_io = _ElcrPorts(self)

    @property
    def output(self) -> bool:
        """INTR output level; read lock-free by the vCPU."""
        return bool(self.state.output)

    @output.setter
    def output(self, level: bool) -> None:
        self.state.output = level

    @property
    def _slave_out(self) -> bool:
        return bool(self.state.slave_out)

    @_slave_out.setter
    def _slave_out(self, level: bool) -> None:
        self.state.slave_out = level

    def register(self, bus: IOBus) -> None:
        """Claim 0x20-0x21, 0xA0-0xA1 and 0x4D0-0x4D1 on ``bus``."""
        bus.register_ports(PIC_MASTER_BASE, 2, self._master_io, "pic-master")
        bus.register_ports(PIC_SLAVE_BASE, 2, self._slave_io, "pic-slave")
        bus.register_ports(ELCR_BASE, 2, self._elcr_io, "elcr")

    def irq_line(self, irq: int) -> IrqLine:
        """A fresh :class:`IrqLine` wired to input ``irq`` (0-15)."""
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} does not exist")
        return IrqLine(self, irq)

    def reset(self) -> None:
        """System reset: both chips to their power-on state; ELCR cleared as PIIX3 does."""
        with self._lock:
            for chip in (self.master, self.slave):
                chip.elcr = 0
                chip.reset()
            self._slave_out = False
            self._update()

    # ---- inputs -------------------------------------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15); the :class:`IrqSink` entry point."""
        with self._lock:
            if irq < 8:
                self.master.set_input(irq, level)
            else:
                self.slave.set_input(irq - 8, level)
            rose = self._update()
            # A new request while INTR is already up re-notifies too: a vCPU that saw INTR while
            # it could not take it (IF=0) gets another chance at the next device edge.
            again = level and self.output
        if (rose or again) and self.notify is not None:
            self.notify()

    def pulse_irq(self, irq: int) -> None:
        """A rising then falling edge on ISA IRQ ``irq`` (:meth:`IrqLine.pulse`): the same as
        ``set_irq(irq, True)`` then ``set_irq(irq, False)``, in one locked pass for an
        edge-triggered input (the PIT's 1 kHz tick costs half as much)."""
        chip, pin = (self.master, irq) if irq < 8 else (self.slave, irq - 8)
        if chip.ltim or chip.elcr & (1 << pin):
            self.set_irq(irq, True)      # level-triggered: the CPU may see INTR come and go
            self.set_irq(irq, False)
            return
        with self._lock:
            chip.set_input(pin, True)
            chip.set_input(pin, False)
            again = self.output
            rose = self._update()
        if (rose or again) and self.notify is not None:
            self.notify()

    def _update(self) -> bool:
        """Propagate slave INT to master IRQ 2, compute INTR; True if INTR rose (lock held)."""
        slave_out = self.slave.get_irq() >= 0
        if slave_out != self._slave_out:
            # Only changes of the slave's INT travel down the wire (an ICW1 on the master does
            # not see a fresh edge from a slave that stayed asserted), as QEMU's qemu_irq link.
            self._slave_out = slave_out
            self.master.set_input(CASCADE_IRQ, slave_out)
        out = self.master.get_irq() >= 0
        rose = out and not self.output
        self.output = out
        return rose

    def _locked(self, fn: Callable[[], int | None]) -> int | None:
        with self._lock:
            result = fn()
            rose = self._update()
        if rose and self.notify is not None:
            self.notify()
        return result

    # ---- the CPU side ---------------------------------------------------------------------------

    def has_interrupt(self) -> bool:
        """True while INTR is asserted (an unmasked request outranks everything in service)."""
        return self.state.output != 0

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver (a spurious IRQ 7/15 vector if the request went away)."""
        with self._lock:
            master = self.master
            irq = master.get_irq()
            if irq >= 0:
                master.intack(irq)
                if irq == CASCADE_IRQ:
                    slave = self.slave
                    irq2 = slave.get_irq()
                    if irq2 >= 0:
                        slave.intack(irq2)
                    else:
                        irq2 = 7  # spurious IRQ 15: the slave request vanished
                    vector = slave.irq_base + irq2
                else:
                    vector = master.irq_base + irq
            else:
                vector = master.irq_base + 7  # spurious IRQ 7
            rose = self._update()
        if rose and self.notify is not None:
            self.notify()
        return vector

    # ---- inspection (monitor, tests) ------------------------------------------------------------

    def irr(self) -> int:
        """IRR of both chips as a 16-bit mask (IRQ n = bit n)."""
        return self.master.irr | (self.slave.irr << 8)

    def isr(self) -> int:
        """ISR of both chips as a 16-bit mask."""
        return self.master.isr | (self.slave.isr << 8)

    def imr(self) -> int:
        """IMR of both chips as a 16-bit mask."""
        return self.master.imr | (self.slave.imr << 8)


class _PicPort:
    """Ports base+0/base+1 of one chip."""

    io_max_size = 1

    def __init__(self, pair: PicPair, chip: I8259) -> None:
        self.pair = pair
        self.chip = chip
        self.name = "pic-master" if chip.master else "pic-slave"

    def io_read(self, offset: int, size: int) -> int:
        chip = self.chip
        if not chip.poll:
            # Plain register reads change nothing: no lock, no re-evaluation (hot in Linux's IRQ paths).
            if offset:
                return chip.imr
            return chip.isr if chip.read_reg_select else chip.irr
        return self.pair._locked(lambda: chip.read(offset))  # poll acknowledges

    def io_write(self, offset: int, size: int, value: int) -> None:
        pair = self.pair
        with pair._lock:
            self.chip.write(offset, value & 0xFF)
            rose = pair._update()
        if rose and pair.notify is not None:
            pair.notify()


class _ElcrPorts:
    """PIIX3 ELCR1 (0x4D0, IRQ 0-7) and ELCR2 (0x4D1, IRQ 8-15)."""

    io_max_size = 1
    name = "elcr"

    def __init__(self, pair: PicPair) -> None:
        self.pair = pair

    def io_read(self, offset: int, size: int) -> int:
        return (self.pair.slave if offset else self.pair.master).elcr

    def io_write(self, offset: int, size: int, value: int) -> None:
        chip = self.pair.slave if offset else self.pair.master

        def apply() -> None:
            chip.elcr = value & chip.elcr_mask
            # Re-evaluate inputs whose trigger mode changed: a level input drops a stale
            # edge request whose line is now low (its last_irr bit is clear).
            chip.irr &= ~chip.elcr | chip.last_irr

        self.pair._locked(apply)

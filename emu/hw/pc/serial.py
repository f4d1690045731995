"""16550A UART (COM1 at 0x3F8 / IRQ 4 by default) and simple host backends.

Registers (National PC16550D datasheet), offsets from the base:

====  ============================  ==========================
 off  read                          write
====  ============================  ==========================
  0   RBR (DLL if LCR.DLAB)         THR (DLL if LCR.DLAB)
  1   IER (DLM if LCR.DLAB)         IER (DLM if LCR.DLAB)
  2   IIR                           FCR
  3   LCR                           LCR
  4   MCR                           MCR
  5   LSR                           (factory test, ignored)
  6   MSR                           (ignored)
  7   SCR                           SCR
====  ============================  ==========================

Transmission is immediate: a byte written to THR goes to the backend (or, in
loopback, into the receiver) at once and THRE/TEMT are set again, as QEMU does.
Reception goes through a host-side queue into the 16-byte RX FIFO, so a backend
can hand over any amount of input without overruns; the FIFO trigger level, the
character timeout (4 character times on the virtual clock) and all five interrupt
sources with the datasheet's priority and clearing rules are implemented.

Backends implement ``write(data: bytes) -> None`` and call :meth:`Serial16550.receive`
with input; a backend that offers ``set_receiver(fn)`` (emu.chardev) or ``connect(fn)``
is handed that callable when it is attached.  :class:`FileBackend` (stdio / files) and :class:`NullBackend` live here.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import BinaryIO, Callable, Protocol

from emu.hw.bus import IOBus
from emu.hw.clock import NS_PER_SEC, VirtualClock
from emu.hw.irq import IrqLine

COM1, COM2, COM3, COM4 = 0x3F8, 0x2F8, 0x3E8, 0x2E8
COM1_IRQ, COM2_IRQ = 4, 3

UART_RBR = UART_THR = UART_DLL = 0
UART_IER = UART_DLM = 1
UART_IIR = UART_FCR = 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_TRIGGER = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_FIFOE = 0x80
UART_LSR_ERRORS = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_DELTAS = 0x0F

FIFO_SIZE = 16
UART_CLOCK = 1843200  # 1.8432 MHz crystal: divisor 1 = 115200 baud
#: Input held for the guest beyond the FIFO; more is dropped (a guest that never reads).
MAX_PENDING_INPUT = 1 << 20


class SerialBackend(Protocol):
    """The host side of a UART (implemented by the chardev layer)."""

    def write(self, data: bytes) -> None:
        """Send bytes the guest transmitted."""


class Serial16550:
    """A 16550A UART.

    :param irq: the interrupt line (ISA IRQ 4 for COM1).
    :param clock: the virtual clock for the RX character timeout; without one, data below
        the FIFO trigger level times out at once.
    :param backend: where transmitted bytes go (None: discarded).
    :param base: I/O base used by :meth:`register`.
    """

    io_max_size = 1

    def __init__(
        self,
        irq: IrqLine | None,
        clock: VirtualClock | None = None,
        backend: SerialBackend | None = None,
        base: int = COM1,
        name: str = "serial",
    ) -> None:
        self.irq = irq
        self.clock = clock
        self.base = base
        self.name = name
        self.backend: SerialBackend | None = None
        self._lock = threading.RLock()
        self._pending = bytearray()  # host input not yet in the FIFO
        self._timer = clock.timer(self._on_timeout) if clock is not None else None
        self.reset()
        if backend is not None:
            self.set_backend(backend)

    def register(self, bus: IOBus) -> None:
        """Claim the 8 ports at ``base``."""
        bus.register_ports(self.base, 8, self, self.name)

    def set_backend(self, backend: SerialBackend | None) -> None:
        """Attach the host side and hand it :meth:`receive` for input.

        The backend's ``set_receiver(fn)`` (emu.chardev's Chardev) or ``connect(fn)``
        (:class:`FileBackend`) is called with :meth:`receive`, whichever it has.
        """
        self.backend = backend
        for hook in ("set_receiver", "connect"):
            attach = getattr(backend, hook, None)
            if callable(attach):
                attach(self.receive)
                break

    def reset(self) -> None:
        """Power-on register values (divisor 12 = 9600 baud as QEMU's default)."""
        with self._lock:
            self.divisor = 12
            self.ier = 0
            self.lcr = 0
            self.mcr = UART_MCR_OUT2  # QEMU's reset value
            self.lsr = UART_LSR_THRE | UART_LSR_TEMT
            self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
            self.scr = 0
            self.fcr = 0
            self.rx: collections.deque[int] = collections.deque()
            self.thr_ipending = False
            self.timeout_ipending = False
            self.irq_level = False
            if self._timer is not None:
                self._timer.cancel()
            self._update_irq()

    # ---- derived state --------------------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        """FCR bit 0: the 16-byte FIFOs are on."""
        return bool(self.fcr & UART_FCR_ENABLE_FIFO)

    @property
    def trigger_level(self) -> int:
        """RX FIFO level that raises the received-data interrupt (1 without FIFO)."""
        return UART_FCR_TRIGGER[self.fcr & 0xC0] if self.fifo_enabled else 1

    def _char_time_ns(self) -> int:
        """Time on the wire for one character: start + data + parity + stop bits at the divisor's rate."""
        bits = 1 + 5 + (self.lcr & 3) + (1 if self.lcr & 0x08 else 0) + (2 if self.lcr & 0x04 else 1)
        return bits * 16 * max(self.divisor, 1) * NS_PER_SEC // UART_CLOCK

    def _iir_now(self) -> int:
        """Highest-priority pending interrupt identification (lock held)."""
        ier = self.ier
        if ier & UART_IER_RLSI and self.lsr & UART_LSR_ERRORS:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and self.timeout_ipending:
            return UART_IIR_CTI
        if ier & UART_IER_RDI and len(self.rx) >= self.trigger_level:
            return UART_IIR_RDI
        if ier & UART_IER_THRI and self.thr_ipending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self.msr & UART_MSR_DELTAS:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir_now() != UART_IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            if self.irq is not None:
                self.irq.set(level)

    # ---- receive path ---------------------------------------------------------------------------

    def can_receive(self) -> int:
        """Bytes the guest-side FIFO can take right now (backends may use it for flow control)."""
        with self._lock:
            return (FIFO_SIZE if self.fifo_enabled else 1) - len(self.rx)

    def receive(self, data: bytes) -> None:
        """Input from the host side (called by the backend, any thread)."""
        if not data:
            return
        with self._lock:
            if self.mcr & UART_MCR_LOOP:
                return  # in loopback the receiver is disconnected from the line
            room = MAX_PENDING_INPUT - len(self._pending)
            self._pending += data[: max(room, 0)]
            self._fill_fifo()
            self._update_irq()

    def _fill_fifo(self) -> None:
        """Move queued host input into the FIFO (lock held)."""
        cap = FIFO_SIZE if self.fifo_enabled else 1
        moved = False
        while self._pending and len(self.rx) < cap:
            self.rx.append(self._pending.pop(0))
            moved = True
        if self.rx:
            self.lsr |= UART_LSR_DR
        if moved:
            self._arm_timeout()

    def _push_rx(self, byte: int) -> None:
        """A byte arrives on the receiver (loopback path, lock held)."""
        cap = FIFO_SIZE if self.fifo_enabled else 1
        if len(self.rx) >= cap:
            self.lsr |= UART_LSR_OE  # a real overrun: the guest looped back faster than it read
            if not self.fifo_enabled:
                self.rx.clear()
                self.rx.append(byte)
        else:
            self.rx.append(byte)
        self.lsr |= UART_LSR_DR
        self._arm_timeout()

    def _arm_timeout(self) -> None:
        """(Re)start the character timeout, 4 character times after the last FIFO activity.

        As QEMU: every byte received or read re-arms it whatever the trigger level, and only
        a read (or clearing the FIFO) withdraws a pending timeout indication.
        """
        if not self.fifo_enabled or not self.rx:
            return
        if self._timer is None:
            if len(self.rx) < self.trigger_level:
                self.timeout_ipending = True  # no clock: data below the trigger times out at once
        else:
            self._timer.mod(self.clock.now() + 4 * self._char_time_ns())

    def _on_timeout(self) -> None:
        with self._lock:
            if self._timer is not None and self._timer.pending:
                return  # re-armed by newer FIFO activity: this expiry is stale
            if self.fifo_enabled and self.rx:
                self.timeout_ipending = True
                self._update_irq()

    def _read_rbr(self) -> int:
        if not self.rx:
            return 0
        byte = self.rx.popleft()
        self.timeout_ipending = False
        if not self.rx:
            self.lsr &= ~UART_LSR_DR
        self._fill_fifo()
        self._arm_timeout()
        return byte

    # ---- transmit path --------------------------------------------------------------------------

    def _write_thr(self, value: int) -> None:
        self.thr_ipending = False
        if self.mcr & UART_MCR_LOOP:
            self._push_rx(value)
        elif self.backend is not None:
            try:
                self.backend.write(bytes((value,)))
            except OSError:
                pass  # a closed host side must not stop the guest; the byte is lost as on a cut line
        # Transmitted instantly: the holding register and shifter are empty again.
        self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
        self.thr_ipending = True

    # ---- modem lines ----------------------------------------------------------------------------

    def _loop_msr(self) -> int:
        """MSR in loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD, no delta bits (as QEMU)."""
        mcr = self.mcr
        return (
            (UART_MSR_CTS if mcr & UART_MCR_RTS else 0)
            | (UART_MSR_DSR if mcr & UART_MCR_DTR else 0)
            | (UART_MSR_RI if mcr & UART_MCR_OUT1 else 0)
            | (UART_MSR_DCD if mcr & UART_MCR_OUT2 else 0)
        )

    # ---- guest ports ----------------------------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if offset == UART_LSR:
            lsr = self.lsr
            if not lsr & UART_LSR_ERRORS:
                return lsr  # the polling hot path (Linux's console writes poll LSR per byte): no side effects
        with self._lock:
            if offset == UART_RBR:
                if self.lcr & UART_LCR_DLAB:
                    return self.divisor & 0xFF
                val = self._read_rbr()
            elif offset == UART_IER:
                return (self.divisor >> 8) & 0xFF if self.lcr & UART_LCR_DLAB else self.ier
            elif offset == UART_IIR:
                iid = self._iir_now()
                val = iid | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)
                if iid == UART_IIR_THRI:
                    self.thr_ipending = False  # reading IIR with THRE as the source clears it
            elif offset == UART_LCR:
                return self.lcr
            elif offset == UART_MCR:
                return self.mcr
            elif offset == UART_LSR:
                val = self.lsr
                self.lsr &= ~UART_LSR_ERRORS  # reading LSR clears the error bits
            elif offset == UART_MSR:
                if self.mcr & UART_MCR_LOOP:
                    return self._loop_msr()
                val = self.msr
                self.msr &= ~UART_MSR_DELTAS
            else:
                return self.scr
            self._update_irq()
            return val

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == UART_THR:
                if self.lcr & UART_LCR_DLAB:
                    self.divisor = (self.divisor & 0xFF00) | value
                else:
                    self._write_thr(value)
            elif offset == UART_IER:
                if self.lcr & UART_LCR_DLAB:
                    self.divisor = (self.divisor & 0x00FF) | (value << 8)
                else:
                    old = self.ier
                    self.ier = value & 0x0F
                    # Enabling THRI with the holding register empty raises THRE at once (Linux relies on it).
                    if not old & UART_IER_THRI and value & UART_IER_THRI and self.lsr & UART_LSR_THRE:
                        self.thr_ipending = True
            elif offset == UART_FCR:
                self._write_fcr(value)
            elif offset == UART_LCR:
                self.lcr = value
            elif offset == UART_MCR:
                was_loop = self.mcr & UART_MCR_LOOP
                self.mcr = value & 0x1F
                if was_loop and not self.mcr & UART_MCR_LOOP:
                    self._fill_fifo()  # the line is connected again: queued host input flows
            elif offset == UART_SCR:
                self.scr = value
            else:
                return  # LSR/MSR writes have no effect
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & UART_FCR_ENABLE_FIFO:
            self.rx.clear()  # toggling the FIFO enable resets both FIFOs
            self.lsr &= ~UART_LSR_DR
        if value & UART_FCR_CLEAR_RCVR:
            self.rx.clear()
            self.lsr &= ~UART_LSR_DR
            self.timeout_ipending = False
            if self._timer is not None:
                self._timer.cancel()
        if value & UART_FCR_CLEAR_XMIT:
            self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
            self.thr_ipending = True
        self.fcr = value & (UART_FCR_ENABLE_FIFO | 0xC0) if value & UART_FCR_ENABLE_FIFO else 0
        if not self.mcr & UART_MCR_LOOP:
            self._fill_fifo()


# ---- host backends -------------------------------------------------------------------------------


class NullBackend:
    """``-serial null``: output discarded, no input."""

    def write(self, data: bytes) -> None:
        """Discard ``data``."""


class FileBackend:
    """``-serial stdio`` / ``-serial file:PATH``: output to a binary file, optional input from another.

    :param out: writable binary file object (flushed per write so logs are live).
    :param inp: readable binary file object; a daemon thread feeds what it reads to the UART.
    """

    def __init__(self, out: BinaryIO | None, inp: BinaryIO | None = None) -> None:
        self.out = out
        self.inp = inp
        self._receive: Callable[[bytes], None] | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def open_file(cls, path: str) -> "FileBackend":
        """``-serial file:PATH`` (truncated, as QEMU does)."""
        return cls(open(path, "wb"))

    @classmethod
    def stdio(cls) -> "FileBackend":
        """``-serial stdio``: stdout for output, stdin for input."""
        import sys

        return cls(sys.stdout.buffer, sys.stdin.buffer)

    def write(self, data: bytes) -> None:
        """Write ``data`` to the output file and flush it."""
        if self.out is not None:
            self.out.write(data)
            self.out.flush()

    def connect(self, receive: Callable[[bytes], None]) -> None:
        """Start forwarding input to ``receive`` (called by :meth:`Serial16550.set_backend`)."""
        self._receive = receive
        if self.inp is not None and self._thread is None:
            self._thread = threading.Thread(target=self._reader, name="serial-input", daemon=True)
            self._thread.start()

    def _reader(self) -> None:
        fd = self.inp.fileno() if hasattr(self.inp, "fileno") else None
        while True:
            try:
                data = os.read(fd, 4096) if fd is not None else self.inp.read1(4096)
            except (OSError, ValueError):
                return
            if not data:
                return
            receive = self._receive
            if receive is not None:
                receive(data)

    def close(self) -> None:
        """Close the output file (not stdio)."""
        import sys

        if self.out is not None and self.out is not sys.stdout.buffer:
            self.out.close()

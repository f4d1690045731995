"""Interrupt lines.

An :class:`IrqLine` is a wire from a device's interrupt output to one input of an
interrupt controller (anything with ``set_irq(n, level)``: the PIC pair, the PIIX3
PIRQ router).  Whether an input reacts to the edge or to the level is the
controller's business (the 8259's ELCR), so a device just drives its pin:

* level devices (UART, RTC, PCI INTx) call :meth:`IrqLine.raise_` / :meth:`IrqLine.lower`
  or :meth:`IrqLine.set` as their condition changes;
* pulse sources (the PIT's periodic tick) call :meth:`IrqLine.pulse`, a rising
  then falling edge, which an edge-triggered input latches in its IRR.
"""

from __future__ import annotations

from typing import Protocol


class IrqSink(Protocol):
    """An interrupt controller input bank."""

    def set_irq(self, irq: int, level: bool) -> None: ...


class IrqLine:
    """One interrupt wire.

    :param sink: the controller (``set_irq(irq, level)``), or None for an unconnected pin.
    :param irq: the controller input number.
    """

    __slots__ = ("sink", "irq", "level")

    def __init__(self, sink: IrqSink | None, irq: int) -> None:
        self.sink = sink
        self.irq = irq
        self.level = False

    def set(self, level: bool) -> None:
        """Drive the line to ``level`` (the controller is told even if unchanged)."""
        level = bool(level)
        self.level = level
        if self.sink is not None:
            self.sink.set_irq(self.irq, level)

    def raise_(self) -> None:
        """Drive the line high."""
        self.set(True)

    def lower(self) -> None:
        """Drive the line low."""
        self.set(False)

    def pulse(self) -> None:
        """A rising edge followed by a falling edge (the line ends low); one call into a
        controller that has ``pulse_irq(irq)``."""
        sink = self.sink
        self.level = False
        if sink is None:
            return
        pulse = getattr(sink, "pulse_irq", None)
        if pulse is not None:
            pulse(self.irq)
        else:
            sink.set_irq(self.irq, True)
            sink.set_irq(self.irq, False)

    def __repr__(self) -> str:
        return f"IrqLine({type(self.sink).__name__}, {self.irq}, level={int(self.level)})"

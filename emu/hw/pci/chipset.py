"""The i440FX host bridge (00:00.0) and the PIIX3 PCI-to-ISA bridge (00:01.0).

PIIX3 (Intel 82371SB datasheet) routes the four PCI interrupt lines PIRQA#-D# to
ISA IRQs through registers 0x60-0x63 (bit 7 = routing disabled, bits 3-0 = IRQ;
IRQ 0, 1, 2, 8 and 13 are reserved and treat the route as disabled).  Each bus-0
device's INTx pin reaches PIRQ ``(pin + slot - 1) & 3`` — the swizzle QEMU's
i440FX board uses and SeaBIOS assumes — and several PIRQs (and devices) may share
an ISA IRQ: the IRQ is the wired OR of them.  The machine sets ELCR for the IRQs
it routes PCI interrupts to (level triggered), as firmware does.

PIIX3 also owns the reset control register at 0xCF9: writing bit 2 resets the
system (bit 1 selects a hard reset and is remembered).
"""

from __future__ import annotations

from typing import Callable

from emu.hw.irq import IrqSink
from emu.hw.pci.device import PCI_STATUS, PciFunction

PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_82441 = 0x1237
PCI_DEVICE_ID_INTEL_82371SB_0 = 0x7000
PCI_CLASS_BRIDGE_HOST = 0x060000
PCI_CLASS_BRIDGE_ISA = 0x060100

I440FX_PAM = 0x59  # 0x59-0x5F: programmable attribute map (shadow RAM control)
I440FX_PAM_SIZE = 7
I440FX_SMRAM = 0x72

PIIX_PIRQCA = 0x60  # 0x60-0x63: PIRQA#-PIRQD# route control
PIIX_NUM_PIRQS = 4
PIRQ_DISABLE = 0x80
PIRQ_IRQ_MASK = 0x0F
#: ISA IRQs that cannot take a PCI interrupt (timer, keyboard, cascade, RTC, FPU).
PIIX_RESERVED_IRQS = frozenset((0, 1, 2, 8, 13))

RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04

# PIIX3 function 0 power-on values of its device-specific registers (82371SB datasheet).
_PIIX3_DEFAULTS = {
    0x4C: 0x4D,  # IORT
    0x4E: 0x03,  # XBCS
    0x60: 0x80, 0x61: 0x80, 0x62: 0x80, 0x63: 0x80,  # PIRQRC[A:D]
    0x69: 0x02,  # TOM
    0x70: 0x80,  # MBIRQ0 (QEMU leaves MBIRQ1 at 0)
    0x76: 0x0C, 0x77: 0x0C,  # MBDMA0/1
    0x78: 0x02,  # PCSC
    0xA0: 0x08,  # SMICNTL
    0xA8: 0x0F,  # FTMR
}


class I440FX(PciFunction):
    """i440FX PMC host bridge, 8086:1237 rev 02 at 00:00.0.

    :param on_pam_change: optional ``(pam_registers: bytes)`` callback when the guest writes
        the PAM registers (the memory layer may implement shadow RAM with it).
    """

    def __init__(self, on_pam_change: Callable[[bytes], None] | None = None) -> None:
        super().__init__(PCI_VENDOR_ID_INTEL, PCI_DEVICE_ID_INTEL_82441, PCI_CLASS_BRIDGE_HOST, revision=0x02, name="i440fx")
        self.config[I440FX_SMRAM] = 0x02  # SMRAM: C_BASE_SEG = 010 (A0000h), as QEMU resets it
        self.on_pam_change = on_pam_change

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Report PAM changes to the memory layer."""
        if offset < I440FX_PAM + I440FX_PAM_SIZE and offset + size > I440FX_PAM and self.on_pam_change is not None:
            self.on_pam_change(bytes(self.config[I440FX_PAM : I440FX_PAM + I440FX_PAM_SIZE]))


class PIIX3(PciFunction):
    """PIIX3 PCI-to-ISA bridge, 8086:7000 at 00:01.0, with PIRQ routing and reset control.

    :param pic: the ISA interrupt controller (``set_irq(irq, level)``).
    :param on_reset: called when the guest resets the system through 0xCF9.
    """

    def __init__(self, pic: IrqSink, on_reset: Callable[[], None] | None = None) -> None:
        super().__init__(
            PCI_VENDOR_ID_INTEL, PCI_DEVICE_ID_INTEL_82371SB_0, PCI_CLASS_BRIDGE_ISA,
            header_type=0x80, name="piix3",
        )
        self.pic = pic
        self.on_reset = on_reset
        self.rcr = 0
        for off, val in _PIIX3_DEFAULTS.items():
            self.config[off] = val
        self.config[PCI_STATUS + 1] = 0x02  # DEVSEL timing: medium
        # Which (devfn, pin) sources assert each PIRQ, and the level last driven on each ISA IRQ.
        self._pirq_sources: list[set[tuple[int, int]]] = [set() for _ in range(PIIX_NUM_PIRQS)]
        self._driven = [False] * 16

    # ---- routing --------------------------------------------------------------------------------

    @staticmethod
    def pirq_of(devfn: int, pin: int) -> int:
        """PIRQ (0 = A) that INTx ``pin`` (0 = INTA#) of bus-0 device ``devfn`` is wired to."""
        return (pin + (devfn >> 3) - 1) & 3

    def route(self, pirq: int) -> int | None:
        """ISA IRQ PIRQ ``pirq`` is routed to, or None if disabled."""
        reg = self.config[PIIX_PIRQCA + pirq]
        irq = reg & PIRQ_IRQ_MASK
        if reg & PIRQ_DISABLE or irq in PIIX_RESERVED_IRQS:
            return None
        return irq

    def route_intx(self, devfn: int, pin: int, level: bool) -> None:
        """Router entry point (called by :class:`~emu.hw.pci.host.PciHost`)."""
        pirq = (pin + (devfn >> 3) - 1) & 3     # pirq_of, inline: twice per disk request
        sources = self._pirq_sources[pirq]
        was = bool(sources)
        if level:
            sources.add((devfn, pin))
        else:
            sources.discard((devfn, pin))
        if bool(sources) != was:    # the PIRQ wire changed: its ISA line may have
            self._update_irqs()     # callers hold the host's intx_lock

    def _update_irqs(self) -> None:
        if self.host is not None:
            with self.host.intx_lock:
                self._update_irqs_locked()
        else:
            self._update_irqs_locked()

    def _update_irqs_locked(self) -> None:
        # On every INTx edge of every PCI device (twice per disk request): kept to a few
        # byte reads, and the PIC is told only about ISA lines whose level changed.
        config, sources, driven = self.config, self._pirq_sources, self._driven
        want = 0
        for pirq in range(PIIX_NUM_PIRQS):
            if sources[pirq]:
                reg = config[PIIX_PIRQCA + pirq]
                irq = reg & PIRQ_IRQ_MASK
                if not reg & PIRQ_DISABLE and irq not in PIIX_RESERVED_IRQS:
                    want |= 1 << irq
        for irq in range(16):
            level = bool(want >> irq & 1)
            if level != driven[irq]:
                driven[irq] = level
                self.pic.set_irq(irq, level)

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Re-route INTx when a PIRQ route register changes."""
        if offset < PIIX_PIRQCA + PIIX_NUM_PIRQS and offset + size > PIIX_PIRQCA:
            self._update_irqs()

    def reset(self) -> None:
        """Device reset: default routes (all disabled), RCR cleared."""
        super().reset()
        self.rcr = 0
        self._update_irqs()

    # ---- 0xCF9 ----------------------------------------------------------------------------------

    def rcr_read(self) -> int:
        """Guest read of 0xCF9."""
        return self.rcr

    def rcr_write(self, value: int) -> None:
        """Guest write of 0xCF9: bit 2 resets the system; bit 1 (hard reset) is kept."""
        if value & RCR_RST_CPU:
            if self.on_reset is not None:
                self.on_reset()
            return
        self.rcr = value & RCR_SYS_RST

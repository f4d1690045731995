"""8259A pair driven through the port bus as a BIOS / Linux programs it."""

import pytest

from emu.hw.bus import IOBus
from emu.hw.pc.pic import PicPair


def make():
    kicks = []
    bus = IOBus()
    pic = PicPair(notify=lambda: kicks.append(1))
    pic.register(bus)
    return bus, pic, kicks


def init_pc(bus, master_base=0x08, slave_base=0x70, icw4_master=0x01, icw4_slave=0x01):
    """The classic BIOS sequence: ICW1 edge+ICW4, vector bases, cascade on IRQ2, 8086 mode."""
    bus.port_write(0x20, 1, 0x11)
    bus.port_write(0x21, 1, master_base)
    bus.port_write(0x21, 1, 0x04)
    bus.port_write(0x21, 1, icw4_master)
    bus.port_write(0xA0, 1, 0x11)
    bus.port_write(0xA1, 1, slave_base)
    bus.port_write(0xA1, 1, 0x02)
    bus.port_write(0xA1, 1, icw4_slave)


def test_init_mask_readback_and_vectors():
    bus, pic, kicks = make()
    init_pc(bus, 0x20, 0x28)
    assert bus.port_read(0x21, 1) == 0 and bus.port_read(0xA1, 1) == 0
    bus.port_write(0x21, 1, 0xFB)
    bus.port_write(0xA1, 1, 0xFF)
    assert bus.port_read(0x21, 1) == 0xFB and bus.port_read(0xA1, 1) == 0xFF
    pic.set_irq(1, True)  # masked
    assert not pic.has_interrupt()
    assert bus.port_read(0x20, 1) == 0x02  # IRR read by default
    bus.port_write(0x21, 1, 0xF9)  # unmask IRQ1
    assert pic.has_interrupt() and kicks == [1]
    assert pic.acknowledge() == 0x21
    bus.port_write(0x20, 1, 0x0B)  # OCW3: read ISR
    assert bus.port_read(0x20, 1) == 0x02
    bus.port_write(0x20, 1, 0x0A)  # OCW3: read IRR
    assert bus.port_read(0x20, 1) == 0x00
    bus.port_write(0x20, 1, 0x20)  # non-specific EOI
    assert pic.isr() == 0


def test_priority_nesting_and_nonspecific_eoi():
    bus, pic, _ = make()
    init_pc(bus, 0x08, 0x70)
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x0C
    pic.set_irq(3, True)  # higher priority than 4: nests
    assert pic.has_interrupt()
    assert pic.acknowledge() == 0x0B
    pic.set_irq(5, True)  # lower than 3 and 4: waits
    assert not pic.has_interrupt()
    assert pic.isr() == 0x18
    bus.port_write(0x20, 1, 0x20)  # EOI clears the highest in service: 3
    assert pic.isr() == 0x10 and not pic.has_interrupt()
    bus.port_write(0x20, 1, 0x64)  # specific EOI for 4
    assert pic.isr() == 0 and pic.has_interrupt()
    assert pic.acknowledge() == 0x0D


def test_cascade_slave_and_eoi_both():
    bus, pic, _ = make()
    init_pc(bus, 0x08, 0x70)
    pic.set_irq(8, True)  # RTC
    assert pic.has_interrupt()
    assert pic.acknowledge() == 0x70
    assert pic.isr() == (1 << 8) | (1 << 2)
    pic.set_irq(8, False)
    bus.port_write(0xA0, 1, 0x20)
    bus.port_write(0x20, 1, 0x20)
    assert pic.isr() == 0
    pic.set_irq(14, True)
    assert pic.acknowledge() == 0x76


def test_edge_requires_new_rising_edge():
    bus, pic, _ = make()
    init_pc(bus)
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x08
    bus.port_write(0x20, 1, 0x20)
    assert not pic.has_interrupt()  # line still high but no new edge
    pic.set_irq(0, False)
    pic.set_irq(0, True)
    assert pic.has_interrupt()


def test_level_triggered_via_elcr():
    bus, pic, _ = make()
    init_pc(bus)
    bus.port_write(0x4D1, 1, 0xFF)  # ask for all of IRQ 8-15 level
    assert bus.port_read(0x4D1, 1) == 0xDE  # 8 and 13 stay edge
    bus.port_write(0x4D0, 1, 0xFF)
    assert bus.port_read(0x4D0, 1) == 0xF8
    pic.set_irq(11, True)
    assert pic.acknowledge() == 0x73
    bus.port_write(0xA0, 1, 0x20)
    bus.port_write(0x20, 1, 0x20)
    assert pic.has_interrupt()  # still asserted: level requests re-fire
    pic.set_irq(11, False)
    # The slave drops its INT, but the master latched the cascade edge: a spurious IRQ 15 follows.
    assert pic.acknowledge() == 0x77
    assert pic.isr() == 1 << 2 and not pic.has_interrupt()


def test_spurious_irq7_and_irq15():
    bus, pic, _ = make()
    init_pc(bus, 0x08, 0x70)
    assert pic.acknowledge() == 0x0F  # nothing pending -> spurious IRQ 7, ISR untouched
    assert pic.isr() == 0
    bus.port_write(0x4D1, 1, 0x08)  # IRQ 11 level
    pic.set_irq(11, True)
    assert pic.has_interrupt()
    # The line drops between INTR and INTA: the master still holds the latched cascade edge,
    # the slave has nothing -> spurious IRQ 15 (slave base + 7), slave ISR untouched.
    pic.set_irq(11, False)
    assert pic.acknowledge() == 0x77
    assert pic.slave.isr == 0


def test_auto_eoi_and_rotation():
    bus, pic, _ = make()
    init_pc(bus, icw4_master=0x03)  # 8086 + AEOI
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x0B
    assert pic.isr() == 0  # AEOI never sets ISR
    # Rotate on non-specific EOI: after servicing IRQ 1, IRQ 1 becomes lowest priority.
    bus2, pic2, _ = make()
    init_pc(bus2)
    pic2.set_irq(1, True)
    assert pic2.acknowledge() == 0x09
    bus2.port_write(0x20, 1, 0xA0)  # rotate on non-specific EOI
    assert pic2.master.priority_add == 2
    pic2.set_irq(0, True)
    pic2.set_irq(3, True)
    assert pic2.acknowledge() == 0x0B  # 3 outranks 0 now
    bus2.port_write(0x20, 1, 0xC7)  # set priority: 7 lowest -> 0 highest
    bus2.port_write(0x20, 1, 0x63)  # specific EOI 3
    assert pic2.acknowledge() == 0x08


def test_special_mask_mode_lets_lower_priority_in():
    bus, pic, _ = make()
    init_pc(bus)
    pic.set_irq(2 + 1, True)
    assert pic.acknowledge() == 0x0B  # IRQ3 in service
    pic.set_irq(5, True)
    assert not pic.has_interrupt()
    bus.port_write(0x21, 1, 0x08)  # mask IRQ3
    bus.port_write(0x20, 1, 0x68)  # OCW3: set special mask
    assert pic.has_interrupt()
    assert pic.acknowledge() == 0x0D
    bus.port_write(0x20, 1, 0x48)  # reset special mask
    assert not pic.master.special_mask


def test_poll_command():
    bus, pic, _ = make()
    init_pc(bus)
    bus.port_write(0x20, 1, 0x0C)  # OCW3 poll
    assert bus.port_read(0x20, 1) == 0x00
    pic.set_irq(6, True)
    bus.port_write(0x20, 1, 0x0C)
    assert bus.port_read(0x20, 1) == 0x86
    assert pic.isr() == 0x40


def test_icw1_resets_masks_and_bad_input_is_harmless():
    bus, pic, _ = make()
    init_pc(bus)
    bus.port_write(0x21, 1, 0x55)
    bus.port_write(0x20, 1, 0x11)
    assert pic.master.init_state == 1 and pic.imr() & 0xFF == 0
    for v in range(256):  # hostile writes never raise
        bus.port_write(0x20, 1, v)
        bus.port_write(0x21, 1, v)
        bus.port_read(0x20, 1)
    with pytest.raises(ValueError):
        pic.irq_line(16)


def _reference_get_irq(chip) -> int:
    """QEMU's pic_get_irq written out plainly: priority p (0 highest) of input (p + priority_add) & 7."""
    def prio(mask: int) -> int:
        for p in range(8):
            if mask & (1 << ((p + chip.priority_add) & 7)):
                return p
        return 8

    pending = prio(chip.irr & ~chip.imr)
    if pending == 8:
        return -1
    serving = chip.isr
    if chip.special_mask:
        serving &= ~chip.imr
    if chip.special_fully_nested and chip.master:
        serving &= ~(1 << 2)
    return (pending + chip.priority_add) & 7 if pending < prio(serving) else -1


def test_get_irq_agrees_with_the_plain_priority_rule_on_every_rotation():
    import random

    from emu.hw.pc.pic import I8259

    rng = random.Random(8259)
    for _ in range(20000):
        chip = I8259(rng.random() < 0.5)
        chip.irr, chip.imr = rng.getrandbits(8), rng.getrandbits(8)
        chip.isr = rng.getrandbits(8) if rng.random() < 0.7 else 0
        chip.priority_add = rng.randrange(8)
        chip.special_mask = rng.random() < 0.3
        chip.special_fully_nested = rng.random() < 0.3
        assert chip.get_irq() == _reference_get_irq(chip), vars(chip)

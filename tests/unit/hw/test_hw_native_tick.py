"""The C tick (unicorn patch 0008, emu.hw.hot) against the Python devices it stands in for.

The 8259 and 8254 channel 0 rules exist twice, in emu/hw/pc/pic.py / pit.py and in the
library's src/emu_hot.c: these tests drive both on the same random states and compare.  A
real-mode guest then idles at 1 kHz with the PIT, PIC, clock and vCPU as a machine wires them,
and its ticks must be taken in C (no call back into Python per tick) and counted exactly.
Skipped on the stock library (EMU_UNICORN=stock), where only the Python devices exist."""

import ctypes
import io
import random
import subprocess
import threading

import pytest
from conftest import requires_nasm

from emu.cpu import uclib  # noqa: F401  (loads the library and installs the C tick)
from emu.hw import hot
from emu.hw.clock import VirtualClock
from emu.hw.pc.pic import I8259, PicPair
from emu.hw.pc.pit import Pit

pytestmark = pytest.mark.skipif(not hot.native(), reason="needs the patched libunicorn (0008)")


def _random_chip(rng: random.Random, master: bool) -> I8259:
    chip = I8259(master=master)
    chip.irr, chip.imr, chip.isr = rng.getrandbits(8), rng.getrandbits(8), rng.getrandbits(8)
    chip.last_irr = rng.getrandbits(8)
    chip.priority_add = rng.randrange(8)
    chip.special_mask = rng.random() < 0.3
    chip.special_fully_nested = rng.random() < 0.3
    chip.auto_eoi = rng.random() < 0.2
    chip.rotate_on_auto_eoi = rng.random() < 0.5
    chip.elcr = rng.getrandbits(8) & chip.elcr_mask
    chip.ltim = rng.random() < 0.1
    chip.irq_base = rng.getrandbits(5) << 3
    return chip


def _copy(chip: I8259) -> I8259:
    twin = I8259(master=bool(chip.master))
    ctypes.memmove(ctypes.addressof(twin), ctypes.addressof(chip), ctypes.sizeof(hot.I8259State))
    return twin


def test_c_get_irq_and_ocw2_match_python_on_random_chips():
    rng = random.Random(8)
    for i in range(20000):
        chip = _random_chip(rng, master=bool(i & 1))
        assert hot.lib.emu_hot_i8259_get_irq(chip) == chip.get_irq()
        val = rng.getrandbits(8) & ~0x18          # an OCW2: bits 4 and 3 clear
        twin = _copy(chip)
        chip._ocw2(val)
        hot.lib.emu_hot_i8259_ocw2(twin, val)
        assert bytes(twin) == bytes(chip), (hex(val), vars(chip))


def test_c_acknowledge_matches_python_on_random_pairs():
    rng = random.Random(80)
    for _ in range(5000):
        py, c = PicPair(), PicPair()
        for pair in (py, c):
            pair.notify = None
        for name in ("master", "slave"):
            src = _random_chip(rng, master=name == "master")
            for pair in (py, c):
                ctypes.memmove(ctypes.addressof(getattr(pair, name)), ctypes.addressof(src),
                               ctypes.sizeof(hot.I8259State))
        with hot.LOCK:
            py._update()
            hot.lib.emu_hot_pic_update(c.state)
        assert bytes(py.state) == bytes(c.state)
        notify = ctypes.c_int(0)
        with hot.LOCK:
            vector_c = hot.lib.emu_hot_pic_acknowledge(c.state, ctypes.byref(notify))
        assert py.acknowledge() == vector_c
        assert bytes(py.state) == bytes(c.state)


def _python_on_timer(pit: Pit, now: int) -> None:
    """Pit._on_timer's body without its timer (the stock path)."""
    ch = pit.channels[0]
    d = pit._deadline_ticks
    level = ch.out_at(d)
    if level and ch.mode in (2, 4, 5):
        if not pit._irq_level:
            pit.irq0.pulse()
        else:
            pit._set_irq0(True)
            pit._set_irq0(False)
        d += 1
    else:
        pit._set_irq0(level)
    d = max(d, ch.elapsed(now))
    nxt = ch.next_transition(d)
    pit._deadline_ticks = nxt
    pit.state.deadline_ns = hot.NONE if nxt is None else ch.tick_time(nxt)


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 5])
def test_c_pit_expiry_matches_python(mode):
    """emu_hot_pit_fire against the Python expiry: next transition, OUT0 and what the PIC
    latched, from random counts, load times and late expiries."""
    rng = random.Random(mode)
    for _ in range(300):
        pits = []
        for _ in range(2):
            clock = VirtualClock()
            pic = PicPair()
            pic.notify = None
            pic.master.irq_base = 0x20
            pit = Pit(clock, pic.irq_line(0))
            pits.append((pit, pic))
        count = rng.choice([1, 2, 3, rng.randrange(1, 0x10001)])
        load = rng.randrange(1 << 40)
        d = rng.randrange(0, 4 * count + 4)
        late = rng.randrange(0, 3_000_000)
        level = rng.random() < 0.5
        for pit, pic in pits:
            ch = pit.channels[0]
            ch.mode, ch.count, ch.load_time = mode, count, load
            with hot.LOCK:
                pit._sync0()
                pit._irq_level = level
                nxt = ch.next_transition(d)
                if nxt is None:
                    continue
                pit._deadline_ticks = nxt
                pit.state.deadline_ns = ch.tick_time(nxt)
        now = pits[0][0].state.deadline_ns + late
        if pits[0][0].state.deadline_ticks < 0:
            continue
        with hot.LOCK:
            _python_on_timer(pits[0][0], now)
            hot.lib.emu_hot_pit_fire(pits[1][0].state, now)
        assert bytes(pits[0][0].state)[:-8] == bytes(pits[1][0].state)[:-8]   # all but .pic
        assert bytes(pits[0][1].state)[:-8] == bytes(pits[1][1].state)[:-8]   # all but .cpu
        for pit, _ in pits:
            pit.clock.stop()


ROM = r"""
bits 16
org 0
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word [0x20*4], irq0
    mov word [0x20*4+2], 0xF000
    mov word [0x500], 0
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xFE
    out 0x21, al
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.wait:
    hlt
    cmp word [0x500], 300
    jb .wait
    cli
    mov ax, [0x500]
    mov dx, 0x501
    out dx, ax
.hang:
    hlt
    jmp .hang
irq0:
    push ax
    inc word [0x500]
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
times 0xFFF0 - ($ - $$) db 0
    jmp 0xF000:start
times 0x10000 - ($ - $$) db 0
"""


@requires_nasm
def test_idle_ticks_are_taken_in_c_and_counted_exactly(tmp_path):
    """300 PIT periods at 1 kHz, the guest halting between them as the machine wires it
    (clock as the vCPU's timers, the PIC's INTR to interrupt_raised): exactly 300 IRQs at
    >= 299.9 ms of virtual time, the halted waits handled in C, and Python entered from the
    wait a bounded number of times (its own start, not once per tick)."""
    from emu.cpu.vcpu import VCPU
    from emu.hw.pc.board import PcBoard
    from emu.hw.pc.serial import FileBackend

    src = tmp_path / "rom.asm"
    src.write_text(ROM)
    subprocess.run(["nasm", "-f", "bin", "-o", str(tmp_path / "rom.bin"), str(src)], check=True)
    clock = VirtualClock()
    done = threading.Event()
    status = []
    board = PcBoard(clock, serial_backend=FileBackend(io.BytesIO()), debug_exit=(0x501, 2),
                    on_exit=lambda s: (status.append((s, clock.now())), done.set()))
    cpu = VCPU(2 * 1024 * 1024, board.iobus.port_read, board.iobus.port_write, board.pic,
               clock_ns=clock.now)
    board.connect_cpu(cpu.interrupt_raised)
    cpu.timers = clock
    cpu.load_rom(0xFFFF0000, (tmp_path / "rom.bin").read_bytes())
    assert cpu._hot is not None and clock.native and board.pit.native
    clock.start()
    t0 = clock.now()
    cpu.start()
    try:
        assert done.wait(30), "guest did not finish"
    finally:
        cpu.stop()
        clock.stop()
    code, t_end = status[0]
    assert code == (300 << 1) | 1
    assert t_end - t0 >= 299_900_000
    stats = cpu._hot
    assert stats.halts >= 1 and stats.native_ticks >= 1
    assert stats.slow_calls <= 10, (stats.slow_calls, stats.native_ticks, stats.halts)
    assert board.pic.state.cpu is None          # the stopped vCPU is unhooked from the PIC

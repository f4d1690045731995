"""The vCPU: one Unicorn instance, one thread, and the run loop of ../shared/DESIGN.md.

Memory map (guest physical), as a PC's:

=========================  ==============================================================
0 - 0x9FFFF                RAM
0xA0000 - 0xBFFFF          nothing (legacy VGA window): reads all ones
0xC0000 - lowmem           RAM; 0xE0000-0xFFFFF holds a copy of the BIOS's last 128 KiB
                           (re-copied at every reset: the PC's shadowed BIOS alias)
4 GiB - ROM size - 4 GiB   the BIOS ROM (read-only: a guest store is undone at the next store
                           to ROM or when the vCPU next stops, within ~1 ms; Unicorn cannot
                           drop a store without re-executing the instruction forever)
4 GiB -                    RAM above ``lowmem`` when there is more than 3.5 GiB
anything else              reads all ones, writes dropped (mapped lazily on first access);
                           executing there gives #UD (0xFF 0xFF is an invalid opcode)
=========================  ==============================================================

``lowmem`` is the RAM size, or 3 GiB when the RAM is 3.5 GiB or more (QEMU's pc machine).
Guest RAM is one host mmap (:attr:`VCPU.ram`); :meth:`VCPU.dma_view` maps a guest range to
it for devices.  Host writes into RAM do not invalidate translated code in Unicorn: call
:meth:`VCPU.invalidate_code` after writing a range that may hold code.

Run loop (vCPU thread): park if a pause is requested; apply requests from other threads
(reset, A20, code invalidation); deliver the event a hook recorded (exception, INT n,
SYSCALL/SYSENTER, intercepted HLT/RDMSR/WRMSR/CPUID); deliver a pending IRQ when IF=1 and no
interrupt shadow; if halted wait on an Event; else ``emu_start(rip, 0)`` with exits enabled
and an empty exit set.  ``emu_start(timeout=)`` and ``count=`` are never used.

With the patched library's native interrupts (patches/unicorn/0003, the default when present;
``EMU_NATIVE_IRQ=0`` turns it off) the loop does not deliver IRQs itself: :meth:`VCPU.
interrupt_raised` (the PIC's notify) raises libunicorn's INTR request from any thread, QEMU's
code takes it at the first block boundary with IF=1 and no interrupt shadow (exact, unlike the
stopper's 0.5 ms polling below) and calls :meth:`VCPU._inta` for the vector; a running guest
takes a timer tick without leaving ``emu_start``.  No interrupt is taken in a run after a hook
recorded an event (the event is completed on the state it was raised in).  With patch 0004 a HLT
with IF=1 does not end the run either: :meth:`VCPU._hlt_wait` waits inside ``emu_start`` (idle
hook, then the device timers' ``idle_wait``, which fires due timers on this thread) until an
interrupt is pending; a kick or request makes the HLT end the run as before.  With patch 0008
and the 8259 pair as interrupt controller (:mod:`emu.hw.hot`) that wait, the INTA cycle and EOIs
run in C on the devices' shared state: an idle guest's timer tick never enters Python.

Stopping a run: :meth:`VCPU.kick` calls ``emu_stop``, which takes effect at the next
translation-block boundary, never inside an instruction (stock Unicorn rewinds an instruction
stopped after its port/MMIO callback ran, so the access happened twice; ``layout.py`` has the
cause and the fix).  Unicorn loses an ``emu_stop`` that lands just before ``emu_start``
begins; a small "stopper" thread therefore repeats ``emu_stop`` every 0.5 ms while a kick
is unanswered inside ``emu_start``.  The same thread ends runs
every 0.5 ms while an interrupt waits behind IF=0 or an interrupt shadow, because nothing
reports STI/POPF/IRET enabling it: such an IRQ is taken at most ~0.5 ms late (QEMU takes
it at the next instruction boundary).  Idle (halted, paused, nothing pending) it sleeps.

Bad guests: unmapped memory reads all ones, invalid opcodes and fetches from nothing give
#UD, a fault while delivering becomes #DF and then a triple fault, which calls
``on_reset_request``; an internal error or an emulation failure reported by Unicorn stops
the CPU (as a shutdown) until reset.  Device callbacks that raise are logged (rate-limited)
and read as all ones.  The vCPU thread never ends because of the guest.

How HLT and the MSRs are caught: Unicorn has no hook for HLT, RDMSR or WRMSR, but its
QEMU core still has AMD SVM's intercept checks.  We set hflags.HF_GUEST_MASK and the
CPUID/HLT/MSR/MONITOR/MWAIT intercept bits in the CPU state, with a hidden VMCB and MSR permission
map (above the guest's physical address width).  The instructions then end ``emu_start``
through ``UC_HOOK_INTR`` with vector ``0x100 + exit code`` and RIP on the instruction,
which the loop emulates.  HLT detection is therefore exact (no byte heuristic), and unknown
MSRs raise #GP as on hardware.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import logging
import mmap
import os
import struct
import threading
import time
from typing import Callable, Optional, Protocol

from emu.cpu import layout as L
from emu.cpu.features import (MISC_ENABLE_DEFAULT, MSR_CSTAR, MSR_FMASK, MSR_IA32_MISC_ENABLE,
                              MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
                              MSR_IA32_SYSENTER_ESP, MSR_LSTAR, MSR_STAR, MSR_TSC_AUX,
                              CpuidTable, MsrFile, msr_permission_map)
from emu.cpu.interrupts import Delivery, DeliveryResult, Kind
from emu.cpu.layout import CpuState
from emu.cpu.mmu import GuestFault, LinearMem, PhysMem
from emu.cpu import uclib
from emu.cpu.uclib import unicorn
from emu.errors import CpuError
from emu.hw import hot

log = logging.getLogger("emu.cpu")

uc_const = unicorn.unicorn_const
x86 = unicorn.x86_const
UcError = unicorn.UcError

PAGE = 0x1000
FOUR_GIB = 1 << 32
#: Where the hidden VMCB and MSR permission map live: beyond any guest-physical address.
HIDDEN_GPA = 0x000F_FFFF_FFF0_0000
BIOS_ALIAS_END = 0x100000
BIOS_ALIAS_MAX = 128 * 1024
VGA_HOLE = (0xA0000, 0xC0000)
FILLER_CHUNK = 0x10000
TSC_HZ_DEFAULT = 1_000_000_000
#: Reset values (Intel SDM vol. 3, table 9-1).
RESET_CR0 = 0x60000010
RESET_CS = 0xF000
RESET_CS_BASE = 0xFFFF0000
RESET_RIP = 0xFFF0

_INTERCEPTS = sum(1 << (code - L.SVM_EXIT_INTR)
                  for code in (L.SVM_EXIT_CPUID, L.SVM_EXIT_HLT, L.SVM_EXIT_MSR, L.SVM_EXIT_ICEBP,
                               L.SVM_EXIT_MONITOR, L.SVM_EXIT_MWAIT))
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_INSN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)
# uc_cb_insn_in_t / uc_cb_insn_out_t, called straight from libunicorn: the binding's own
# wrappers cost ~0.8 us more per port access (its exception guard and Uc lookup), which
# doubles the cost of a PIO disk read.  Our hooks catch their own exceptions.
_IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                          ctypes.c_void_p)
_OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                           ctypes.c_void_p)


class InterruptController(Protocol):
    """What the vCPU needs from the interrupt controller (the 8259 pair)."""

    def has_interrupt(self) -> bool:
        """True when an unmasked interrupt is waiting for the CPU."""

    def acknowledge(self) -> int:
        """INTA: the vector of the interrupt the CPU takes now."""


class TimerSource(Protocol):
    """What the vCPU needs from the device timers (:class:`emu.hw.clock.VirtualClock`)."""

    def idle_wait(self, wake: threading.Event, limit: float = 0.05) -> None:
        """Wait until ``wake`` is set or a timer is due, then fire the due timers here."""


PortRead = Callable[[int, int], int]
PortWrite = Callable[[int, int, int], None]
MmioRead = Callable[[int, int], int]
MmioWrite = Callable[[int, int, int], None]


class RunState(enum.Enum):
    """Where the vCPU thread is."""

    CREATED = "created"    # constructed, thread not started
    RUNNING = "running"    # executing, halted or shut down, but not parked
    PAUSED = "paused"      # parked on a pause request
    STOPPED = "stopped"    # thread exited


@functools.lru_cache(maxsize=1)
def _native_cpuid() -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Unicorn's own CPUID answers, collected once on a scratch instance."""
    uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    uc.mem_map(0, PAGE)
    uc.mem_write(0, b"\x0f\xa2")  # cpuid

    def one(leaf: int, sub: int) -> tuple[int, int, int, int]:
        uc.reg_write(x86.UC_X86_REG_RAX, leaf)
        uc.reg_write(x86.UC_X86_REG_RCX, sub)
        uc.emu_start(0, 2)
        return tuple(uc.reg_read(r) & 0xFFFFFFFF for r in (  # type: ignore[return-value]
            x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX))

    out: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    max_leaf = one(0, 0)[0]
    for leaf in range(0, max_leaf + 1):
        for sub in range(8 if leaf in (4, 7, 0xB, 0xD) else 1):
            out[(leaf, sub)] = one(leaf, sub)
    max_ext = one(0x80000000, 0)[0]
    for leaf in range(0x80000000, max_ext + 1):
        out[(leaf, 0)] = one(leaf, 0)
    return out


def _native_lookup(leaf: int, sub: int) -> tuple[int, int, int, int]:
    table = _native_cpuid()
    return table.get((leaf, sub), table.get((leaf, 0), (0, 0, 0, 0)))


class VCPU:
    """An x86-64 processor with a PC's memory map, run by its own thread.

    :param ram_size: guest RAM in bytes (multiple of 4 KiB, at least 1 MiB).
    :param port_read: ``port_read(port, size) -> int`` for IN (size 1, 2 or 4).
    :param port_write: ``port_write(port, size, value)`` for OUT.
    :param intc: the interrupt controller (``has_interrupt()``, ``acknowledge()``).
    :param on_reset_request: called on the vCPU thread with a reason (``"triple-fault"``)
        when the CPU asks for a system reset; the machine resets (``reset()``) or exits
        (``-no-reboot``).  Without it the vCPU resets itself.
    :param clock_ns: the machine's virtual clock in ns (drives the TSC); by default a
        monotonic clock that stands still while the vCPU is paused (:meth:`clock_ns`).
    :param tsc_hz: TSC ticks per second of that clock.
    :param native_irq: let libunicorn take external interrupts itself (patch 0003) instead of
        stopping the CPU and delivering them in Python; default: when the library can.
    :param native_halt: with native interrupts, let a HLT with IF=1 wait inside ``emu_start``
        (patch 0004, :meth:`_hlt_wait`) instead of ending the run; default: when the library can.
    """

    def __init__(self, ram_size: int, port_read: PortRead, port_write: PortWrite,
                 intc: InterruptController, *,
                 on_reset_request: Optional[Callable[[str], None]] = None,
                 clock_ns: Optional[Callable[[], int]] = None,
                 tsc_hz: int = TSC_HZ_DEFAULT,
                 native_irq: Optional[bool] = None,
                 native_halt: Optional[bool] = None) -> None:
        if ram_size < 0x100000 or ram_size % PAGE:
            raise CpuError(f"RAM size {ram_size:#x} must be a multiple of 4 KiB and at least 1 MiB")
        L.verify_layout()
        self.ram_size = ram_size
        self._port_read = port_read
        self._port_write = port_write
        self._intc = intc
        self._on_reset_request = on_reset_request
        self._external_clock = clock_ns
        self._tsc_hz = tsc_hz
        self._clock_base = time.monotonic_ns()
        # (ns paused before, start of the current pause or None): one tuple, replaced in one
        # assignment, so clock_ns() on another thread never sees a pause counted twice.
        self._pause_acct: tuple[int, Optional[int]] = (0, None)

        self._uc = uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
        # Before anything is translated: a kick must never rewind a half-done instruction
        # (an IN or MMIO access would run twice; layout.py explains).
        L.stop_only_between_instructions(uc)
        self._st = CpuState(uc)
        self._exports: list[object] = []                 # keeps mapped host buffers alive
        self._mapped: list[tuple[int, int, str]] = []   # (start, end, kind), sorted
        self._mmio: dict[int, int] = {}                  # base -> size
        self._roms: list[tuple[int, mmap.mmap, bytes]] = []
        self._bios_alias: Optional[tuple[int, bytes]] = None
        self._map_ram()
        self._map_hidden()
        self._phys = PhysMem(self._lookup, self._slow_read, self._slow_write,
                             ram=self._ram, ram_ranges=self._ram_ranges)
        self._delivery = Delivery(self._st, self._phys)
        self._cpuid = CpuidTable(_native_lookup)
        self._msrs = MsrFile(self._tsc_ticks)
        self._callbacks: list[object] = []   # ctypes callbacks that must stay alive
        self._reports: dict[object, int] = {}
        if native_irq is None:   # EMU_NATIVE_IRQ=0: the Python delivery path (comparisons, debugging)
            native_irq = uclib.NATIVE_IRQ and os.environ.get("EMU_NATIVE_IRQ", "1") != "0"
        self._native_irq = bool(native_irq)
        if native_halt is None:  # EMU_NATIVE_HALT=0: every HLT leaves emu_start (comparisons)
            native_halt = uclib.NATIVE_HALT and os.environ.get("EMU_NATIVE_HALT", "1") != "0"
        self._native_halt = bool(native_halt) and self._native_irq
        # The C tick (patch 0008): with the 8259 pair's state shared with C, the halted wait,
        # INTA and EOIs run in C (EMU_NATIVE_TICK=0 turns it off).
        self._hot: Optional[hot.CpuHot] = None
        if (self._native_halt and hot.native() and getattr(intc, "native", False)
                and os.environ.get("EMU_NATIVE_TICK", "1") != "0"):
            self._hot = hot.CpuHot()
        self._event_v: Optional[tuple] = None
        self._install_hooks()
        if self._hot is not None:
            self._attach_hot(uc, intc)
        else:
            if self._native_irq:
                self._ack_cb = uclib.IRQ_ACK_CB(self._inta)
                uclib.irq_set_ack(uc, self._ack_cb)
            if self._native_halt:
                self._halt_cb = uclib.HALT_CB(self._hlt_wait)
                uclib.halt_set_callback(uc, self._halt_cb)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._reset_bytes = self._make_reset_state()

        # Requests from other threads (all guarded by _lock / _cond).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = _Waker() if self._hot is None else hot.HotWaker(self._hot)
        self._state = RunState.CREATED
        self._pause_req = False
        self._stop_req = False
        self._reset_req = False
        self._a20_req: Optional[bool] = None
        self._inval: list[tuple[int, int]] = []
        self._inval_seq = 0
        self._inval_done = 0
        self._kick_pending = False
        self._in_emu = False
        self._thread: Optional[threading.Thread] = None
        self._stopper: Optional[threading.Thread] = None

        # vCPU-thread state
        self._event: Optional[tuple] = None
        self._halted = False
        self._shutdown = False
        self._single_step = False
        self._rom_dirty: list[tuple[int, int]] = []
        self.a20_enabled = True
        #: Called on the vCPU thread while the guest halts, before waiting; True when it did
        #: some work (the loop then looks at interrupts again instead of waiting).  The
        #: machine sets the block layer's: a request the guest waits for runs here.
        self.idle_hook: Optional[Callable[[], bool]] = None
        self._timers: Optional[TimerSource] = None
        self._do_reset()

    @property
    def timers(self) -> Optional[TimerSource]:
        """The machine's device timers (:class:`emu.hw.clock.VirtualClock`): while the guest
        halts the vCPU sleeps until their next deadline and fires them itself (``idle_wait``,
        or the C tick's wait for a native clock), so an idle guest's timer tick wakes this
        thread only."""
        return self._timers

    @timers.setter
    def timers(self, timers: Optional[TimerSource]) -> None:
        self._timers = timers
        cpu = self._hot
        if cpu is not None:
            state = getattr(timers, "state", None) if getattr(timers, "native", False) else None
            with hot.LOCK:
                cpu.clk = None if state is None else ctypes.pointer(state)

    @property
    def _event(self) -> Optional[tuple]:
        """The event a hook recorded for the loop (mirrored for the C INTA, which must not
        take an interrupt before the loop completed it)."""
        return self._event_v

    @_event.setter
    def _event(self, event: Optional[tuple]) -> None:
        self._event_v = event
        if self._hot is not None:
            self._hot.event = event is not None

    def _attach_hot(self, uc: "unicorn.Uc", intc: object) -> None:
        """Hand HLT, INTA and OUT to the C tick (see :mod:`emu.hw.hot`)."""
        cpu = self._hot
        cpu.uc = uc._uch
        cpu.pic = ctypes.pointer(intc.state)
        self._slow_cb = hot.SLOW_CB(self._hot_slow)
        cpu.slow = self._slow_cb
        cpu.py_out = self._out_cb
        self._hot_hook = ctypes.c_size_t()
        err = hot.lib.emu_hot_attach(cpu, ctypes.byref(self._hot_hook))
        if err != uc_const.UC_ERR_OK:
            raise UcError(err)
        with hot.LOCK:
            intc.state.cpu = ctypes.addressof(cpu)

    def _detach_hot(self) -> None:
        """The vCPU is going away: the PIC and the clock must not reach it any more."""
        cpu = self._hot
        if cpu is None:
            return
        with hot.LOCK:
            pic = self._intc.state
            if pic.cpu == ctypes.addressof(cpu):
                pic.cpu = None
            cpu.clk = None

    def _hot_slow(self, _opaque: object, reason: int) -> int:
        """The C halted wait calls back (without the shared lock): ``SLOW_POKE`` a Python port
        or MMIO access ran since the last wait (a block request may wait for the idle hook),
        ``SLOW_TIMERS`` a Python timer is due, ``SLOW_WAIT`` no native clock (wait here).
        -1 ends the wait as a kick does (the HLT then leaves ``emu_start``)."""
        try:
            cpu = self._hot
            if reason == hot.SLOW_POKE:
                cpu.poke = 0
                hook = self.idle_hook
                if hook is not None and hook():
                    cpu.poke = 1           # it did work: look at interrupts, then again
            elif reason == hot.SLOW_TIMERS:
                self._timers._fire_due()
            else:
                timers = self._timers
                if timers is None:
                    self._wake.wait(0.05)
                else:
                    timers.idle_wait(self._wake)
            if self._kick_pending or self._inval or self._rom_dirty or self._event_v is not None:
                return -1
            return 0
        except Exception as err:
            self._report("halt", "halted wait failed: %s", err)
            return -1

    # ================================================================== public API
    @property
    def ram(self) -> memoryview:
        """Guest RAM (host mmap); index = guest-physical address below ``lowmem``."""
        return self._ram

    @property
    def state(self) -> RunState:
        """Where the vCPU thread is."""
        return self._state

    @property
    def halted(self) -> bool:
        """True while the guest sits in HLT (or is shut down after a triple fault)."""
        return self._halted or self._shutdown or bool(self._hot is not None and self._hot.halted)

    def clock_ns(self) -> int:
        """The virtual clock in ns (stands still while paused unless a clock was given)."""
        if self._external_clock is not None:
            return self._external_clock()
        while True:
            # Read the bookkeeping on both sides of the host clock: a pause that ended in
            # between would be subtracted from a "now" taken before it ended (a step back).
            acct = self._pause_acct
            now = time.monotonic_ns()
            if self._pause_acct is acct:
                break
        paused, since = acct
        if since is not None:
            paused += max(0, now - since)
        return now - self._clock_base - paused

    def dma_view(self, gpa: int, length: int) -> Optional[memoryview]:
        """The RAM behind ``[gpa, gpa + length)``, or ``None`` if any of it is not RAM.

        Devices copy into/out of the returned view; call :meth:`invalidate_code` after
        writing to a range that may hold guest code.
        """
        if length < 0 or gpa < 0:
            return None
        for start, end, offset in self._ram_ranges:
            if start <= gpa and gpa + length <= end:
                return self._ram[offset + gpa - start: offset + gpa - start + length]
        return None

    def start(self, paused: bool = False) -> None:
        """Start the vCPU thread (parked at once when ``paused``, as for ``-S``)."""
        with self._cond:
            if self._state is not RunState.CREATED:
                raise CpuError("vCPU already started")
            self._pause_req = paused
            self._state = RunState.RUNNING
        self._stopper = threading.Thread(target=self._stopper_main, name="vcpu-stopper", daemon=True)
        self._thread = threading.Thread(target=self._main, name="vcpu0", daemon=True)
        self._stopper.start()
        self._thread.start()
        if paused:
            self._wait_parked(None)

    def kick(self) -> None:
        """Make the vCPU look at its inputs now (an IRQ was raised, a request posted).

        Safe from any thread, including device callbacks on the vCPU thread.
        """
        self._kick_pending = True
        if self._hot is not None:
            self._hot.attention = 1
        self._uc.emu_stop()
        self._wake.set()
        # The stopper only matters inside emu_start; the vCPU checks _kick_pending itself
        # after setting _in_emu, so one of the two always sees the other.
        if self._in_emu:
            with self._cond:
                self._cond.notify_all()

    def interrupt_raised(self) -> None:
        """The interrupt controller's INTR output rose (its ``notify``); safe from any thread.

        With native interrupts (patch 0003) the running CPU takes the interrupt at its next
        block boundary where IF=1 and no shadow is in force, without leaving ``emu_start``;
        a halted one is woken.  Otherwise this is :meth:`kick`.
        """
        if self._native_irq:
            uclib.irq_raise(self._uc)
            self._wake.set()
        else:
            self.kick()

    def pause(self, timeout: Optional[float] = None) -> bool:
        """Park the vCPU; returns when it is parked (other threads) or at once (vCPU thread).

        :returns: False if ``timeout`` expired first.
        """
        with self._cond:
            if self._state in (RunState.STOPPED, RunState.CREATED):
                self._pause_req = True
                return True
            self._pause_req = True
        self.kick()
        if self._on_cpu_thread():
            return True
        return self._wait_parked(timeout)

    def resume(self) -> None:
        """Let a paused vCPU run again."""
        with self._cond:
            self._pause_req = False
            self._cond.notify_all()
        self._wake.set()

    def reset(self) -> None:
        """System reset of the processor: back to F000:FFF0 in real mode, A20 on.

        RAM keeps its contents (as on a PC); the BIOS alias at 0xE0000 is refreshed.
        """
        if self._state is RunState.CREATED or self._state is RunState.STOPPED:
            self._do_reset()
            return
        with self._cond:
            self._reset_req = True
        self.kick()

    def stop(self) -> None:
        """End the vCPU thread (for machine shutdown); waits for it unless called on it."""
        with self._cond:
            self._stop_req = True
            self._cond.notify_all()
        self.kick()
        if self._thread is not None and not self._on_cpu_thread():
            self._thread.join()
            self._detach_hot()
        if self._stopper is not None and threading.current_thread() is not self._stopper:
            self._stopper.join(timeout=1)
        if self._thread is None:
            self._state = RunState.STOPPED
            self._detach_hot()

    def set_a20(self, enabled: bool) -> None:
        """Drive the A20 gate (port 0x92 / the i8042 output port)."""
        if self._state in (RunState.CREATED, RunState.STOPPED):
            self._apply_a20(enabled)
            return
        with self._cond:
            self._a20_req = bool(enabled)
        self.kick()

    def invalidate_code(self, gpa: int, length: int) -> None:
        """Drop translated code for guest-physical ``[gpa, gpa + length)`` after a host write.

        From the vCPU thread outside ``emu_start`` it acts at once; from a device hook it
        acts before the guest executes another translation block; from other threads it
        returns once the vCPU has done it (or queues it while the vCPU is parked/halted).
        """
        if length <= 0:
            return
        if self._on_cpu_thread() or self._state in (RunState.CREATED, RunState.STOPPED):
            if self._in_emu:
                with self._cond:
                    self._inval.append((gpa, length))
                    self._inval_seq += 1
                self._uc.emu_stop()
            else:
                self._invalidate_now([(gpa, length)])
            return
        with self._cond:
            self._inval.append((gpa, length))
            self._inval_seq += 1
            seq = self._inval_seq
        self.kick()
        deadline = time.monotonic() + 1.0
        with self._cond:
            while self._inval_done < seq and self._in_emu and time.monotonic() < deadline:
                self._cond.wait(0.01)

    def load_rom(self, gpa: int, data: bytes) -> None:
        """Map ``data`` read-only at ``gpa``.

        A ROM that ends at 4 GiB is the BIOS: its last 128 KiB (or all of it, if smaller) is
        also copied below 1 MiB, ending at 0xFFFFF, as a PC's BIOS alias.
        Call before :meth:`start` or while paused.

        :raises ValueError: for an empty/unaligned ROM or one that overlaps something mapped.
        """
        self._with_cpu_stopped(lambda: self._load_rom(gpa, bytes(data)))

    def _load_rom(self, gpa: int, data: bytes) -> None:
        size = len(data)
        if size == 0 or gpa % PAGE or size % PAGE or gpa + size > FOUR_GIB:
            raise ValueError(f"ROM at {gpa:#x} of {size:#x} bytes must be page aligned and below 4 GiB")
        self._check_free(gpa, gpa + size)
        buf = mmap.mmap(-1, size)
        buf[:] = bytes(data)
        self._drop_filler(gpa, gpa + size)
        self._uc.mem_map_ptr(gpa, size, uc_const.UC_PROT_READ | uc_const.UC_PROT_EXEC,
                             _addr(buf, self._exports))
        self._add_mapped(gpa, gpa + size, "rom")
        self._roms.append((gpa, buf, bytes(data)))
        if gpa + size == FOUR_GIB:
            alias = bytes(data[-min(size, BIOS_ALIAS_MAX):])
            self._bios_alias = (BIOS_ALIAS_END - len(alias), alias)
            self._copy_bios_alias()

    def map_mmio(self, base: int, size: int, read: MmioRead, write: MmioWrite) -> None:
        """Route guest-physical ``[base, base + size)`` to a device.

        Unicorn maps whole 4 KiB pages: an unaligned region takes the pages around it, and
        accesses to the rest of those pages read all ones (writes are dropped), as if
        nothing were there.  Two regions cannot share a page (map the bus instead).

        :param read: ``read(offset, size) -> int`` (offset from ``base``).
        :param write: ``write(offset, size, value)``.
        :raises ValueError: a bad range, or one overlapping RAM/ROM/another MMIO region.
        """
        self._with_cpu_stopped(lambda: self._map_mmio(base, size, read, write))

    def _map_mmio(self, base: int, size: int, read: MmioRead, write: MmioWrite) -> None:
        if base < 0 or size <= 0 or base + size > 1 << 52:
            raise ValueError(f"MMIO region {base:#x}+{size:#x} is invalid")
        start = base & ~(PAGE - 1)
        end = (base + size + PAGE - 1) & ~(PAGE - 1)
        self._check_free(start, end)
        skew = base - start

        hot_cpu = self._hot

        def on_read(_uc: object, offset: int, width: int, _ud: object) -> int:
            ones = (1 << (8 * width)) - 1
            if hot_cpu is not None:
                hot_cpu.poke = 1
            off = offset - skew
            if off < 0 or off + width > size:
                return ones
            try:
                return read(off, width) & ones
            except Exception as err:  # a device bug must not kill the vCPU
                self._report(("mmio", base), "MMIO read at %#x+%#x failed: %s", base, off, err)
                return ones

        def on_write(_uc: object, offset: int, width: int, value: int, _ud: object) -> None:
            if hot_cpu is not None:
                hot_cpu.poke = 1
            off = offset - skew
            if off < 0 or off + width > size:
                return
            try:
                write(off, width, value)
            except Exception as err:
                self._report(("mmio", base), "MMIO write at %#x+%#x failed: %s", base, off, err)

        self._drop_filler(start, end)
        self._uc.mmio_map(start, end - start, on_read, None, on_write, None)
        self._add_mapped(start, end, "mmio")
        self._mmio[base] = size

    def unmap_mmio(self, base: int, size: int) -> None:
        """Remove a region made by :meth:`map_mmio` (e.g. a BAR moving)."""
        def unmap() -> None:
            if self._mmio.get(base) != size:
                raise ValueError(f"no MMIO region at {base:#x} of size {size:#x}")
            start = base & ~(PAGE - 1)
            end = (base + size + PAGE - 1) & ~(PAGE - 1)
            self._uc.mem_unmap(start, end - start)
            del self._mmio[base]
            self._mapped = [m for m in self._mapped if m[0] != start]

        self._with_cpu_stopped(unmap)

    def _with_cpu_stopped(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which calls Unicorn) where that is safe: on the vCPU thread, before
        start/after stop, or with the vCPU parked (pausing it around ``fn`` if needed)."""
        if self._on_cpu_thread() or self._state in (RunState.CREATED, RunState.STOPPED, RunState.PAUSED):
            fn()
            return
        was_requested = self._pause_req
        self.pause()
        try:
            fn()
        finally:
            if not was_requested:
                self.resume()

    def enter_long_mode(self, rip: int, *, cr3: int, gdt_base: int, gdt_limit: int,
                        code_selector: int = 0x10, data_selector: int = 0x18,
                        rsi: int = 0, rsp: int = 0) -> None:
        """Put the CPU in 64-bit mode at ``rip``, as a loader does for Linux's 64-bit boot
        protocol (Documentation/x86/boot.rst): CR0.PE|PG, CR4.PAE, EFER.LME|LMA, flat
        CS/DS from ``code_selector``/``data_selector`` (the caller writes the GDT and the page
        tables at ``cr3`` into RAM), interrupts off.  Call before :meth:`start` or while paused.
        """
        def enter() -> None:
            st = self._st.load()
            st.set_cr(0, st.cr(0) | L.CR0_PE | L.CR0_PG)
            st.set_cr(3, cr3)
            st.set_cr(4, st.cr(4) | L.CR4_PAE)
            st.w64(L.OFF_EFER, st.efer | (1 << 8) | L.EFER_LMA)
            st.hflags = (st.hflags | L.HF_PE_MASK | L.HF_LMA_MASK) & ~L.HF_INHIBIT_IRQ_MASK
            st.w64(L.OFF_GDT + 8, gdt_base)
            st.w32(L.OFF_GDT + 16, gdt_limit)
            data = L.DESC_G_MASK | L.DESC_B_MASK | L.DESC_P_MASK | L.DESC_S_MASK | L.DESC_W_MASK | L.DESC_A_MASK
            code = (L.DESC_G_MASK | L.DESC_L_MASK | L.DESC_P_MASK | L.DESC_S_MASK | L.DESC_CS_MASK
                    | L.DESC_R_MASK | L.DESC_A_MASK)
            for seg in (L.R_SS, L.R_DS, L.R_ES, L.R_FS, L.R_GS):
                st.load_seg_cache(seg, data_selector, 0, 0xFFFFFFFF, data)
            st.load_seg_cache(L.R_CS, code_selector, 0, 0xFFFFFFFF, code)
            st.eflags = 0x2
            st.rip = rip
            st.set_reg(L.R_ESI, rsi)
            st.set_reg(L.R_ESP, rsp)
            st.store()
            self._halted = False
            self._shutdown = False
            self._flush_tlb()

        self._with_cpu_stopped(enter)

    def registers(self) -> dict[str, int]:
        """The CPU's registers (for ``info registers``); a running vCPU is paused briefly."""
        out: dict[str, int] = {}
        self._with_cpu_stopped(lambda: out.update(self._registers()))
        return out

    def _registers(self) -> dict[str, int]:
        st = CpuState(self._uc).load()
        regs = {name: st.reg(i) for i, name in enumerate(
            ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}
        regs.update(rip=st.rip, rflags=st.eflags, cpl=st.cpl, hflags=st.hflags,
                    cr0=st.cr(0), cr2=st.cr(2), cr3=st.cr(3), cr4=st.cr(4), efer=st.efer,
                    halted=int(self.halted), a20=int(self.a20_enabled))
        for i, name in enumerate(("es", "cs", "ss", "ds", "fs", "gs")):
            sel, base, limit, flags = st.seg(i)
            regs[name] = sel
            regs[name + "_base"] = base
            regs[name + "_limit"] = limit
            regs[name + "_flags"] = flags
        for off, name in ((L.OFF_GDT, "gdt"), (L.OFF_IDT, "idt"), (L.OFF_TR, "tr")):
            sel, base, limit, _f = st.table(off)
            regs[name + "_base"] = base
            regs[name + "_limit"] = limit
        return regs

    # ================================================================== memory map
    def _map_ram(self) -> None:
        size = self.ram_size
        lowmem = size if size < 0xE0000000 else 0xC0000000
        self._ram_mm = mmap.mmap(-1, size)
        self._ram = memoryview(self._ram_mm)
        base = _addr(self._ram_mm, self._exports)
        ranges = [(0, VGA_HOLE[0], 0), (VGA_HOLE[1], lowmem, VGA_HOLE[1])]
        if size > lowmem:
            ranges.append((FOUR_GIB, FOUR_GIB + size - lowmem, lowmem))
        self._ram_ranges = ranges
        for start, end, offset in ranges:
            self._uc.mem_map_ptr(start, end - start, uc_const.UC_PROT_ALL, base + offset)
            self._add_mapped(start, end, "ram")

    def _map_hidden(self) -> None:
        self._hidden = mmap.mmap(-1, 3 * PAGE)
        struct.pack_into("<Q", self._hidden, L.VMCB_MSRPM_BASE_PA, HIDDEN_GPA + PAGE)
        self._hidden[PAGE:3 * PAGE] = msr_permission_map()
        self._uc.mem_map_ptr(HIDDEN_GPA, 3 * PAGE, uc_const.UC_PROT_READ,
                             _addr(self._hidden, self._exports))

    def _add_mapped(self, start: int, end: int, kind: str) -> None:
        self._mapped.append((start, end, kind))
        self._mapped.sort()

    def _check_free(self, start: int, end: int) -> None:
        for s, e, kind in self._mapped:
            if kind != "filler" and s < end and start < e:
                raise ValueError(f"{start:#x}-{end - 1:#x} overlaps {kind} at {s:#x}-{e - 1:#x}")

    def _drop_filler(self, start: int, end: int) -> None:
        keep = []
        for s, e, kind in self._mapped:
            if kind == "filler" and s < end and start < e:
                self._uc.mem_unmap(s, e - s)
            else:
                keep.append((s, e, kind))
        self._mapped = keep

    def _map_filler(self, addr: int) -> bool:
        """Map an all-ones region around ``addr`` (nothing decodes it: reads 0xFF)."""
        lo = addr & ~(FILLER_CHUNK - 1)
        hi = lo + FILLER_CHUNK
        for s, e, _k in self._mapped:   # every boundary here is page aligned
            if s <= addr < e:
                return False
            if e <= addr:
                lo = max(lo, e)
            elif s > addr:
                hi = min(hi, s)
        self._uc.mmio_map(lo, hi - lo, _filler_read, None, _filler_write, None)
        self._add_mapped(lo, hi, "filler")
        return True

    def _lookup(self, gpa: int) -> Optional[tuple]:
        for start, end, offset in self._ram_ranges:
            if start <= gpa < end:
                return self._ram, offset + gpa - start, end - gpa, True
        for base, buf, _data in self._roms:
            if base <= gpa < base + len(buf):
                return buf, gpa - base, base + len(buf) - gpa, False
        return None

    def _slow_read(self, gpa: int, n: int) -> Optional[bytes]:
        for s, e, kind in self._mapped:
            if s <= gpa < e and kind == "mmio":
                try:
                    return bytes(self._uc.mem_read(gpa, n))
                except UcError:
                    return None
        return None

    def _slow_write(self, gpa: int, data: bytes) -> None:
        for s, e, kind in self._mapped:
            if s <= gpa < e and kind == "mmio":
                try:
                    self._uc.mem_write(gpa, data)
                except UcError:
                    pass
                return

    def _copy_bios_alias(self) -> None:
        if self._bios_alias is None:
            return
        start, data = self._bios_alias
        self._ram[start:start + len(data)] = data

    # ================================================================== reset state
    def _make_reset_state(self) -> bytes:
        """The CPU after RESET: a UC_MODE_16 context with a PC's reset values filled in."""
        real = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_16)
        real.reg_write(x86.UC_X86_REG_FPCW, 0x37F)
        real.reg_write(x86.UC_X86_REG_FPTAG, 0xFFFF)
        real.reg_write(x86.UC_X86_REG_MXCSR, 0x1F80)
        ctx = real.context_save()
        raw = (ctypes.c_char * ctx.size).from_address(ctx.context.value)
        st = self._st
        st.restore_bytes(bytes(memoryview(raw).cast("B")[L.CTX_HEADER:]))
        st.set_cr(0, RESET_CR0)
        st.eflags = 0x2
        st.hflags = st.hflags | L.HF_GUEST_MASK
        cs_flags = st.seg(L.R_CS)[3]
        for seg in (L.R_ES, L.R_SS, L.R_DS, L.R_FS, L.R_GS):
            st.load_seg_cache(seg, 0, 0, 0xFFFF, st.seg(seg)[3])
        st.load_seg_cache(L.R_CS, RESET_CS, RESET_CS_BASE, 0xFFFF, cs_flags)
        st.rip = RESET_RIP
        for i in range(16):
            st.set_reg(i, 0)
        st.set_reg(L.R_EDX, self._cpuid.signature)
        for off in (L.OFF_GDT, L.OFF_IDT):
            st.w64(off + 8, 0)
            st.w32(off + 16, 0xFFFF)
        st.w32(L.OFF_A20_MASK, 0xFFFFFFFF)
        st.w32(L.OFF_OLD_EXCEPTION, 0xFFFFFFFF)
        st.w32(L.OFF_EXC_IS_INT, 0)
        st.w64(L.OFF_VM_VMCB, HIDDEN_GPA)
        st.w64(L.OFF_INTERCEPT, _INTERCEPTS)
        return st.snapshot()

    def _do_reset(self) -> None:
        st = self._st
        st.restore_bytes(self._reset_bytes)
        st.store()
        self._uc.msr_write(MSR_IA32_MISC_ENABLE, MISC_ENABLE_DEFAULT)
        self._msrs.reset()
        self._event = None
        self._halted = False
        self._shutdown = False
        self.a20_enabled = True
        self._copy_bios_alias()
        self._restore_roms()
        self._uc.ctl_flush_tb()
        self._flush_tlb()
        self._delivery.walks.clear()

    def _restore_roms(self) -> None:
        for _base, buf, data in self._roms:
            if buf[:] != data:
                buf[:] = data
        self._hidden[PAGE:3 * PAGE] = msr_permission_map()
        self._rom_dirty = []

    def _report(self, key: object, fmt: str, *args: object) -> None:
        """Log a guest- or device-caused problem, at most a few times per ``key``: a hostile
        guest must not be able to flood the log.  Tracebacks go to the debug level."""
        count = self._reports.get(key, 0) + 1
        self._reports[key] = count
        if count <= 3:
            log.error(fmt, *args)
            log.debug("details", exc_info=True)
        elif count == 4:
            log.error("(further messages like this are suppressed)")

    # ================================================================== hooks
    def _install_hooks(self) -> None:
        uc = self._uc
        # RDTSC first of all UC_HOOK_INSN hooks.  libunicorn's RDTSC/RDTSCP/SYSCALL/SYSENTER
        # (and CPUID: we intercept that one instead, see _handle_intercept) helpers walk the whole INSN hook list and leave it as soon as
        # stop_request is set (any kick), even before reaching the matching hook; RDTSC
        # then returns the *host* TSC (guest saw its TSC jump to ~1e13 and "go backwards").
        # Only the first hook in the list is always called: it is RDTSC's, the instruction
        # guests execute most.  On the stock library the others keep that window (see
        # _hook_rdtscp); patch 0006 ("insn-hooks-kick") closes it for all of them.
        self._add_c_insn_hook(x86.UC_X86_INS_RDTSC, _INSN_CB(self._hook_rdtsc))
        self._add_c_insn_hook(x86.UC_X86_INS_RDTSCP, _INSN_CB(self._hook_rdtscp))
        uc.hook_add(uc_const.UC_HOOK_INSN, self._hook_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(uc_const.UC_HOOK_INSN, self._hook_sysenter, None, 1, 0, x86.UC_X86_INS_SYSENTER)
        uc.hook_add(uc_const.UC_HOOK_INTR, self._hook_intr)
        uc.hook_add(uc_const.UC_HOOK_INSN_INVALID, self._hook_invalid)
        # Any memory hook whose range covers a RAM page keeps that page on Unicorn's slow
        # store path (uc_mem_hook_installed): ~4x slower stores.  So these hooks are bounded
        # to the address ranges that are not RAM, one registration per range.
        for begin, end in self._non_ram_ranges():
            uc.hook_add(uc_const.UC_HOOK_MEM_READ_UNMAPPED | uc_const.UC_HOOK_MEM_WRITE_UNMAPPED,
                        self._hook_unmapped, None, begin, end)
            uc.hook_add(uc_const.UC_HOOK_MEM_FETCH_UNMAPPED | uc_const.UC_HOOK_MEM_FETCH_PROT,
                        self._hook_bad_fetch, None, begin, end)
            uc.hook_add(uc_const.UC_HOOK_MEM_WRITE_PROT, self._hook_rom_write, None, begin, end)
        # IN/OUT go through the C API, for speed (see _IN_CB); their helpers call the
        # matching hook whatever stop_request says, so their place in the list is free.
        self._add_c_insn_hook(x86.UC_X86_INS_IN, _IN_CB(self._hook_in))
        self._out_cb = _OUT_CB(self._hook_out)
        if self._hot is None:       # else the C tick's OUT hook calls it for other ports
            self._add_c_insn_hook(x86.UC_X86_INS_OUT, self._out_cb)

    def _add_c_insn_hook(self, insn: int, fptr: object) -> None:
        """Append a raw ctypes UC_HOOK_INSN callback (the Python binding offers no
        RDTSC/RDTSCP hooks; the C API does) and keep it alive."""
        self._callbacks.append(fptr)
        self._uc._Uc__do_hook_add(uc_const.UC_HOOK_INSN, fptr, 1, 0, ctypes.c_int(insn))

    def _non_ram_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ``(begin, end)`` ranges of guest-physical space that hold no RAM."""
        out = []
        pos = 0
        for start, end, _offset in sorted(self._ram_ranges):
            if start > pos:
                out.append((pos, start - 1))
            pos = end
        out.append((pos, (1 << 64) - 1))
        return out

    def _hook_in(self, _uch: int, port: int, size: int, _ud: int) -> int:
        mask = (1 << (8 * size)) - 1
        if self._hot is not None:
            self._hot.poke = 1    # a request may be queued: the next halt runs the idle hook
        try:
            return self._port_read(port, size) & mask
        except Exception as err:
            self._report(("port", port), "IN from port %#x failed: %s", port, err)
            return mask

    def _hook_out(self, _uch: int, port: int, size: int, value: int, _ud: int) -> None:
        try:
            self._port_write(port, size, value & ((1 << (8 * size)) - 1))
        except Exception as err:
            self._report(("port", port), "OUT to port %#x failed: %s", port, err)

    def _inta(self, _opaque: object) -> int:
        """libunicorn takes an external interrupt (patch 0003): the INTA cycle, on the vCPU
        thread inside ``emu_start``.  -1 tells it the request went away."""
        try:
            if self._event is not None:
                # A hook recorded an event (HLT intercept, exception, INT n) and stopped the
                # run: the loop completes it on the state it was raised in, then re-raises.
                return -1
            intc = self._intc
            if not intc.has_interrupt():
                return -1
            vector = intc.acknowledge() & 0xFF
            if intc.has_interrupt():
                uclib.irq_raise(self._uc)    # another one waits behind this one
            return vector
        except Exception as err:
            self._report("inta", "interrupt acknowledge failed: %s", err)
            return -1

    def _hlt_wait(self, _opaque: object) -> int:
        """libunicorn's HLT with IF=1 (patch 0004), on the vCPU thread inside ``emu_start``, RIP
        past the HLT: the loop's halted wait (idle hook, device timers, wake-ups) done here, so
        an idle guest's timer tick never leaves ``emu_start``.  1: an interrupt is pending
        (raised again, the CPU takes it now); 0: a kick or request came, the HLT ends the run
        as it does without this callback and the loop sees it."""
        try:
            if self._event is not None or self._inval or self._rom_dirty:
                return 0
            intc, wake = self._intc, self._wake
            self._halted = True
            while True:
                wake.clear()
                if self._kick_pending or self._inval or self._rom_dirty:
                    self._halted = False
                    return 0
                if intc.has_interrupt():
                    # If the request is gone by the INTA cycle (_inta gives -1), the guest
                    # leaves HLT without an interrupt: a spurious wake-up, which guests loop on.
                    uclib.irq_raise(self._uc)
                    self._halted = False
                    return 1
                hook = self.idle_hook
                if hook is not None and hook():
                    continue
                timers = self.timers
                if timers is None:
                    wake.wait(0.05)
                else:
                    timers.idle_wait(wake)
        except Exception as err:
            self._report("halt", "halted wait failed: %s", err)
            self._halted = False
            return 0

    def _record(self, event: tuple) -> None:
        if self._event is None:
            self._event = event
        self._uc.emu_stop()

    def _hook_intr(self, uc: object, intno: int, _ud: object) -> None:
        self._record(("intr", intno))

    def _hook_invalid(self, uc: object, _ud: object) -> bool:
        self._record(("exception", 6))
        return True

    def _hook_syscall(self, uc: object, _ud: object) -> None:
        self._record(("syscall",))

    def _hook_sysenter(self, uc: object, _ud: object) -> None:
        self._record(("sysenter",))

    def _hook_bad_fetch(self, uc: object, access: int, address: int, size: int, value: int,
                        _ud: object) -> bool:
        # Code fetched where no RAM/ROM is reads 0xFF 0xFF: an invalid opcode.
        self._record(("exception", 6))
        return False

    def _hook_unmapped(self, uc: object, access: int, address: int, size: int, value: int,
                       _ud: object) -> bool:
        try:
            return self._map_filler(address)
        except Exception as err:
            self._report("filler", "cannot map an all-ones region at %#x: %s", address, err)
            return False

    def _hook_rom_write(self, uc: object, access: int, address: int, size: int, value: int,
                        _ud: object) -> bool:
        # Unicorn has no way to drop a store: declining it re-executes the instruction
        # forever, accepting it lets the bytes land.  So the store lands, the bytes of the
        # previous one are put back now, and the loop puts back this one at its next
        # iteration, which the stopper thread brings within a millisecond.
        self._restore_rom_bytes()
        self._rom_dirty.append((address, size))
        self._kick_pending = True
        if self._hot is not None:
            self._hot.attention = 1
        with self._cond:
            self._cond.notify_all()
        return True

    def _restore_rom_bytes(self) -> list[tuple[int, int]]:
        dirty, self._rom_dirty = self._rom_dirty, []
        for address, size in dirty:
            for base, buf, data in self._roms:
                lo, hi = max(address, base), min(address + size, base + len(data))
                if lo < hi:
                    buf[lo - base:hi - base] = data[lo - base:hi - base]
            if HIDDEN_GPA <= address < HIDDEN_GPA + 3 * PAGE:
                self._hidden[PAGE:3 * PAGE] = msr_permission_map()
        return dirty

    def _tsc_ticks(self) -> int:
        return self.clock_ns() * self._tsc_hz // 1_000_000_000

    def _hook_rdtsc(self, _uch: int, _ud: int) -> int:
        try:
            tsc = self._msrs.read_tsc()
            self._uc.reg_write(x86.UC_X86_REG_RAX, tsc & 0xFFFFFFFF)
            self._uc.reg_write(x86.UC_X86_REG_RDX, tsc >> 32)
            return 1
        except Exception as err:
            self._report("rdtsc", "RDTSC emulation failed: %s", err)
            return 0

    def _hook_rdtscp(self, _uch: int, _ud: int) -> int:
        # Second in the hook list: without patch 0006, a kick between the start of the
        # RDTSCP's block and the instruction makes libunicorn skip this hook and return the
        # host TSC.  CPUID does not advertise RDTSCP (features.py, as QEMU's qemu64).
        try:
            self._hook_rdtsc(_uch, _ud)
            self._uc.reg_write(x86.UC_X86_REG_RCX, self._uc.msr_read(MSR_TSC_AUX) & 0xFFFFFFFF)
            return 1
        except Exception as err:
            self._report("rdtsc", "RDTSCP emulation failed: %s", err)
            return 0

    # ================================================================== threads
    def _on_cpu_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _wait_parked(self, timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pause_req and self._state is RunState.RUNNING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.01 if left is None else min(left, 0.01))
            return self._state in (RunState.PAUSED, RunState.STOPPED)

    def _stopper_main(self) -> None:
        """Re-issue emu_stop while a kick is unanswered (a stop outside emu_start is lost)."""
        while True:
            with self._cond:
                while not (self._kick_pending and self._in_emu) and not self._stop_req:
                    self._cond.wait()
                if self._stop_req:
                    return
            time.sleep(0.0005)
            if self._kick_pending and self._in_emu:
                self._uc.emu_stop()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException:  # the thread must end cleanly whatever happens
            log.exception("vCPU thread failed")
        finally:
            with self._cond:
                self._state = RunState.STOPPED
                self._cond.notify_all()

    def _loop(self) -> None:
        uc, st = self._uc, self._st
        while True:
            self._wake.clear()
            self._kick_pending = False
            if self._hot is not None:
                self._hot.attention = 0
            with self._cond:
                if self._pause_req and not self._stop_req:
                    self._park()
                if self._stop_req:
                    return
                reset, self._reset_req = self._reset_req, False
                a20, self._a20_req = self._a20_req, None
                inval, self._inval = self._inval, []
                inval_seq = self._inval_seq
            try:
                if reset:
                    self._do_reset()
                if a20 is not None:
                    self._apply_a20(a20)
                if inval:
                    self._invalidate_now(inval)
                    with self._cond:
                        self._inval_done = inval_seq
                        self._cond.notify_all()
                if self._rom_dirty:
                    self._invalidate_now(self._restore_rom_bytes())
                self._step()
            except Exception as err:
                self._report("internal", "internal vCPU error (%s); the CPU stops until reset", err)
                self._event = None
                self._shutdown = True

    def _park(self) -> None:
        """Called with _cond held: sit until resumed (or stopped)."""
        self._state = RunState.PAUSED
        self._pause_acct = (self._pause_acct[0], time.monotonic_ns())
        self._cond.notify_all()
        while self._pause_req and not self._stop_req:
            self._cond.wait()
        paused, since = self._pause_acct
        self._pause_acct = (paused + time.monotonic_ns() - since, None)
        self._state = RunState.RUNNING

    def _step(self) -> None:
        """One iteration: deliver what is pending, then wait or run."""
        uc, st = self._uc, self._st
        if self._shutdown:
            self._wake.wait(0.05)
            return
        st.load()
        if self._event is not None:
            event, self._event = self._event, None
            self._handle_event(event)      # leaves the blob equal to the live CPU
            if self._shutdown:
                return
        if self._native_irq:
            if self._intc.has_interrupt():
                # libunicorn takes it at the first block boundary where IF=1 and no
                # shadow is in force (exact, as QEMU); _inta gives the vector then.
                uclib.irq_raise(uc)
                if self._halted and self._delivery.can_take_interrupt():
                    self._halted = False
        elif self._intc.has_interrupt():
            if self._delivery.can_take_interrupt():
                vector = self._intc.acknowledge() & 0xFF
                self._halted = False
                self._raise(vector, Kind.HARDWARE)
                if self._shutdown:
                    return
            elif not self._halted:
                if st.eflags & L.IF and not st.eflags & L.TF:
                    # Interrupt shadow (STI, MOV SS): run exactly the one shadowed
                    # instruction under TF, then take the interrupt, as the CPU does.
                    self._single_step = True
                else:
                    # IF=0: nothing reports STI/POPF/IRET enabling it, so the stopper ends
                    # the run every 0.5 ms while an interrupt waits.
                    self._kick_pending = True
        if self._halted:
            hook = self.idle_hook
            if hook is None or not hook():
                timers = self.timers
                if timers is None:
                    self._wake.wait(0.05)
                else:
                    timers.idle_wait(self._wake)
            return
        stepping = self._single_step
        if stepping:
            self._single_step = False
            dr6 = uc.reg_read(x86.UC_X86_REG_DR6)
            st.eflags = st.eflags | L.TF
            st.store()
        self._in_emu = True
        if self._kick_pending:
            with self._cond:   # a kick came during this iteration: the stopper must watch
                self._cond.notify_all()
        try:
            uc.emu_start(st.rip, 0)
        except UcError as err:
            if self._event is None:
                self._report("emu", "emulation failure at RIP=%#x: %s; the CPU stops until reset",
                             st.rip, err)
                self._shutdown = True
        finally:
            self._in_emu = False
        if stepping:
            st.load()
            st.eflags = st.eflags & ~L.TF
            st.store()
            uc.reg_write(x86.UC_X86_REG_DR6, dr6)
            if self._event == ("intr", 1) and not st.i32(L.OFF_EXC_IS_INT):
                self._event = None     # our own single-step trap, not the guest's


    # ================================================================== events
    def _raise(self, vector: int, kind: Kind, error_code: Optional[int] = None,
               cr2: Optional[int] = None, insn_length: int = 0) -> None:
        result = self._delivery.deliver(vector, kind, error_code, cr2, insn_length)
        if result is DeliveryResult.TRIPLE_FAULT:
            self._triple_fault()

    def _triple_fault(self) -> None:
        log.debug("triple fault: CPU shut down, reset requested")
        self._shutdown = True
        self._halted = False
        if self._on_reset_request is not None:
            try:
                self._on_reset_request("triple-fault")
            except Exception as err:
                self._report("reset", "reset request handler failed: %s", err)
        else:
            self._do_reset()

    def _handle_event(self, event: tuple) -> None:
        st = self._st
        name = event[0]
        if name == "exception":
            if event[1] == 6 and self._is_icebp():
                # Unicorn decodes ICEBP (0xF1) as invalid; the CPU raises a #DB trap.
                st.rip = st.rip + self._insn_length(b"\xf1")
                self._raise(1, Kind.EXCEPTION)
            else:
                self._raise(event[1], Kind.EXCEPTION)
        elif name == "intr":
            intno = event[1]
            if intno >= L.EXCP_VMEXIT:
                self._handle_intercept(intno - L.EXCP_VMEXIT)
            elif st.i32(L.OFF_EXC_IS_INT):
                # INT n / INT3 / INTO: Unicorn already moved RIP past the instruction.
                self._raise(intno, Kind.SOFTWARE, insn_length=self._int_length())
            else:
                self._raise(intno, Kind.EXCEPTION, st.i32(L.OFF_ERROR_CODE) & 0xFFFFFFFF)
        elif name == "syscall":
            uc = self._uc
            try:
                self._delivery.syscall(uc.msr_read(MSR_STAR), uc.msr_read(MSR_LSTAR),
                                       uc.msr_read(MSR_CSTAR), uc.msr_read(MSR_FMASK))
            except GuestFault as fault:
                st.rip = st.rip - 2           # faults point at the SYSCALL itself
                self._raise(fault.vector, Kind.EXCEPTION, fault.error_code)
        elif name == "sysenter":
            uc = self._uc
            try:
                if not (st.cr(0) & L.CR0_PE):
                    raise GuestFault(13, 0)
                self._delivery.sysenter(uc.msr_read(MSR_IA32_SYSENTER_CS),
                                        uc.msr_read(MSR_IA32_SYSENTER_ESP),
                                        uc.msr_read(MSR_IA32_SYSENTER_EIP))
            except GuestFault as fault:
                st.rip = st.rip - 2
                self._raise(fault.vector, Kind.EXCEPTION, fault.error_code)

    def _insn_length(self, opcode: bytes) -> int:
        """Length of the instruction at CS:RIP that ends with ``opcode`` (prefixes skipped)."""
        st = self._st
        try:
            mem = LinearMem(st, self._phys, self._delivery.walks)
            pc = st.seg(L.R_CS)[1] + st.rip
            if mem.read(pc, len(opcode)) == opcode:     # no prefixes: the usual case
                return len(opcode)
            code = mem.read(pc, 15)
        except GuestFault:
            return len(opcode)
        i = 0
        rex = bool(st.hflags & L.HF_CS64_MASK)
        while i < 14 and (code[i] in _PREFIXES or (rex and 0x40 <= code[i] <= 0x4F)):
            i += 1
        if code[i:i + len(opcode)] == opcode:
            return i + len(opcode)
        return len(opcode)

    def _int_length(self) -> int:
        """Length of the INT3/INTO (1 byte) or INT n (2 bytes) that ends at RIP."""
        st = self._st
        try:
            last = LinearMem(st, self._phys, self._delivery.walks).read(st.seg(L.R_CS)[1] + st.rip - 1, 1)
        except GuestFault:
            return 2
        return 1 if last in (b"\xcc", b"\xce") else 2

    def _is_icebp(self) -> bool:
        st = self._st
        length = self._insn_length(b"\xf1")
        try:
            code = LinearMem(st, self._phys, self._delivery.walks).read(st.seg(L.R_CS)[1] + st.rip, length)
        except GuestFault:
            return False
        return code[-1:] == b"\xf1"

    def _handle_intercept(self, code: int) -> None:
        st = self._st
        if code == L.SVM_EXIT_HLT:
            st.rip = st.rip + self._insn_length(b"\xf4")
            st.hflags = st.hflags & ~L.HF_INHIBIT_IRQ_MASK
            st.store()
            self._halted = True
        elif code == L.SVM_EXIT_MSR:
            write = st.i32(L.OFF_ERROR_CODE) == 1
            msr = st.reg(L.R_ECX) & 0xFFFFFFFF
            try:
                if write:
                    value = (st.reg(L.R_EAX) & 0xFFFFFFFF) | ((st.reg(L.R_EDX) & 0xFFFFFFFF) << 32)
                    self._msrs.wrmsr(msr, value)
                else:
                    value = self._msrs.rdmsr(msr)
                    st.set_reg(L.R_EAX, value & 0xFFFFFFFF)
                    st.set_reg(L.R_EDX, value >> 32)
            except GuestFault as fault:
                self._raise(fault.vector, Kind.EXCEPTION, fault.error_code)
                return
            st.rip = st.rip + self._insn_length(b"\x0f\x30" if write else b"\x0f\x32")
            st.store()
        elif code == L.SVM_EXIT_CPUID:
            # An intercept, not the INSN hook: libunicorn checks intercepts before its hook
            # walk, which a kick can cut short (see _install_hooks).
            a, b, c, d = self._cpuid.lookup(st.reg(L.R_EAX) & 0xFFFFFFFF,
                                            st.reg(L.R_ECX) & 0xFFFFFFFF,
                                            bool(st.cr(4) & L.CR4_OSXSAVE))
            for index, value in ((L.R_EAX, a), (L.R_EBX, b), (L.R_ECX, c), (L.R_EDX, d)):
                st.set_reg(index, value)
            st.rip = st.rip + self._insn_length(b"\x0f\xa2")
            st.store()
        elif code == L.SVM_EXIT_ICEBP:
            # ICEBP (0xF1) is a #DB trap on hardware (kept in case a build reaches this
            # intercept; 2.1.4 decodes 0xF1 as invalid, see _handle_event).
            st.rip = st.rip + self._insn_length(b"\xf1")
            self._raise(1, Kind.EXCEPTION)
        else:
            # MONITOR/MWAIT are not advertised in CPUID: #UD, as on such a CPU.
            self._raise(6, Kind.EXCEPTION)

    # ================================================================== A20, code, TLB
    def _flush_tlb(self) -> None:
        self._uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)

    def _apply_a20(self, enabled: bool) -> None:
        st = self._st.load()
        st.w32(L.OFF_A20_MASK, 0xFFFFFFFF if enabled else ~(1 << 20))
        st.store()
        self.a20_enabled = enabled
        self._flush_tlb()

    def _invalidate_now(self, ranges: list[tuple[int, int]]) -> None:
        """Drop translations of guest-physical ranges.

        The patched library has an exact physical-range call (uclib.invalidate_code).  The
        stock ``ctl_remove_cache`` takes a *linear* address: with paging or A20 masking on we
        switch both off in the CPU state for the duration of the calls (and flush the TLB
        around them) instead of flushing every translation.
        """
        uc, st = self._uc, self._st
        if uclib.PATCHED:
            for gpa, length in ranges:
                uclib.invalidate_code(uc, gpa, length)
            return
        st.load()
        identity = not (st.cr(0) & L.CR0_PG) and st.i32(L.OFF_A20_MASK) == -1
        saved = None
        if not identity:
            saved = st.snapshot()
            st.set_cr(0, st.cr(0) & ~L.CR0_PG)
            st.w32(L.OFF_A20_MASK, 0xFFFFFFFF)
            st.store()
            self._flush_tlb()
        try:
            for gpa, length in ranges:
                page = gpa & ~(PAGE - 1)
                end = gpa + length
                while page < end:
                    uc.ctl_remove_cache(page, page + PAGE)
                    page += PAGE
        finally:
            if saved is not None:
                st.restore_bytes(saved)
                st.store()
                self._flush_tlb()


class _Waker:
    """:class:`threading.Event`'s ``set``/``clear``/``wait`` on one bare lock (held = clear):
    the vCPU waits and is woken about twice per timer tick of an idle guest, and an Event's
    condition variable costs ~20 Python calls per round.  One waiter (the vCPU thread);
    ``set`` from any thread."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        lock = self._lock
        if lock.locked():      # a running vCPU's waker is usually set already: no exception
            try:
                lock.release()
            except RuntimeError:   # set meanwhile by another thread
                pass

    def clear(self) -> None:
        self._lock.acquire(False)

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._lock.acquire(True, -1 if timeout is None else timeout):
            try:
                self._lock.release()      # stay set, as an Event
            except RuntimeError:          # a set() in between released it already
                pass
            return True
        return False


def _addr(buf: mmap.mmap, keep: list) -> int:
    """Host address of ``buf``; the ctypes view goes into ``keep`` (the VCPU's) so the mmap
    cannot be closed, and unmapped, while Unicorn still points into it."""
    view = ctypes.c_char.from_buffer(buf)
    keep.append(view)
    return ctypes.addressof(view)


def _filler_read(_uc: object, _offset: int, size: int, _ud: object) -> int:
    return (1 << (8 * size)) - 1


def _filler_write(_uc: object, _offset: int, _size: int, _value: int, _ud: object) -> None:
    return None

"""State that the idle timer tick shares with C (unicorn patch 0008, ``src/emu_hot.c``).

A halted guest's PIT tick (timer expiry, IRQ 0 through the 8259 pair, INTA, EOI, back to
HLT) runs in C inside the patched libunicorn, on the very state the Python devices use:
:class:`I8259State` (one 8259), :class:`PicState` (the pair), :class:`Pit0State` (8254
channel 0's next transition and OUT0), :class:`ClockState` (the virtual clock's offset and
the timer thread's alarm) and :class:`CpuHot` (the halted vCPU's wait).  They are ctypes
structures with 64-bit fields only, laid out exactly as the C side's (checked against
``emu_hot_layout`` when the library is installed).

One process-wide recursive mutex in the library guards all of them: :data:`LOCK` (a context
manager).  Python takes it around every access, as it took the devices' own locks before;
the C side takes it on the vCPU thread without the GIL and never calls Python while holding
it.  Taking it never blocks while holding the GIL (a failed try-lock waits in a call that
releases the GIL), so a thread holding it can always get the GIL back to release it.

Without the patched library (``EMU_UNICORN=stock``, or before :mod:`emu.cpu.uclib` is
imported) the same structures are plain Python-side memory, each device keeps its own
``threading.Lock``, and everything runs in Python as before: :func:`native` is False.
"""

from __future__ import annotations

import ctypes
import threading

#: "No deadline" in the shared structures (C's EMU_NONE).
NONE = (1 << 63) - 1

_i64 = ctypes.c_int64


class I8259State(ctypes.Structure):
    """One 8259A's registers (``struct emu_i8259``)."""

    _fields_ = [(name, _i64) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested",
        "init4", "single_mode", "ltim", "elcr", "elcr_mask", "master")]


class PicState(ctypes.Structure):
    """The master/slave pair and its INTR output (``struct emu_pic``)."""

    _fields_ = [("m", I8259State), ("s", I8259State), ("output", _i64), ("slave_out", _i64),
                ("cpu", ctypes.c_void_p)]


class Pit0State(ctypes.Structure):
    """8254 channel 0 as its timer needs it (``struct emu_pit0``): mode, count and load time
    copied from the Python channel, the next transition (ticks since load and virtual ns,
    :data:`NONE` when none) and OUT0's level as last driven."""

    _fields_ = [("mode", _i64), ("count", _i64), ("load_time", _i64), ("deadline_ticks", _i64),
                ("deadline_ns", _i64), ("irq_level", _i64), ("irq", _i64),
                ("pic", ctypes.POINTER(PicState))]


class ClockState(ctypes.Structure):
    """The virtual clock (``struct emu_clk``): ``offset`` (virtual = monotonic - offset),
    pause, the earliest Python timer (``py_deadline``), the timer thread's timerfd and what
    it is set to (``armed``, host ns), and who holds the timers while the guest halts."""

    _fields_ = [("offset", _i64), ("paused", _i64), ("paused_at", _i64), ("py_deadline", _i64),
                ("hold_deadline", _i64), ("armed", _i64), ("timerfd", _i64), ("thread", _i64),
                ("stopping", _i64), ("holder", _i64), ("py_holder", _i64), ("grace", _i64),
                ("pit", ctypes.POINTER(Pit0State)), ("cpu", ctypes.c_void_p)]


SLOW_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                          ctypes.c_void_p)

#: Reasons the C halted wait calls back into Python.
SLOW_POKE, SLOW_TIMERS, SLOW_WAIT = 1, 2, 3


class CpuHot(ctypes.Structure):
    """The vCPU's side (``struct emu_cpu``): flags the C wait reads, its futex word, the
    Python callbacks and counters (``native_ticks``: PIT expiries handled in C while halted,
    ``slow_calls``: calls back into Python, ``halts``: HLTs waited in C)."""

    _fields_ = [("uc", ctypes.c_void_p), ("pic", ctypes.POINTER(PicState)),
                ("clk", ctypes.POINTER(ClockState)), ("halted", _i64), ("attention", _i64),
                ("event", _i64), ("poke", _i64), ("wake", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("slow", SLOW_CB), ("slow_opaque", ctypes.c_void_p),
                ("py_out", OUT_CB), ("py_out_ud", ctypes.c_void_p), ("native_ticks", _i64),
                ("slow_calls", _i64), ("halts", _i64)]


_LAYOUT = (I8259State, PicState, Pit0State, ClockState, CpuHot)

#: The library's functions once :func:`install` ran (PyDLL: the GIL is kept), else None.
lib = None
#: The same library through CDLL (calls that block release the GIL).
_cdll = None


class _HotLock:
    """The library's recursive mutex as a context manager (see the module docstring)."""

    __slots__ = ("_try", "_lock", "_unlock")

    def __init__(self, pylib: ctypes.PyDLL, cdll: ctypes.CDLL) -> None:
        self._try = pylib.emu_hot_trylock
        self._try.restype = ctypes.c_int
        self._try.argtypes = []
        self._lock = cdll.emu_hot_lock
        self._lock.restype = None
        self._lock.argtypes = []
        self._unlock = pylib.emu_hot_unlock
        self._unlock.restype = None
        self._unlock.argtypes = []

    def __enter__(self) -> None:
        if not self._try():
            self._lock()          # blocks with the GIL released

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def acquire(self) -> bool:
        self.__enter__()
        return True

    def release(self) -> None:
        self._unlock()


#: The shared mutex (None until :func:`install`).
LOCK: _HotLock | None = None


def native() -> bool:
    """True when the patched library with the C tick is loaded (devices created from now on
    share their state with it)."""
    return lib is not None


def install(path: str) -> bool:
    """Load the C tick from the libunicorn at ``path`` (called by :mod:`emu.cpu.uclib` when the
    patched library exports it); False when it does not, or its layouts differ from ours."""
    global lib, _cdll, LOCK
    if lib is not None:
        return True
    try:
        pylib = ctypes.PyDLL(path)
        cdll = ctypes.CDLL(path)
        layout = pylib.emu_hot_layout
    except (OSError, AttributeError):
        return False
    layout.restype = ctypes.c_int
    layout.argtypes = [ctypes.c_int]
    if any(layout(i) != ctypes.sizeof(s) for i, s in enumerate(_LAYOUT)):
        return False
    p_pit, p_pic, p_cpu, p_clk = (ctypes.POINTER(Pit0State), ctypes.POINTER(PicState),
                                  ctypes.POINTER(CpuHot), ctypes.POINTER(ClockState))
    for name, res, args in (
            ("emu_hot_pit_fire", ctypes.c_int, [p_pit, ctypes.c_int64]),
            ("emu_hot_pic_update", ctypes.c_int, [p_pic]),
            ("emu_hot_pic_acknowledge", ctypes.c_int, [p_pic, ctypes.POINTER(ctypes.c_int)]),
            ("emu_hot_i8259_get_irq", ctypes.c_int, [ctypes.POINTER(I8259State)]),
            ("emu_hot_i8259_ocw2", None, [ctypes.POINTER(I8259State), ctypes.c_int]),
            ("emu_hot_wake", None, [p_cpu]),
            ("emu_hot_clk_wake_holder", None, [p_clk]),
            ("emu_hot_attach", ctypes.c_int, [p_cpu, ctypes.POINTER(ctypes.c_size_t)])):
        fn = getattr(pylib, name)
        fn.restype = res
        fn.argtypes = args
    wait = cdll.emu_hot_wait
    wait.restype = ctypes.c_int
    wait.argtypes = [p_cpu, ctypes.c_int64]
    _cdll = cdll
    LOCK = _HotLock(pylib, cdll)
    lib = pylib
    return True


def device_lock() -> "threading.Lock | _HotLock":
    """The lock a device whose state may be shared with C takes: :data:`LOCK` when the C tick
    is loaded, else a lock of its own."""
    return LOCK if LOCK is not None else threading.Lock()


class HotWaker:
    """The vCPU's wake-up (the :class:`emu.cpu.vcpu._Waker` API) on :class:`CpuHot`'s futex
    word, so the C halted wait and Python waits see the same wake-ups."""

    __slots__ = ("_cpu", "_ref", "_wake", "_wait")

    def __init__(self, cpu: CpuHot) -> None:
        self._cpu = cpu
        self._ref = ctypes.pointer(cpu)
        self._wake = lib.emu_hot_wake
        self._wait = _cdll.emu_hot_wait

    def set(self) -> None:
        self._wake(self._ref)

    def clear(self) -> None:
        self._cpu.wake = 0

    def is_set(self) -> bool:
        return bool(self._cpu.wake)

    def wait(self, timeout: float | None = None) -> bool:
        if self._cpu.wake:
            return True
        return bool(self._wait(self._ref, -1 if timeout is None else max(0, int(timeout * 1e9))))

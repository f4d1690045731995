"""Virtual machine time and device timers.

:class:`VirtualClock` is QEMU's ``QEMU_CLOCK_VIRTUAL``: nanoseconds that advance
with the host's monotonic clock while the VM runs and stand still while it is
paused, so a guest never sees time jump across a monitor pause (the PIT, RTC
periodic interrupts and UART timeouts all count in it).

Two ways to drive it:

* ``VirtualClock()`` follows the host; :meth:`VirtualClock.start` spawns the one
  *timer thread* that fires expired :class:`Timer` callbacks while the guest runs (it
  raises IRQ 0; the interrupt controller's notify callback reaches the vCPU).  It sleeps
  on a timerfd set to the next deadline, so arming a timer never wakes it.  A halted vCPU
  takes the timers over in :meth:`VirtualClock.idle_wait`: it sleeps until the next
  deadline itself and fires what is due on its own thread, the timer thread's alarm
  disarmed meanwhile, so a timer tick of an idle guest wakes one thread, not two.  With the
  C tick (:mod:`emu.hw.hot`) the clock's state is shared with C: 8254 channel 0's timer
  (:meth:`VirtualClock.attach_pit`) and the halted vCPU's wait then run there.
* ``VirtualClock(manual=True)`` moves only when :meth:`VirtualClock.advance` is
  called (QEMU's qtest ``clock_step``): timers fire in deadline order in the
  caller's thread with ``now()`` equal to each deadline.  Tests use it to get
  exact, fast and repeatable device timing.

Timer callbacks run without any clock lock held; they may re-arm timers.  The
timer thread takes an expiry before it calls the callback, so a device thread may
re-arm the timer in between: a callback that finds its timer ``pending`` again is
stale and should return (the new arming will call it).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import threading
import time
from typing import Callable

from emu.hw import hot

NS_PER_SEC = 1_000_000_000
#: When a halted vCPU stops firing the timers (an interrupt woke its guest), the timer thread's
#: alarm is set up to this much after the next deadline, and kept while it still rings after
#: the next one: the guest usually halts again before, and the vCPU's next waits keep that alarm
#: instead of disarming and re-arming it (a timerfd call that moves the host's next timer costs
#: ~25 us on a VM host: at 1 kHz this arms once per 3 ticks).  A guest that keeps running after
#: an idle spell sees that one tick up to this late (later ones are exact again).
HOLD_GRACE_NS = 3_000_000


class Timer:
    """A one-shot timer on a :class:`VirtualClock` (QEMU's ``QEMUTimer``).

    :param clock: the clock whose time the deadline is in.
    :param callback: called with no arguments from the timer thread (or from
        :meth:`VirtualClock.advance`) once the deadline has passed.
    """

    __slots__ = ("clock", "callback", "deadline", "_gen")

    def __init__(self, clock: "VirtualClock", callback: Callable[[], None]) -> None:
        self.clock = clock
        self.callback = callback
        self.deadline: int | None = None
        self._gen = 0

    def mod(self, deadline_ns: int) -> None:
        """(Re-)arm the timer to fire at virtual time ``deadline_ns``."""
        self.clock._arm(self, int(deadline_ns))

    def cancel(self) -> None:
        """Disarm the timer; a pending expiry is dropped."""
        self.clock._disarm(self)

    @property
    def pending(self) -> bool:
        """True while the timer is armed."""
        return self.deadline is not None


class VirtualClock:
    """VM time in nanoseconds, paused with the VM.

    :param manual: if true, time moves only through :meth:`advance` (tests, qtest).
    """

    def __init__(self, manual: bool = False) -> None:
        self.manual = manual
        #: Offset, pause, alarm and holder live in :class:`emu.hw.hot.ClockState`, which the C
        #: tick reads when it is loaded (:attr:`native`; never for a manual clock).
        self.state = st = hot.ClockState()
        self.native = hot.native() and not manual
        self._lock = hot.device_lock() if self.native else threading.Lock()
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = itertools.count()
        st.py_deadline = st.hold_deadline = st.armed = hot.NONE
        st.timerfd = -1
        st.grace = HOLD_GRACE_NS
        # Host mode: now = monotonic - offset while running; frozen at _paused_at while paused.
        self._offset = time.monotonic_ns()
        self._manual_now = 0
        self._thread: threading.Thread | None = None
        # The timer thread sleeps on _host until _armed (host monotonic ns, or None: disarmed).
        self._host: _TimerFd | _CondAlarm | None = None
        # A thread firing the timers itself while it waits (idle_wait): its wake-up event and
        # the deadline it waits for; the timer thread's alarm is disarmed meanwhile.  The C
        # tick's halted vCPU holds them the same way (state.holder), with its own wake-up.
        self._holder_ev: threading.Event | None = None
        # 8254 channel 0's timer when it runs in C (attach_pit), and the PIC it pulses.
        self._pit: hot.Pit0State | None = None
        self._pit_pic = None
        self._ref = ctypes.pointer(st)

    # The fields shared with C, as the Python code used them before (None = no value).
    @property
    def _offset(self) -> int:
        return self.state.offset

    @_offset.setter
    def _offset(self, v: int) -> None:
        self.state.offset = v

    @property
    def _paused_at(self) -> int | None:
        st = self.state
        return st.paused_at if st.paused else None

    @_paused_at.setter
    def _paused_at(self, v: int | None) -> None:
        st = self.state
        if v is None:
            st.paused = 0
        else:
            st.paused_at = v
            st.paused = 1

    @property
    def _armed(self) -> int | None:
        v = self.state.armed
        return None if v == hot.NONE else v

    @_armed.setter
    def _armed(self, v: int | None) -> None:
        self.state.armed = hot.NONE if v is None else v

    @property
    def _hold_deadline(self) -> int | None:
        v = self.state.hold_deadline
        return None if v == hot.NONE else v

    @_hold_deadline.setter
    def _hold_deadline(self, v: int | None) -> None:
        self.state.hold_deadline = hot.NONE if v is None else v

    @property
    def _holder(self) -> threading.Event | None:
        return self._holder_ev

    @_holder.setter
    def _holder(self, ev: threading.Event | None) -> None:
        self._holder_ev = ev
        self.state.py_holder = ev is not None

    @property
    def _stopping(self) -> bool:
        return bool(self.state.stopping)

    @_stopping.setter
    def _stopping(self, v: bool) -> None:
        self.state.stopping = v

    # ---- time ---------------------------------------------------------------------------------

    def now(self) -> int:
        """Current virtual time in ns (0 at creation)."""
        if self.manual:
            return self._manual_now
        paused = self._paused_at
        if paused is not None:
            return paused
        return time.monotonic_ns() - self._offset

    @property
    def running(self) -> bool:
        """False while the VM (and with it this clock) is paused."""
        return self._paused_at is None

    def pause(self) -> None:
        """Stop virtual time (QEMU: vm_stop); timers do not fire while paused."""
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self._manual_now if self.manual else time.monotonic_ns() - self._offset
                self._rearm()

    def resume(self) -> None:
        """Let virtual time run again from where it stopped."""
        with self._lock:
            if self._paused_at is not None:
                if not self.manual:
                    self._offset = time.monotonic_ns() - self._paused_at
                self._paused_at = None
                self._rearm()

    def advance(self, ns: int) -> None:
        """Manual clocks only: move time forward by ``ns``, firing due timers in order.

        :param ns: nanoseconds to add (>= 0).
        :raises ValueError: on a host-driven clock or a negative step.
        """
        if not self.manual:
            raise ValueError("advance() needs a manual clock")
        if ns < 0:
            raise ValueError("time cannot go backwards")
        target = self._manual_now + int(ns)
        while True:
            with self._lock:
                timer = self._pop_due(target)
                if timer is None:
                    self._manual_now = target
                    return
                self._manual_now = max(self._manual_now, timer[0])
                cb = timer[1]
            cb()

    # ---- timers -------------------------------------------------------------------------------

    def timer(self, callback: Callable[[], None]) -> Timer:
        """Create a disarmed :class:`Timer` on this clock."""
        return Timer(self, callback)

    def _arm(self, timer: Timer, deadline: int) -> None:
        with self._lock:
            timer._gen += 1
            timer.deadline = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), timer._gen, timer))
            st = self.state
            if deadline < st.py_deadline:
                st.py_deadline = deadline
            self._deadline_moved(deadline)

    def _deadline_moved(self, deadline: int) -> None:
        """A timer was armed for ``deadline``: wake whoever fires the timers if it is earlier
        than what they wait for (lock held)."""
        st = self.state
        holder = self._holder
        if holder is not None:
            if self._hold_deadline is None or deadline < self._hold_deadline:
                self._hold_deadline = deadline
                holder.set()           # the waiter in idle_wait fires it
        elif st.holder:
            if deadline < st.hold_deadline:
                st.hold_deadline = deadline
                hot.lib.emu_hot_clk_wake_holder(self._ref)   # the C halted wait fires it
        elif self._host is not None and not st.paused:
            host_ns = deadline + st.offset
            if host_ns < st.armed:
                self._host.arm(host_ns)
                st.armed = host_ns

    def attach_pit(self, pit: "hot.Pit0State", pic: object) -> None:
        """Let 8254 channel 0's timer run in C (native clocks only): its deadline is
        ``pit.deadline_ns``, its expiry ``emu_hot_pit_fire``, whether on the timer thread
        (:meth:`_fire_due`) or in the C halted wait; ``pic.notify()`` is called when the C side
        could not raise the interrupt itself (no native vCPU)."""
        if not self.native:
            raise ValueError("attach_pit needs a native clock")
        with self._lock:
            self._pit = pit
            self._pit_pic = pic
            self.state.pit = ctypes.pointer(pit)

    def pit_armed(self, deadline: int) -> None:
        """The attached PIT's deadline was set to ``deadline`` (lock held)."""
        self._deadline_moved(deadline)

    def _disarm(self, timer: Timer) -> None:
        with self._lock:
            timer._gen += 1
            timer.deadline = None

    def _py_next(self) -> int:
        """The earliest live Python timer's deadline or :data:`hot.NONE`, also recorded for
        the C halted wait (lock held)."""
        heap = self._heap
        while heap and heap[0][2] != heap[0][3]._gen:
            heapq.heappop(heap)
        nxt = heap[0][0] if heap else hot.NONE
        self.state.py_deadline = nxt
        return nxt

    def _pop_due(self, now: int) -> tuple[int, Callable[[], None]] | None:
        """Pop the first live timer whose deadline is <= now (lock held)."""
        heap = self._heap
        while heap:
            deadline, _, gen, timer = heap[0]
            if gen != timer._gen:
                heapq.heappop(heap)  # stale entry of a re-armed or cancelled timer
                continue
            if deadline > now:
                return None
            heapq.heappop(heap)
            timer.deadline = None
            return deadline, timer.callback
        return None

    def next_deadline(self) -> int | None:
        """Deadline of the earliest armed timer, or None."""
        with self._lock:
            return self._next_locked()

    # ---- who fires the timers --------------------------------------------------------------------

    def start(self) -> None:
        """Start the timer thread (host-driven clocks; a no-op for manual ones)."""
        if self.manual or self._thread is not None:
            return
        self._stopping = False
        self._host = host = _host_timer()
        self._armed = None
        with self._lock:
            self.state.timerfd = host.fd if isinstance(host, _TimerFd) else -1
            self.state.thread = 1
            self._rearm()
        self._thread = threading.Thread(target=self._run, name="emu-timer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the timer thread."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._host.poke()
            holder = self._holder
            if self.state.holder:
                hot.lib.emu_hot_clk_wake_holder(self._ref)
        if holder is not None:
            holder.set()
        thread.join()
        with self._lock:
            self._thread = None
            self.state.thread = 0
            self.state.timerfd = -1
            host, self._host, self._armed = self._host, None, None
        if host is not None:
            host.close()

    def idle_wait(self, wake: threading.Event, limit: float = 0.05) -> None:
        """Wait on the caller's thread until ``wake`` is set or the next timer is due, then fire
        the due timers on it: a halted vCPU's wait (QEMU's vCPU sleeping in its halted state).

        While it waits, the timer thread is left asleep (its host timer disarmed), so a timer
        tick costs one thread wake-up, the waiter's own, instead of two (the timer thread's,
        then the vCPU's from the IRQ it raised).  A timer armed meanwhile with an earlier
        deadline sets ``wake``.  Without a timer thread (manual clock, not started) this is
        ``wake.wait(limit)``.

        :param wake: the caller's wake-up event (an IRQ, a kick, a request).
        :param limit: the longest wait in seconds.
        """
        deadline = None
        with self._lock:
            if self._thread is None or self._stopping or self._paused_at is not None:
                held = False
            else:
                held = True
                deadline = self._next_locked()
                self._holder = wake
                self._hold_deadline = deadline
                armed = self._armed
                # Left armed when it rings after the deadline waited for (as an earlier
                # idle_wait left it, up to HOLD_GRACE_NS late): no syscall then.
                if armed is not None and (deadline is None or armed <= deadline + self._offset):
                    self._host.disarm()
                    self._armed = None
                now = time.monotonic_ns() - self._offset
        if not held:
            wake.wait(limit)
            return
        try:
            timeout = limit if deadline is None else min(limit, (deadline - now) / NS_PER_SEC)
            if timeout > 0:
                wake.wait(timeout)
            self._fire_due()
        finally:
            with self._lock:
                self._holder = None
                self._rearm(HOLD_GRACE_NS, lazy=True)

    def _next_locked(self) -> int | None:
        heap = self._heap
        while heap and heap[0][2] != heap[0][3]._gen:
            heapq.heappop(heap)
        nxt = heap[0][0] if heap else None
        self.state.py_deadline = hot.NONE if nxt is None else nxt
        pit = self._pit
        if pit is not None and pit.deadline_ns != hot.NONE and (nxt is None or pit.deadline_ns < nxt):
            return pit.deadline_ns
        return nxt

    def _rearm(self, grace: int = 0, lazy: bool = False) -> None:
        """Point the timer thread's host timer at the next deadline, ``grace`` ns late (lock
        held): disarmed while paused or while a waiter fires the timers (:meth:`idle_wait`).
        ``lazy``: keep an alarm that rings after the next deadline but at most ``grace`` late."""
        host = self._host
        if host is None:
            return
        if self._stopping:
            host.poke()
            return
        target = None
        if self._paused_at is None and self._holder is None and not self.state.holder:
            deadline = self._next_locked()
            if deadline is not None:
                target = deadline + self._offset
                armed = self._armed
                if lazy and armed is not None and target < armed <= target + grace:
                    return
                target += grace
        if target != self._armed:
            if target is None:
                host.disarm()
            else:
                host.arm(target)
            self._armed = target

    def _fire_due(self) -> None:
        """Fire every due timer on the calling thread, in deadline order (no lock held)."""
        pit = self._pit
        while True:
            with self._lock:
                if self._paused_at is not None:
                    return
                now = time.monotonic_ns() - self._offset
                if pit is not None and pit.deadline_ns <= now and pit.deadline_ns <= self._py_next():
                    notify = hot.lib.emu_hot_pit_fire(pit, now)
                    due = None
                else:
                    due = self._pop_due(now)
                    if due is None:
                        self._py_next()
                        return
            if due is None:
                if notify and self._pit_pic.notify is not None:
                    self._pit_pic.notify()
                continue
            try:
                due[1]()
            except Exception:  # a device bug must not kill the thread that fires timers
                import logging

                logging.getLogger(__name__).exception("timer callback failed")

    def _run(self) -> None:
        host = self._host
        while True:
            host.wait()
            with self._lock:
                if self._stopping:
                    return
                self._armed = None          # the host timer is one-shot: it fired
            self._fire_due()
            with self._lock:
                self._rearm()


class _TimerFd:
    """The timer thread's alarm: a Linux timerfd on CLOCK_MONOTONIC (``time.monotonic_ns``'s
    clock).  Arming, re-arming and disarming it are one system call each and never wake the
    thread blocked in :meth:`wait`, which a condition variable's ``wait(timeout)`` cannot do
    (a new deadline means waking the waiter to sleep again)."""

    _CLOCK_MONOTONIC = 1
    _TFD_CLOEXEC = 0o2000000
    _TFD_TIMER_ABSTIME = 1

    class _Spec(ctypes.Structure):
        _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                    ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._settime = libc.timerfd_settime
        self._settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        self._settime.restype = ctypes.c_int
        create = libc.timerfd_create
        create.argtypes = (ctypes.c_int, ctypes.c_int)
        create.restype = ctypes.c_int
        fd = create(self._CLOCK_MONOTONIC, self._TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd
        self._spec = self._Spec()
        self._ref = ctypes.byref(self._spec)

    def arm(self, host_ns: int) -> None:
        """Fire at host monotonic time ``host_ns`` (at once if that has passed)."""
        spec = self._spec
        spec.v_sec, spec.v_nsec = divmod(max(host_ns, 1), NS_PER_SEC)
        self._settime(self.fd, self._TFD_TIMER_ABSTIME, self._ref, None)

    def disarm(self) -> None:
        spec = self._spec
        spec.v_sec = spec.v_nsec = 0
        self._settime(self.fd, self._TFD_TIMER_ABSTIME, self._ref, None)

    def poke(self) -> None:
        """Wake the waiter now."""
        self.arm(1)

    def wait(self) -> None:
        try:
            os.read(self.fd, 8)
        except InterruptedError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class _CondAlarm:
    """The same alarm on a condition variable, for hosts without timerfd (each new deadline
    wakes the waiter once)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._target: int | None = None

    def arm(self, host_ns: int) -> None:
        with self._cond:
            self._target = host_ns
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._target = None
            self._cond.notify()

    def poke(self) -> None:
        self.arm(0)

    def wait(self) -> None:
        with self._cond:
            while True:
                target = self._target
                if target is not None and target <= time.monotonic_ns():
                    self._target = None
                    return
                self._cond.wait(None if target is None else (target - time.monotonic_ns()) / NS_PER_SEC)

    def close(self) -> None:
        pass


def _host_timer() -> "_TimerFd | _CondAlarm":
    try:
        return _TimerFd(ctypes.CDLL(None, use_errno=True))
    except (OSError, AttributeError):
        return _CondAlarm()

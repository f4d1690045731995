"""Virtual machine time and device timers.

:class:`VirtualClock` is QEMU's ``QEMU_CLOCK_VIRTUAL``: nanoseconds that advance
with the host's monotonic clock while the VM runs and stand still while it is
paused, so a guest never sees time jump across a monitor pause (the PIT, RTC
periodic interrupts and UART timeouts all count in it).

Two ways to drive it:

* ``VirtualClock()`` follows the host; :meth:`VirtualClock.start` spawns the one
  *timer thread* that fires expired :class:`Timer` callbacks (this is the thread
  that raises IRQ 0; the interrupt controller's notify callback kicks the vCPU).
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

import heapq
import itertools
import threading
import time
from typing import Callable

NS_PER_SEC = 1_000_000_000


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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = itertools.count()
        # Host mode: now = monotonic - offset while running; frozen at _paused_at while paused.
        self._offset = time.monotonic_ns()
        self._paused_at: int | None = None
        self._manual_now = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

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

    def resume(self) -> None:
        """Let virtual time run again from where it stopped."""
        with self._lock:
            if self._paused_at is not None:
                if not self.manual:
                    self._offset = time.monotonic_ns() - self._paused_at
                self._paused_at = None
                self._cond.notify_all()

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
            self._cond.notify_all()

    def _disarm(self, timer: Timer) -> None:
        with self._lock:
            timer._gen += 1
            timer.deadline = None

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
            while self._heap and self._heap[0][2] != self._heap[0][3]._gen:
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else None

    # ---- the timer thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the timer thread (host-driven clocks; a no-op for manual ones)."""
        if self.manual or self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="emu-timer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the timer thread."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._cond.notify_all()
        thread.join()
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    if self._paused_at is not None:
                        self._cond.wait()
                        continue
                    now = time.monotonic_ns() - self._offset
                    due = self._pop_due(now)
                    if due is not None:
                        break
                    # Find the next live deadline (stale heads were dropped by _pop_due).
                    wait = None
                    if self._heap:
                        wait = max(self._heap[0][0] - now, 0) / NS_PER_SEC
                    self._cond.wait(wait)
            try:
                due[1]()
            except Exception:  # a device bug must not kill the timer thread
                import logging

                logging.getLogger(__name__).exception("timer callback failed")

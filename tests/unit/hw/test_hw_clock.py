"""Virtual clock: manual stepping order, pause/resume, and the host-driven timer thread."""

import threading
import time

import pytest

from emu.hw.clock import NS_PER_SEC, VirtualClock

MS = 1_000_000


def test_manual_clock_fires_in_deadline_order_with_now_at_deadline():
    clock = VirtualClock(manual=True)
    fired = []
    a = clock.timer(lambda: fired.append(("a", clock.now())))
    b = clock.timer(lambda: fired.append(("b", clock.now())))
    a.mod(300)
    b.mod(100)
    clock.advance(250)
    assert fired == [("b", 100)] and clock.now() == 250
    assert a.pending and not b.pending
    clock.advance(100)
    assert fired == [("b", 100), ("a", 300)] and clock.now() == 350


def test_rearm_cancel_and_self_rearming_periodic():
    clock = VirtualClock(manual=True)
    hits = []
    t = clock.timer(lambda: (hits.append(clock.now()), t.mod(clock.now() + 10)))
    t.mod(10)
    clock.advance(55)
    assert hits == [10, 20, 30, 40, 50]
    t.cancel()
    clock.advance(100)
    assert len(hits) == 5
    u = clock.timer(lambda: hits.append("u"))
    u.mod(1000)
    u.mod(160)  # re-arming replaces the old deadline
    clock.advance(1000)
    assert hits.count("u") == 1
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert clock.next_deadline() is None


def test_host_clock_pause_freezes_time():
    clock = VirtualClock()
    t1 = clock.now()
    clock.pause()
    frozen = clock.now()
    time.sleep(0.02)
    assert clock.now() == frozen >= t1 and not clock.running
    h0 = time.monotonic_ns()
    clock.resume()
    time.sleep(0.005)
    ran = clock.now() - frozen
    h1 = time.monotonic_ns()
    assert 0 < ran <= h1 - h0  # only the time since resume counts, never the 20 ms pause
    with pytest.raises(ValueError):
        clock.advance(1)


def test_timer_thread_fires_and_holds_timers_while_paused():
    clock = VirtualClock()
    done = threading.Event()
    hits = []

    def cb():
        hits.append(clock.now())
        if len(hits) < 5:
            t.mod(clock.now() + MS)
        else:
            done.set()

    t = clock.timer(cb)
    clock.start()
    try:
        t.mod(clock.now() + MS)
        assert done.wait(5)
        assert all(b - a >= MS for a, b in zip(hits, hits[1:]))
        # paused: a due timer waits for resume
        fired = threading.Event()
        clock.pause()
        u = clock.timer(fired.set)
        u.mod(clock.now())
        assert not fired.wait(0.05)
        clock.resume()
        assert fired.wait(5)
    finally:
        clock.stop()


def test_pending_is_false_inside_own_callback_and_true_after_rearm():
    clock = VirtualClock(manual=True)
    seen = []
    t = clock.timer(lambda: seen.append(t.pending))
    t.mod(10)
    clock.advance(10)
    assert seen == [False]
    t.mod(20)
    assert t.pending and t.deadline == 20


def test_idle_wait_fires_due_timers_on_the_waiting_thread_and_wakes_for_earlier_ones():
    # A halted vCPU's wait: the timers due during it fire on the waiter's thread (the timer
    # thread's alarm is off meanwhile), and a timer armed from elsewhere with an earlier
    # deadline ends the wait at once.
    clock = VirtualClock()
    clock.start()
    try:
        me = threading.current_thread()
        ran = []
        t = clock.timer(lambda: ran.append(threading.current_thread()))
        t.mod(clock.now() + 2 * MS)
        wake = threading.Event()
        while not ran:
            clock.idle_wait(wake, limit=1.0)
        assert ran == [me] and not t.pending
        # a far deadline, then another thread arms a near one: the waiter fires it
        far = clock.timer(lambda: ran.append("far"))
        far.mod(clock.now() + 10 * NS_PER_SEC)
        near = clock.timer(lambda: ran.append(threading.current_thread()))
        arm = threading.Timer(0.01, lambda: near.mod(clock.now() + 50 * MS))
        arm.start()
        t0 = time.monotonic()
        while len(ran) < 2 and time.monotonic() - t0 < 5:
            wake.clear()                        # as the vCPU does before it waits again
            clock.idle_wait(wake, limit=1.0)
        arm.join()
        assert ran == [me, me] and far.pending
        # nobody waiting: the timer thread fires them again
        other = threading.Event()
        u = clock.timer(other.set)
        u.mod(clock.now() + MS)
        assert other.wait(5)
    finally:
        clock.stop()


def test_idle_wait_without_a_running_clock_just_waits():
    clock = VirtualClock()          # not started: nothing to take over
    fired = []
    t = clock.timer(lambda: fired.append(1))
    t.mod(0)
    wake = threading.Event()
    wake.set()
    clock.idle_wait(wake, limit=0.01)
    assert fired == [] and t.pending
    clock.pause()
    clock.start()
    try:
        wake.clear()
        clock.idle_wait(wake, limit=0.01)   # paused: virtual time stands, nothing fires
        assert fired == []
        clock.resume()
        while not fired:
            clock.idle_wait(wake, limit=0.01)
        assert fired == [1]
    finally:
        clock.stop()

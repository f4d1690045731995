"""Virtual clock: manual stepping order, pause/resume, and the host-driven timer thread."""

import threading
import time

import pytest

from emu.hw.clock import VirtualClock

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

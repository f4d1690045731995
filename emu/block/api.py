"""BlockBackend: all that devices and jobs ever see of storage.

A backend wraps the root node of a graph.  Requests run synchronously on the caller's
thread (``read``/``write``/...) or on the backend's worker threads (``aio_*``, completion
via ``callback(result_or_exception)``).  An ``aio_*`` request of a backend on local files
may instead run on an idle vCPU of its machine (:class:`IdleQueue`, the vCPU's idle hook while
its guest halts) when one claims it within :data:`IDLE_GRACE`.  Every request counts in :attr:`BlockBackend.in_flight`
from admission to completion.

:meth:`drain` is QEMU's drained section: stop admitting new requests (they wait, or for
``aio_*`` are queued), wait for in-flight ones to complete, then write back cached
metadata of the whole chain so another process (``qemu-img -U``) sees every completed
write.  :meth:`resume` re-admits and submits what was queued.  The thread that drained
may keep doing I/O through the backend (jobs and transactions do).

Accounting (``query-blockstats``): every request is counted in :attr:`BlockBackend.acct`
(:class:`BlockAcctStats`, QEMU's block/accounting.c semantics) unless made with
``account=False``; :attr:`BlockBackend.stats` is the BlockDeviceStats dict.  A request the
backend refuses before I/O (out of range, read-only, no medium) is *invalid*, one that fails
in the host is *failed*; write-zeroes counts as a write and discard as unmap, as virtio-blk
and IDE account them in QEMU.  Callers that account on their own (HMP ``qemu-io``: its
``read``/``write``/``flush``/``discard`` are not accounted in QEMU, ``aio_read``/``aio_write``/
``aio_flush`` are, ``-i`` makes an invalid one) pass ``account=False`` and use
``acct.start``/``done``/``failed``/``invalid``.  Per-node counters (``wr_highest_offset``,
the file driver's discard counters) are :attr:`emu.block.node.BlockDriverState.stats`.

Guest-side errors (offset past the end, negative length, read-only) raise
:class:`BlockRangeError` / :class:`~emu.errors.BlockError`; host errors arrive as
``BlockError`` subclasses carrying ``errno``.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from emu.block.node import BlockDriverState
from emu.errors import BlockError

log = logging.getLogger(__name__)

Callback = Callable[[Any], None]


class BlockRangeError(BlockError):
    """A request outside the device (a guest fault: report it as device status)."""


class BlockReadOnlyError(BlockError):
    """A write to a read-only backend."""


THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


class Throttle:
    """QEMU's throttling limits without bursts: each limit is a clock that a request
    advances by its cost (bytes/bps or 1/iops); a request waits until every clock that
    applies to it has caught up with real time."""

    def __init__(self, limits: dict[str, int]) -> None:
        bad = [k for k in limits if k not in THROTTLE_KEYS]
        if bad:
            raise BlockError(f"Invalid parameter '{bad[0]}'")
        if any(int(v) < 0 for v in limits.values()):
            raise BlockError("bps/iops/max values must be within [0, 1000000000000000]")
        if limits.get("bps") and (limits.get("bps_rd") or limits.get("bps_wr")):
            raise BlockError("bps and bps_rd/bps_wr cannot be used at the same time")
        if limits.get("iops") and (limits.get("iops_rd") or limits.get("iops_wr")):
            raise BlockError("iops and iops_rd/iops_wr cannot be used at the same time")
        self.limits = {k: int(v) for k, v in limits.items() if int(v)}
        self._clocks: dict[str, float] = {}
        self._lock = threading.Lock()

    def delay(self, nbytes: int, write: bool) -> float:
        """Reserve capacity for one request; returns how long the caller must wait."""
        side = "_wr" if write else "_rd"
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key, cost_of in (("bps", nbytes), ("bps" + side, nbytes), ("iops", 1), ("iops" + side, 1)):
                rate = self.limits.get(key)
                if not rate:
                    continue
                start = max(now, self._clocks.get(key, now))
                wait = max(wait, start - now)
                self._clocks[key] = start + cost_of / rate
        return wait


#: QEMU's BlockAcctType, as query-blockstats prefixes them.
ACCT_READ, ACCT_WRITE, ACCT_FLUSH, ACCT_UNMAP = "rd", "wr", "flush", "unmap"
ACCT_TYPES = (ACCT_READ, ACCT_WRITE, ACCT_FLUSH, ACCT_UNMAP)


class AcctCookie:
    """One accounted request in progress (QEMU's BlockAcctCookie)."""

    __slots__ = ("kind", "nbytes", "start_ns")

    def __init__(self, kind: str, nbytes: int, start_ns: int) -> None:
        self.kind, self.nbytes, self.start_ns = kind, nbytes, start_ns


class BlockAcctStats:
    """QEMU's BlockAcctStats (block/accounting.c) for one BlockBackend.

    Semantics, exactly as QEMU 7.2 keeps them:

    - :meth:`done`: ``<kind>_operations`` += 1, ``<kind>_bytes`` += bytes (no bytes for
      flush), ``<kind>_total_time_ns`` += latency, last access = now.
    - :meth:`failed`: ``failed_<kind>_operations`` += 1; latency and last access only
      when ``account_failed``.
    - :meth:`invalid`: ``invalid_<kind>_operations`` += 1 (a request refused before any I/O:
      out of range, read-only); last access only when ``account_invalid``.
    - ``idle_time_ns`` = now - last access, absent until something was accounted.
    - ``*_merged`` stay 0 (emu never merges requests); ``timed_stats`` is empty.

    Times come from ``time.monotonic_ns`` (QEMU: QEMU_CLOCK_REALTIME; only differences
    are reported).
    """

    def __init__(self, account_invalid: bool = True, account_failed: bool = True) -> None:
        self.account_invalid = account_invalid
        self.account_failed = account_failed
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(ACCT_TYPES, 0)
        self._ops = dict.fromkeys(ACCT_TYPES, 0)
        self._failed = dict.fromkeys(ACCT_TYPES, 0)
        self._invalid = dict.fromkeys(ACCT_TYPES, 0)
        self._time = dict.fromkeys(ACCT_TYPES, 0)
        self._last_access_ns = 0

    def start(self, kind: str, nbytes: int = 0) -> AcctCookie:
        """Begin accounting one request (QEMU's block_acct_start).

        :param kind: ``"rd"``, ``"wr"``, ``"flush"`` or ``"unmap"``.
        """
        if kind not in self._ops:
            raise ValueError(f"unknown accounting type {kind!r}")
        return AcctCookie(kind, nbytes, time.monotonic_ns())

    def done(self, cookie: AcctCookie) -> None:
        """The request completed successfully (block_acct_done)."""
        now = time.monotonic_ns()
        with self._lock:
            self._ops[cookie.kind] += 1
            self._bytes[cookie.kind] += cookie.nbytes
            self._time[cookie.kind] += now - cookie.start_ns
            self._last_access_ns = now

    def failed(self, cookie: AcctCookie) -> None:
        """The request failed with a host error (block_acct_failed)."""
        now = time.monotonic_ns()
        with self._lock:
            self._failed[cookie.kind] += 1
            if self.account_failed:
                self._time[cookie.kind] += now - cookie.start_ns
                self._last_access_ns = now

    def invalid(self, kind: str) -> None:
        """A request refused before submission (block_acct_invalid)."""
        with self._lock:
            self._invalid[kind] += 1
            if self.account_invalid:
                self._last_access_ns = time.monotonic_ns()

    def snapshot(self, wr_highest_offset: int = 0) -> dict[str, Any]:
        """The counters as QEMU's BlockDeviceStats members (query-blockstats order).

        :param wr_highest_offset: the root node's value (QEMU reports the node's there).
        """
        with self._lock:
            d: dict[str, Any] = {}
            for k in ("rd", "wr", "unmap"):
                d[f"{k}_bytes"] = self._bytes[k]
            for k in ACCT_TYPES:
                d[f"{k}_operations"] = self._ops[k]
            for k in ACCT_TYPES:
                d[f"{k}_total_time_ns"] = self._time[k]
            d["wr_highest_offset"] = wr_highest_offset
            for k in ("rd", "wr", "unmap"):
                d[f"{k}_merged"] = 0
            for k in ACCT_TYPES:
                d[f"failed_{k}_operations"] = self._failed[k]
            for k in ACCT_TYPES:
                d[f"invalid_{k}_operations"] = self._invalid[k]
            if self._last_access_ns:
                d["idle_time_ns"] = time.monotonic_ns() - self._last_access_ns
            d["account_invalid"] = self.account_invalid
            d["account_failed"] = self.account_failed
            return d


class _Job:
    """One submitted ``aio_*`` request, run exactly once by whichever thread claims it first:
    a worker, or an idle vCPU (:meth:`IdleQueue.run_one`)."""

    __slots__ = ("backend", "fn", "callback", "pool", "due", "handed", "_token")

    def __init__(self, backend: "BlockBackend", fn: Callable[[], Any], callback: Callback | None,
                 pool: "_WorkerPool") -> None:
        self.backend = backend
        self.fn: Callable[[], Any] | None = fn
        self.callback = callback
        self.pool = pool
        self.due = 0.0          # idle path: when the workers take it if no vCPU did
        self.handed = False     # idle path: given to the workers (a vCPU may still win it)
        self._token = [True]    # list.pop() is atomic: the claim

    @property
    def claimed(self) -> bool:
        return not self._token

    def hand_to_workers(self) -> None:
        """Give an idle-path request to its backend's workers (once; harmless if claimed)."""
        if not self.handed and not self.claimed:
            self.handed = True
            self.backend._idle_misses += 1
            self.pool.submit(self)

    def run(self) -> bool:
        """Run the request unless another thread claimed it; True if this call ran it."""
        try:
            self._token.pop()
        except IndexError:
            return False
        fn, callback = self.fn, self.callback
        self.fn = self.callback = None      # a claimed job left in a queue holds no data
        assert fn is not None
        self.backend._worker(fn, callback)
        return True


#: How long a request waits for an idle vCPU before the workers may take it (seconds):
#: more than a guest needs from its notify to its HLT, little next to a disk's latency.
IDLE_GRACE = 0.0003
#: How often the dispatcher looks for requests past their grace while requests come in,
#: and how long it keeps looking after the last one before it sleeps until woken.
IDLE_POLL = 0.001
IDLE_LINGER = 0.05
#: After this many requests in a row that no vCPU claimed, a backend's requests go
#: straight to the workers, except one in :data:`IDLE_PROBE` (the guest may start halting).
IDLE_MISSES = 2
IDLE_PROBE = 32

class _IdleDispatcher:
    """The safety net of one :class:`IdleQueue`: a thread that gives the workers every
    request no vCPU claimed within :data:`IDLE_GRACE` (a guest that polls instead of
    halting, a paused vCPU).

    Waking a thread per request is what the idle path saves, so this one is not woken per
    request: while requests come in it looks every :data:`IDLE_POLL` seconds, and only
    once :data:`IDLE_LINGER` passed without a new one does it sleep until the next
    submission wakes it.  A request is thus handed over between its grace and its grace
    plus one poll.  It runs at a lower priority (nice +5 where the OS allows it) so its
    polls do not push a vCPU off its core.
    """

    def __init__(self, jobs: "collections.deque[_Job]", name: str) -> None:
        self._jobs = jobs
        self._wake = threading.Event()
        self.parked = False
        self.closed = False
        self.submitted = 0      # requests seen since the start (tells the poller to linger)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        """A new idle-path request is in the queue (submitting thread)."""
        self.submitted += 1
        if self.parked:
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def _scan(self, now: float) -> bool:
        """Hand over due requests, drop claimed ones; True if some are still waiting."""
        jobs = self._jobs
        waiting = False
        for job in list(jobs):
            if job.claimed:
                try:
                    jobs.remove(job)
                except ValueError:      # a vCPU took it off meanwhile
                    pass
            elif job.due <= now or self.closed:
                job.hand_to_workers()
            else:
                waiting = True
        return waiting

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        except (AttributeError, OSError):     # not Linux, or not allowed: normal priority
            pass
        seen, last_new = self.submitted, time.monotonic()
        while not self.closed:
            now = time.monotonic()
            waiting = self._scan(now)
            if self.submitted != seen:
                seen, last_new = self.submitted, now
            if waiting or now - last_new < IDLE_LINGER:
                time.sleep(IDLE_POLL)
                continue
            # Park.  A submitter reads ``parked`` after appending its request: either it
            # sees True and wakes us, or our scan below (after parked = True) sees it.
            self.parked = True
            if self._scan(time.monotonic()) or any(not j.claimed for j in list(self._jobs)):
                self.parked = False
                continue
            self._wake.wait()
            self._wake.clear()
            self.parked = False
            seen, last_new = self.submitted, time.monotonic()
        self._scan(time.monotonic())        # closed: whatever is left goes to the workers


class IdleQueue:
    """The idle path of one machine: requests of the backends attached to it
    (:attr:`BlockBackend.idle_queue`), run by that machine's halted vCPUs (:meth:`run_one`,
    the vCPU's ``idle_hook``) or, past :data:`IDLE_GRACE`, by the backends' workers.

    A guest waiting in HLT for its disk leaves the vCPU thread with nothing to do: running
    the request there saves the two thread wake-ups of the worker path (a worker for the
    I/O, then the vCPU for the interrupt), which are most of a request's cost on a busy
    host.  The guest still runs during host I/O: a request no vCPU claims within the grace
    goes to the workers.  Only backends whose graph is local files come here
    (:meth:`BlockBackend.idle_safe`): nothing here waits for a network, a throttle or a
    blkdebug breakpoint.  One queue per machine: a vCPU never runs another machine's
    request (several machines may share a process: tests, in-process fixtures).
    """

    def __init__(self, name: str = "blk-idle-dispatch") -> None:
        self.jobs: "collections.deque[_Job]" = collections.deque()
        self._name = name
        self._lock = threading.Lock()
        self._dispatcher: _IdleDispatcher | None = None
        self.closed = False

    def _submit(self, job: _Job) -> None:
        if self.closed:                 # the machine is gone: no vCPU will claim it
            job.hand_to_workers()
            return
        d = self._dispatcher
        if d is None:
            with self._lock:
                d = self._dispatcher
                if d is None:
                    d = self._dispatcher = _IdleDispatcher(self.jobs, self._name)
        self.jobs.append(job)
        d.submit(job)

    def run_one(self) -> bool:
        """Run one waiting request of this queue on the calling thread; True if one ran
        (called at every wake-up of a halted vCPU: cheap when empty)."""
        jobs = self.jobs
        while jobs:
            try:
                job = jobs.popleft()
            except IndexError:
                return False
            if job.run():
                job.backend._idle_misses = 0
                return True
        return False

    def handoff(self, backend: "BlockBackend") -> None:
        """Give ``backend``'s waiting requests to its workers now."""
        for job in list(self.jobs):
            if job.backend is backend:
                job.hand_to_workers()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher thread (and wait up to ``timeout`` s for it to end); waiting
        requests, and any submitted later, go to the workers."""
        self.closed = True
        with self._lock:
            d = self._dispatcher
        if d is not None:
            d.close()
            if d.thread is not threading.current_thread():
                d.thread.join(timeout)


#: The queue of :func:`idle_hook` (backends with no queue of their own use it once it exists).
_default_idle: IdleQueue | None = None
_idle_lock = threading.Lock()


def idle_hook() -> Callable[[], bool]:
    """The process-wide default idle queue's hook (:meth:`IdleQueue.run_one`), created on
    the first call; backends without a queue of their own (:attr:`BlockBackend.idle_queue`)
    use it from then on.  Machines do not use it: each builds its own :class:`IdleQueue`
    and attaches its backends (:func:`emu.machine.hardware.build_hardware`)."""
    global _default_idle
    with _idle_lock:
        if _default_idle is None:
            _default_idle = IdleQueue()
    return _default_idle.run_one


def run_idle_request() -> bool:
    """Run one request of the default idle queue (:func:`idle_hook`); True if one ran."""
    q = _default_idle
    return q.run_one() if q is not None else False


class _WorkerPool:
    """A few daemon threads running submitted jobs (daemon: a request held forever at a
    blkdebug breakpoint must not keep the process from exiting)."""

    def __init__(self, n: int, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            job.run()

    def submit(self, job: _Job) -> None:
        self._q.put(job)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)


#: Drivers whose requests only touch local files (no network, no breakpoints).
_IDLE_SAFE_DRIVERS = frozenset({"file", "raw", "qcow2"})


def _local_graph(node: BlockDriverState | None) -> bool:
    while node is not None:
        if node.drv not in _IDLE_SAFE_DRIVERS or node.before_write or node.closed:
            return False
        if node.file is not None and not _local_graph(node.file):
            return False
        node = node.backing
    return True


class BlockBackend:
    """The device-facing end of a block graph.

    :param root: the root node (format node, usually).
    :param name: the device/backend name (``ide0-hd0``, ``drive0``...).
    :param workers: worker threads for ``aio_*`` requests.
    """

    def __init__(self, root: BlockDriverState | None, name: str = "", *, workers: int = 4) -> None:
        self.name = name
        self._root = root
        self._cond = threading.Condition()
        self._in_flight = 0
        self._quiesce = 0
        self._drain_owner: int | None = None
        self._queued: list[tuple[Callable[[], Any], Callback | None]] = []
        self._workers = workers
        self._pool: _WorkerPool | None = None
        self._throttle: Throttle | None = None
        self._idle_misses = 0     # idle-path requests in a row that no vCPU claimed
        self._idle_probe = 0
        #: The machine's idle path (:class:`IdleQueue`); None: the default queue of
        #: :func:`idle_hook` if one was made, else workers only.
        self.idle_queue: IdleQueue | None = None
        #: QEMU's ``discard=unmap`` (True) / ``ignore``: with ``ignore`` a discard is
        #: checked, accounted and succeeds, but does nothing (QEMU's bdrv_co_pdiscard
        #: without BDRV_O_UNMAP).  True by default here; ``-drive`` defaults to ignore.
        self.discard_unmap = True
        #: QEMU's ``detect-zeroes``: ``off``, ``on`` (a write of all zeroes becomes a
        #: write-zeroes request) or ``unmap`` (the same; emu's zero writes take no unmap flag).
        self.detect_zeroes = "off"
        self._resize_notifiers: list[Callable[[], None]] = []
        #: I/O accounting for query-blockstats (see :class:`BlockAcctStats`).
        self.acct = BlockAcctStats()

    @property
    def stats(self) -> dict[str, Any]:
        """QEMU's BlockDeviceStats of this backend (a fresh dict per call): the accounting
        of every request made through it with ``account=True`` (the default), plus the
        root node's ``wr_highest_offset``."""
        root = self._root
        return self.acct.snapshot(root.wr_highest_offset if root is not None else 0)

    def set_io_limits(self, limits: dict[str, int] | None) -> None:
        """Set QEMU-style limits (``bps``, ``bps_rd``, ``bps_wr``, ``iops``, ``iops_rd``,
        ``iops_wr``; 0 = unlimited); ``None`` or all zero removes throttling."""
        t = Throttle(limits or {})
        self._throttle = t if t.limits else None

    @property
    def io_limits(self) -> dict[str, int]:
        """The current limits (every key, 0 when unlimited)."""
        cur = self._throttle.limits if self._throttle else {}
        return {k: cur.get(k, 0) for k in THROTTLE_KEYS}

    def _throttled(self, fn: Callable[[], Any], nbytes: int, write: bool) -> Callable[[], Any]:
        t = self._throttle
        if t is None:
            return fn

        def run() -> Any:
            wait = t.delay(nbytes, write)
            if wait > 0:
                time.sleep(wait)
            return fn()
        return run

    # --- root ------------------------------------------------------------------------------
    @property
    def root(self) -> BlockDriverState | None:
        return self._root

    def set_root(self, node: BlockDriverState | None) -> None:
        """Switch the root node (external snapshot, change medium); call while drained."""
        self._root = node

    def add_resize_notifier(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after the device's node was resized (QEMU's BlockDevOps.resize_cb)."""
        self._resize_notifiers.append(fn)

    def resized(self) -> None:
        """The root node's size changed (``block_resize``): tell the device."""
        for fn in list(self._resize_notifiers):
            try:
                fn()
            except Exception:
                log.exception("resize notifier of '%s' failed", self.name)

    @property
    def size(self) -> int:
        """Virtual size of the device in bytes (0 with no medium)."""
        return self._root.size if self._root is not None else 0

    @property
    def read_only(self) -> bool:
        return self._root is None or self._root.read_only

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet completed."""
        with self._cond:
            return self._in_flight

    # --- admission -----------------------------------------------------------------------
    def _admit(self) -> None:
        with self._cond:
            if self._quiesce and self._drain_owner != threading.get_ident():
                self._cond.wait_for(lambda: not self._quiesce)
            self._in_flight += 1

    def _done(self) -> None:
        cond = self._cond
        cond.acquire()                      # the lock's own acquire: no Python-level __enter__
        try:
            self._in_flight -= 1
            if not self._in_flight:         # drain() waits for 0; nothing else waits on it
                cond.notify_all()
        finally:
            cond.release()

    def _node(self) -> BlockDriverState:
        if self._root is None:
            raise BlockError(f"Device '{self.name}' has no medium")
        return self._root

    def _check(self, offset: int, length: int, write: bool) -> BlockDriverState:
        node = self._node()
        if offset < 0 or length < 0 or offset + length > node.size:
            raise BlockRangeError(f"Request out of range: offset {offset} length {length} "
                                  f"(device '{self.name}' has {node.size} bytes)")
        if write and node.read_only:
            raise BlockReadOnlyError(f"Device '{self.name}' is read-only")
        return node

    def _run(self, fn: Callable[[], Any]) -> Any:
        self._admit()
        try:
            return fn()
        finally:
            self._done()

    def _accounted(self, kind: str, nbytes: int, fn: Callable[[], Any], account: bool) -> Callable[[], Any]:
        if not account:
            return fn
        cookie = self.acct.start(kind, nbytes)

        def run() -> Any:
            try:
                r = fn()
            except BaseException:
                self.acct.failed(cookie)
                raise
            self.acct.done(cookie)
            return r
        return run

    def _checked(self, kind: str, offset: int, length: int, write: bool, account: bool) -> BlockDriverState:
        try:
            return self._check(offset, length, write)
        except BlockError:
            if account:
                self.acct.invalid(kind)
            raise

    # --- synchronous I/O --------------------------------------------------------------------
    # ``account=False`` leaves the request out of :attr:`stats` (QEMU accounts only what
    # devices and qemu-io's aio_* commands submit; jobs and sync qemu-io commands are not).
    def read(self, offset: int, length: int, *, account: bool = True) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        node = self._checked(ACCT_READ, offset, length, False, account)
        return self._run(self._accounted(ACCT_READ, length, self._throttled(
            lambda: node.read(offset, length), length, False), account))

    def write(self, offset: int, data: bytes, *, account: bool = True) -> None:
        """Write ``data`` at ``offset``."""
        node = self._checked(ACCT_WRITE, offset, len(data), True, account)
        data = bytes(data)
        n = len(data)
        if self._zero_write(data):
            op = lambda: node.write_zeroes(offset, n)   # noqa: E731
        else:
            op = lambda: node.write(offset, data)       # noqa: E731
        self._run(self._accounted(ACCT_WRITE, n, self._throttled(op, n, True), account))

    def _zero_write(self, data: bytes) -> bool:
        """detect-zeroes: this write is all zeroes and should become a write-zeroes."""
        return self.detect_zeroes != "off" and len(data) > 0 and data.count(0) == len(data)

    def write_zeroes(self, offset: int, length: int, *, account: bool = True) -> None:
        """Make the range read as zeroes (accounted as a write of ``length`` bytes, as
        virtio-blk's WRITE_ZEROES is in QEMU)."""
        node = self._checked(ACCT_WRITE, offset, length, True, account)
        self._run(self._accounted(ACCT_WRITE, length, lambda: node.write_zeroes(offset, length), account))

    def discard(self, offset: int, length: int, *, account: bool = True) -> None:
        """Discard (trim) the range; advisory (accounted as unmap)."""
        node = self._checked(ACCT_UNMAP, offset, length, True, account)
        op = (lambda: node.discard(offset, length)) if self.discard_unmap else (lambda: None)
        self._run(self._accounted(ACCT_UNMAP, length, op, account))

    def flush(self, *, account: bool = True) -> None:
        """Write back caches and make completed writes durable."""
        try:
            node = self._node()
        except BlockError:
            if account:
                self.acct.invalid(ACCT_FLUSH)
            raise
        self._run(self._accounted(ACCT_FLUSH, 0, node.flush, account))

    # --- asynchronous I/O -------------------------------------------------------------------
    def idle_safe(self) -> bool:
        """True when a request may run on an idle vCPU (:func:`run_idle_request`): not
        throttled, and every node of the graph is an open local file, raw or qcow2 node
        with no copy-before-write hook (a backup job's target could be anything)."""
        return self._throttle is None and self._root is not None and _local_graph(self._root)

    def _submit(self, fn: Callable[[], Any], callback: Callback | None) -> None:
        with self._cond:
            if self._quiesce and self._drain_owner != threading.get_ident():
                self._queued.append((fn, callback))
                return
            self._in_flight += 1
            if self._pool is None:
                self._pool = _WorkerPool(self._workers, f"blk-{self.name}")
            pool = self._pool
        job = _Job(self, fn, callback, pool)
        idleq = self.idle_queue or _default_idle
        if idleq is not None and self.idle_safe():
            if self._idle_misses >= IDLE_MISSES:
                # The guest polls rather than halts (a BIOS): straight to the workers,
                # trying the idle path again now and then (the guest may change).
                self._idle_probe += 1
                if self._idle_probe % IDLE_PROBE:
                    pool.submit(job)
                    return
            job.due = time.monotonic() + IDLE_GRACE
            idleq._submit(job)
        else:
            pool.submit(job)

    def idle_handoff(self) -> None:
        """The guest polls this device instead of halting: give its idle-path requests to
        the workers now rather than after their grace (a device calls this from a status
        register read while it has a request in flight)."""
        idleq = self.idle_queue or _default_idle
        if idleq is not None:
            idleq.handoff(self)

    def _worker(self, fn: Callable[[], Any], callback: Callback | None) -> None:
        try:
            result: Any = fn()
        except BaseException as err:  # completion carries the error to the device
            result = err
        try:
            if callback is not None:
                callback(result)
        except Exception:
            log.exception("block completion callback of '%s' failed", self.name)
        finally:
            self._done()

    def _aio(self, fn: Callable[[], Any], callback: Callback | None, check: Callable[[], Any],
             kind: str = "", nbytes: int = 0, account: bool = False,
             native: tuple[str, int, bytes | None] | None = None) -> None:
        try:
            check()
        except BlockError as err:
            if account:
                self.acct.invalid(kind)
            if callback is not None:
                callback(err)
            return
        if native is not None and self._native_aio(native[0], native[1], nbytes, native[2],
                                                   callback, kind, account):
            return
        self._submit(self._accounted(kind, nbytes, fn, account), callback)

    def _native_target(self, write: bool) -> tuple[BlockDriverState, int] | None:
        """``(protocol node, byte offset of the guest's 0 on it)`` when requests may go
        straight to that node's driver's asynchronous I/O (``aio_submit``: rbd): root is
        the protocol node or a raw node on it, no throttling, no copy-before-write hook,
        write-back cache (a write-through write needs its flush after it), all open."""
        node = self._root
        if node is None or self._throttle is not None:
            return None
        base = 0
        if node.drv == "raw" and node.file is not None:
            if node.before_write or node.closed or (write and not node.cache_writeback):
                return None
            base = getattr(node.impl, "offset", 0)
            node = node.file
        if node.closed or node.before_write or (write and not node.cache_writeback):
            return None
        if getattr(node.impl, "aio_submit", None) is None:
            return None
        return node, base

    def _native_aio(self, op: str, offset: int, length: int, data: bytes | None,
                    callback: Callback | None, kind: str, account: bool) -> bool:
        """Submit ``op`` straight to the protocol driver's async I/O, without a worker:
        the whole queue depth is in the library at once, as QEMU keeps it (a worker would
        hold one request at a time).  Completions arrive on the driver's completion
        thread (rbd: one per image, never librbd's own) and are handled as a worker's are:
        accounting, ``callback(result)``, then the request leaves :attr:`in_flight`.  False when this
        backend has no such path (or is drained: the ordinary path queues the request)."""
        target = self._native_target(op != "read")
        if target is None:
            return False
        node, base = target
        root = self._root
        cond = self._cond
        cond.acquire()
        try:
            if self._quiesce and self._drain_owner != threading.get_ident():
                return False
            self._in_flight += 1
        finally:
            cond.release()
        cookie = self.acct.start(kind, length) if account else None
        pos = base + offset

        def finish(ret: int, got: bytes | None) -> None:
            result: Any = None
            try:
                if isinstance(ret, BaseException):
                    result = ret
                elif ret < 0:
                    result = node.impl.aio_error(op, pos, ret)
                elif op == "read":
                    got = got or b""
                    result = got if ret >= length else got[:ret] + bytes(length - ret)
                elif op in ("write", "write_zeroes"):
                    if root is not node:
                        root._note_write(offset + length)
                    node._note_write(pos + length)
                if cookie is not None:
                    if isinstance(result, BaseException):
                        self.acct.failed(cookie)
                    else:
                        self.acct.done(cookie)
                if callback is not None:
                    callback(result)
            except Exception:
                log.exception("block completion callback of '%s' failed", self.name)
            finally:
                self._done()

        try:
            node.impl.aio_submit(op, pos, length, data, finish)
        except BaseException as err:    # refused before any I/O: completes as a failure
            finish(err, None)
        return True

    def _native_rw(self, op: str, offset: int, length: int, data: bytes | None,
                   callback: Callback | None, kind: str, account: bool) -> bool:
        """aio_read/aio_write straight to :meth:`_native_aio` (rbd) without building the
        worker path's closures: a valid request on an unthrottled backend only; False
        sends it the ordinary way (which also reports a bad one)."""
        root = self._root
        if (root is None or self._throttle is not None or offset < 0 or length < 0
                or offset + length > root.size or (data is not None and root.read_only)):
            return False
        return self._native_aio(op, offset, length, data, callback, kind, account)

    def aio_read(self, offset: int, length: int, callback: Callback, *, account: bool = True) -> None:
        """Read on a worker thread (or the driver's own async I/O); ``callback(bytes | Exception)``."""
        if self._native_rw("read", offset, length, None, callback, ACCT_READ, account):
            return
        self._aio(self._throttled(lambda: self._node().read(offset, length), length, False), callback,
                  lambda: self._check(offset, length, False), ACCT_READ, length, account,
                  ("read", offset, None))

    def aio_write(self, offset: int, data: bytes, callback: Callback | None = None, *,
                  account: bool = True) -> None:
        """Write on a worker thread (or the driver's own async I/O); ``callback(None | Exception)``."""
        data = bytes(data)
        n = len(data)
        if self._zero_write(data):
            self._aio(self._throttled(lambda: self._node().write_zeroes(offset, n), n, True), callback,
                      lambda: self._check(offset, n, True), ACCT_WRITE, n, account,
                      ("write_zeroes", offset, None))
            return
        if self._native_rw("write", offset, n, data, callback, ACCT_WRITE, account):
            return
        self._aio(self._throttled(lambda: self._node().write(offset, data), n, True), callback,
                  lambda: self._check(offset, n, True), ACCT_WRITE, n, account,
                  ("write", offset, data))

    def aio_write_zeroes(self, offset: int, length: int, callback: Callback | None = None, *,
                         account: bool = True) -> None:
        self._aio(lambda: self._node().write_zeroes(offset, length), callback,
                  lambda: self._check(offset, length, True), ACCT_WRITE, length, account,
                  ("write_zeroes", offset, None))

    def aio_discard(self, offset: int, length: int, callback: Callback | None = None, *,
                    account: bool = True) -> None:
        if not self.discard_unmap:      # discard=ignore: checked and accounted, no I/O
            self._aio(lambda: None, callback, lambda: self._check(offset, length, True),
                      ACCT_UNMAP, length, account)
            return
        self._aio(lambda: self._node().discard(offset, length), callback,
                  lambda: self._check(offset, length, True), ACCT_UNMAP, length, account,
                  ("discard", offset, None))

    def aio_flush(self, callback: Callback | None = None, *, account: bool = True) -> None:
        root = self._root
        native = ("flush", 0, None) if root is not None and not root.read_only else None
        self._aio(lambda: self._node().flush(), callback, self._node, ACCT_FLUSH, 0, account, native)

    # --- drain ----------------------------------------------------------------------------
    def drain(self, timeout: float | None = None) -> None:
        """Stop admitting, wait for in-flight requests, write back cached metadata.

        Nests: each ``drain()`` needs one :meth:`resume`.
        :raises BlockError: requests still in flight after ``timeout`` seconds (the
            backend stays drained; call :meth:`resume`).
        """
        with self._cond:
            self._quiesce += 1
            self._drain_owner = threading.get_ident()
            if not self._cond.wait_for(lambda: self._in_flight == 0, timeout):
                raise BlockError(f"Timed out draining '{self.name}': {self._in_flight} request(s) in flight")
        if self._root is not None:
            for node in self._root.backing_chain():
                if not node.read_only and not node.closed:
                    node.drain_metadata()

    def resume(self) -> None:
        """End a drained section; queued ``aio_*`` requests are submitted."""
        with self._cond:
            if self._quiesce == 0:
                return
            self._quiesce -= 1
            if self._quiesce:
                return
            self._drain_owner = None
            queued, self._queued = self._queued, []
            self._cond.notify_all()
        for fn, cb in queued:
            self._submit(fn, cb)

    @property
    def drained(self) -> bool:
        with self._cond:
            return self._quiesce > 0

    @contextmanager
    def drained_section(self, timeout: float | None = None) -> Iterator[None]:
        """``with blk.drained_section(): ...`` = drain + resume."""
        self.drain(timeout)
        try:
            yield
        finally:
            self.resume()

    def close(self) -> None:
        """Drain, flush and stop the worker threads (the nodes stay in the graph)."""
        self.drain()
        try:
            if self._root is not None and not self._root.read_only and not self._root.closed:
                self._root.flush()
        finally:
            self.resume()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

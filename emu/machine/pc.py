"""The PC as a whole: run state, events, drives, and the facade the QMP monitor uses.

:class:`Machine` is what :mod:`emu.qmp` talks to (and nothing below it): ``pause()``,
``resume()``, ``reset()``, ``powerdown()``, ``quit()``, ``query_status()``, the block
devices, and ``quiesce()`` — the drained section transactions run in.

Run states follow QEMU's ``RunState`` and its transition table; events are QEMU's
(``STOP``, ``RESUME``, ``RESET``, ``POWERDOWN``, ``SHUTDOWN``) and are emitted
synchronously, in the calling thread, *before* the caller returns, so a QMP reply always
follows the events its command caused — the order QEMU shows.

Threads: QMP commands call the facade from the monitor's command thread; the vCPU and
devices post *requests* (guest reset, guest shutdown, debug exit) with :meth:`Machine.request_reset`
/ :meth:`Machine.request_shutdown` / :meth:`Machine.request_exit`, which :meth:`Machine.main_loop` (the process's main
thread) carries out, because a reset parks the vCPU and the vCPU cannot park itself.

Later layers attach without changes here or in QMP:

* a vCPU object with ``start()``, ``pause()`` (blocks until parked), ``resume()``,
  ``reset()``, ``stop()`` — :meth:`Machine.attach_vcpu`;
* devices with a ``reset()`` method — :meth:`Machine.add_reset_handler`; ACPI-like power
  buttons — :meth:`Machine.add_powerdown_notifier`;
* block devices (name, qdev path, BlockBackend) — :meth:`Machine.add_block_device`.
"""

from __future__ import annotations

import enum
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from emu.errors import EmuError
from emu.machine.config import MachineConfig
from emu.oracle.cuts import CutLog

__all__ = ["RunState", "ShutdownCause", "Machine", "MachineError", "BlockDevice", "VCpu"]


class MachineError(EmuError):
    """A facade operation refused; ``str()`` is QEMU's text (a QMP GenericError)."""


class RunState(enum.Enum):
    """QEMU's ``RunState`` (qapi/run-state.json), values as QMP spells them."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


class ShutdownCause(enum.Enum):
    """QEMU's ``ShutdownCause``: the ``reason`` of SHUTDOWN and RESET events."""

    NONE = "none"
    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_QMP_SYSTEM_RESET = "host-qmp-system-reset"
    HOST_SIGNAL = "host-signal"
    HOST_UI = "host-ui"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"
    SUBSYSTEM_RESET = "subsystem-reset"
    SNAPSHOT_LOAD = "snapshot-load"

    @property
    def is_guest(self) -> bool:
        return self in (ShutdownCause.GUEST_SHUTDOWN, ShutdownCause.GUEST_RESET,
                        ShutdownCause.GUEST_PANIC)


_S = RunState
#: QEMU's runstate_transitions_def (softmmu/runstate.c), the states emu can reach.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.PRELAUNCH: frozenset({_S.RUNNING, _S.PAUSED, _S.SHUTDOWN, _S.INMIGRATE,
                             _S.FINISH_MIGRATE}),
    _S.RUNNING: frozenset({_S.DEBUG, _S.INTERNAL_ERROR, _S.IO_ERROR, _S.PAUSED,
                           _S.FINISH_MIGRATE, _S.RESTORE_VM, _S.SAVE_VM, _S.SHUTDOWN,
                           _S.WATCHDOG, _S.GUEST_PANICKED, _S.SUSPENDED, _S.PRELAUNCH}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.SHUTDOWN, _S.SAVE_VM,
                          _S.RESTORE_VM, _S.FINISH_MIGRATE}),
    _S.SHUTDOWN: frozenset({_S.PAUSED, _S.PRELAUNCH, _S.FINISH_MIGRATE}),
    _S.INTERNAL_ERROR: frozenset({_S.PAUSED, _S.PRELAUNCH, _S.FINISH_MIGRATE}),
    _S.IO_ERROR: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.SHUTDOWN, _S.FINISH_MIGRATE}),
    _S.GUEST_PANICKED: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.FINISH_MIGRATE}),
    _S.SUSPENDED: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.SHUTDOWN, _S.FINISH_MIGRATE}),
    _S.WATCHDOG: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.FINISH_MIGRATE}),
    _S.DEBUG: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH}),
    _S.SAVE_VM: frozenset({_S.RUNNING, _S.PRELAUNCH}),
    _S.RESTORE_VM: frozenset({_S.RUNNING, _S.PRELAUNCH}),
    _S.FINISH_MIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.POSTMIGRATE, _S.PRELAUNCH}),
    _S.POSTMIGRATE: frozenset({_S.RUNNING, _S.PRELAUNCH}),
    _S.INMIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.PRELAUNCH, _S.SHUTDOWN}),
    _S.COLO: frozenset({_S.RUNNING, _S.PRELAUNCH}),
}
#: states from which ``cont`` is refused until a reset (runstate_needs_reset()).
NEEDS_RESET = frozenset({_S.INTERNAL_ERROR, _S.SHUTDOWN, _S.GUEST_PANICKED})


class VCpu(Protocol):
    """What the machine needs from a vCPU (``emu.cpu``)."""

    def start(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def reset(self) -> None: ...
    def stop(self) -> None: ...


EventListener = Callable[[str, "dict[str, Any] | None"], None]


@dataclass
class BlockDevice:
    """A named block device as ``query-block`` lists it.

    :param name: the BlockBackend name (``ide0-hd0``, ``virtio0``, ``drv2``).
    :param qdev: the attached device's QOM path (``""`` if none).
    :param backend: the ``emu.block.api.BlockBackend`` (None: no medium).
    :param node: the root ``BlockDriverState`` (None: no medium).
    """

    name: str
    qdev: str = ""
    backend: Any = None
    node: Any = None
    removable: bool = False
    locked: bool = False
    type: str = "unknown"
    io_status: str = "ok"
    media: str = "disk"
    #: the guest-visible write cache (QEMU's blk_enable_write_cache); a virtio-blk whose
    #: driver did not negotiate a flush/WCE feature turns it off, as QEMU's does
    writeback: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Machine:
    """The PC facade.

    :param config: the parsed configuration.
    """

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._state = RunState.PRELAUNCH
        self._listeners: list[EventListener] = []
        self._reset_handlers: list[Callable[[], None]] = []
        self._powerdown_notifiers: list[Callable[[], None]] = []
        self._vcpu: VCpu | None = None
        self._vcpu_started = False
        self._requests: list[tuple[str, ShutdownCause]] = []
        self._shutdown_cause: ShutdownCause | None = None
        self._exit_code = 0
        self._quiesce_depth = 0
        #: work handed to after_quiesce() by the current outermost quiesce
        self._after_quiesce: list[Callable[[], None]] | None = None
        #: one cut per outermost quiesce, for x-emu-query-cuts and the oracle
        self.cuts = CutLog()
        #: named block devices in creation order (query-block order)
        self.block_devices: list[BlockDevice] = []
        #: the block node graph (``emu.block.node.BlockGraph``) once drives are opened
        self.block_graph: Any = None
        #: host ends of ``-serial`` (``emu.chardev.Chardev``), COM1 first; the UARTs attach
        #: with ``chardev.write(bytes)`` / ``chardev.set_receiver(fn)``
        self.serial_chardevs: list[Any] = []
        self.name = config.name
        # QEMU's vm clock: advances only while the guest runs (snapshots record it)
        self._vm_clock_base = 0
        self._vm_clock_started: float | None = None

    # ------------------------------------------------------------- attach points
    def add_event_listener(self, fn: EventListener) -> None:
        """Call ``fn(name, data)`` for every event, synchronously, in emitting order."""
        self._listeners.append(fn)

    def remove_event_listener(self, fn: EventListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def attach_vcpu(self, vcpu: VCpu) -> None:
        """Attach the vCPU; it is started by :meth:`start` / :meth:`resume`."""
        with self._lock:
            self._vcpu = vcpu

    @property
    def vcpu(self) -> VCpu | None:
        return self._vcpu

    def add_reset_handler(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on every system reset (devices go back to power-on state)."""
        self._reset_handlers.append(fn)

    def add_powerdown_notifier(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on ``system_powerdown`` (an ACPI power button would)."""
        self._powerdown_notifiers.append(fn)

    def add_block_device(self, dev: BlockDevice) -> None:
        """Register a named block device (query-block lists them in this order)."""
        with self._lock:
            self.block_devices.append(dev)

    def find_block_device(self, name: str) -> BlockDevice | None:
        for d in self.block_devices:
            if d.name == name:
                return d
        return None

    # ---------------------------------------------------------------- events
    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every listener (QMP monitors fan it out)."""
        for fn in list(self._listeners):
            fn(name, data)

    # ------------------------------------------------------------- run state
    @property
    def state(self) -> RunState:
        return self._state

    def is_running(self) -> bool:
        return self._state is RunState.RUNNING

    def _set_state(self, new: RunState) -> None:
        old = self._state
        if new is old:
            return
        if new not in TRANSITIONS.get(old, frozenset()):
            raise MachineError(f"invalid runstate transition: '{old.value}' -> '{new.value}'")
        self._state = new

    def query_status(self) -> dict[str, Any]:
        """``query-status``'s StatusInfo, members in schema order.

        Lock-free (one attribute read), so monitors can answer it while a long command
        holds the machine."""
        state = self._state
        return {"running": state is RunState.RUNNING, "singlestep": False,
                "status": state.value}

    def start(self) -> None:
        """Leave prelaunch at start-up unless ``-S`` was given (QEMU's autostart)."""
        if not self.config.start_paused:
            self.resume()

    def pause(self) -> None:
        """``stop``: running -> paused with a STOP event, then every block device drained and
        written back (a cut with command ``stop``); otherwise nothing (QEMU)."""
        with self._lock:
            if not self.is_running():
                return
            if self._vcpu is not None and self._vcpu_started:
                self._vcpu.pause()
            self._set_state(RunState.PAUSED)
            self._stop_vm_clock()
            self.emit("STOP")
            # QEMU's vm_stop then drains all I/O (bdrv_drain_all: jobs show paused/running)
            # and flushes, so a paused machine's image files hold every completed write
            jobs = getattr(self, "jobs", None)
            token = jobs.drain_begin(None) if jobs is not None else None
            try:
                with self.quiesce(reason="stop"):
                    pass
            finally:
                if token is not None:
                    jobs.drain_end(token)

    def resume(self) -> None:
        """``cont``: RESUME event, then running; nothing if already running.

        :raises MachineError: ``Resetting the Virtual Machine is required`` after a
            guest shutdown (``-no-shutdown``), a panic or an internal error.
        """
        with self._lock:
            if self._state in NEEDS_RESET:
                raise MachineError("Resetting the Virtual Machine is required")
            if self.is_running():
                return
            self.emit("RESUME")
            self._set_state(RunState.RUNNING)
            self._vm_clock_started = time.monotonic()
            vcpu = self._vcpu
            if vcpu is not None:
                if not self._vcpu_started:
                    self._vcpu_started = True
                    vcpu.start()
                else:
                    vcpu.resume()

    def reset(self, cause: ShutdownCause = ShutdownCause.HOST_QMP_SYSTEM_RESET) -> None:
        """System reset: park the vCPU, reset devices and vCPU, RESET event, continue.

        A stopped machine comes back in ``prelaunch`` (QEMU's rule: any state but
        running goes to prelaunch after a reset).
        """
        with self._lock:
            vcpu = self._vcpu if self._vcpu_started else None
            running = self.is_running()
            if vcpu is not None and running:
                vcpu.pause()
            for fn in list(self._reset_handlers):
                fn()
            if vcpu is not None:
                vcpu.reset()
            self.emit("RESET", {"guest": cause.is_guest, "reason": cause.value})
            if vcpu is not None and running:
                vcpu.resume()
            if self._state not in (RunState.RUNNING, RunState.INMIGRATE,
                                   RunState.FINISH_MIGRATE):
                self._set_state(RunState.PRELAUNCH)

    def powerdown(self) -> None:
        """``system_powerdown``: POWERDOWN event, then press the (ACPI) power button."""
        with self._lock:
            self.emit("POWERDOWN")
            for fn in list(self._powerdown_notifiers):
                fn()

    def quit(self, cause: ShutdownCause = ShutdownCause.HOST_QMP_QUIT) -> None:
        """Shut the machine down for good: SHUTDOWN event now, process exit afterwards
        (the caller's reply still goes out; :meth:`main_loop` returns)."""
        with self._cond:
            if self._shutdown_cause is not None:
                return
            self.emit("SHUTDOWN", {"guest": cause.is_guest, "reason": cause.value})
            self._shutdown_cause = cause
            self._cond.notify_all()

    def vm_clock_ns(self) -> int:
        """Nanoseconds the guest has been running (QEMU's ``QEMU_CLOCK_VIRTUAL``)."""
        with self._lock:
            ns = self._vm_clock_base
            if self._vm_clock_started is not None:
                ns += int((time.monotonic() - self._vm_clock_started) * 1e9)
            return ns

    def _stop_vm_clock(self) -> None:
        if self._vm_clock_started is not None:
            self._vm_clock_base += int((time.monotonic() - self._vm_clock_started) * 1e9)
            self._vm_clock_started = None

    # ------------------------------------------------- requests from the guest side
    def request_reset(self, cause: ShutdownCause = ShutdownCause.GUEST_RESET) -> None:
        """Ask for a reset from any thread (vCPU, device); the main loop performs it.
        With ``-no-reboot`` a guest reset shuts the machine down instead."""
        with self._cond:
            self._requests.append(("reset", cause))
            self._cond.notify_all()

    def request_shutdown(self, cause: ShutdownCause = ShutdownCause.GUEST_SHUTDOWN,
                         exit_code: int = 0) -> None:
        """Ask for a shutdown from any thread (guest power-off); SHUTDOWN event, then exit."""
        with self._cond:
            self._exit_code = exit_code
            self._requests.append(("shutdown", cause))
            self._cond.notify_all()

    def request_exit(self, exit_code: int) -> None:
        """Ask for the process to end with ``exit_code`` from any thread, with no SHUTDOWN
        event and whatever ``-no-shutdown`` says: isa-debug-exit, where QEMU calls exit().

        :param exit_code: the process exit status.
        """
        with self._cond:
            self._exit_code = exit_code
            self._requests.append(("exit", ShutdownCause.NONE))
            self._cond.notify_all()

    def main_loop(self, timeout: float | None = None) -> int | None:
        """Serve requests until the machine quits; return the process exit status.

        :param timeout: give up after this many seconds and return None (tests).
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown_cause is not None:
                    return self._exit_code
                if self._requests:
                    kind, cause = self._requests.pop(0)
                    self._handle_request(kind, cause)
                    continue
                wait = None if end is None else end - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)

    def _handle_request(self, kind: str, cause: ShutdownCause) -> None:
        if kind == "exit":
            if self._shutdown_cause is None:
                self._shutdown_cause = cause    # ends main_loop; no event, as QEMU's exit()
            return
        if kind == "reset":
            if self.config.no_reboot and cause.is_guest:
                kind, cause = "shutdown", ShutdownCause.GUEST_RESET
            else:
                self.reset(cause)
                return
        if self.config.no_shutdown and cause.is_guest:
            # -no-shutdown: stop the guest instead of exiting
            self.emit("SHUTDOWN", {"guest": True, "reason": cause.value})
            if self.is_running():
                if self._vcpu is not None and self._vcpu_started:
                    self._vcpu.pause()
                self._set_state(RunState.SHUTDOWN)
                self._stop_vm_clock()
                self.emit("STOP")
            return
        self.quit(cause)

    @property
    def shutdown_cause(self) -> ShutdownCause | None:
        return self._shutdown_cause

    # -------------------------------------------------------------- quiesce
    @contextmanager
    def quiesce(self, backends: list[Any] | None = None,
                reason: str | None = None) -> Iterator[None]:
        """QEMU's drained section around a transaction.

        Stops admitting guest requests and waits until nothing is in flight on each
        BlockBackend (``backends``, default: every block device's), parks the vCPU,
        writes cached metadata back, runs the body, then re-admits requests and lets
        the vCPU continue.  Nested uses are cheap (only the outermost drains).  Work the
        body hands to :meth:`after_quiesce` runs once the guest runs again, before the
        ``with`` statement ends (the monitor's reply waits for it).

        :param backends: the BlockBackends affected; ``None`` means all of them.
        :param reason: what runs inside (the QMP command name: ``transaction``, ``stop``,
            ...), recorded in the cut report (:mod:`emu.oracle.cuts`).
        """
        after: list[Callable[[], None]] = []
        ok = False
        try:
            with self._lock:
                self._quiesce_depth += 1
                outer = self._quiesce_depth == 1
                if backends is None:
                    backends = [d.backend for d in self.block_devices if d.backend is not None]
                drained: list[Any] = []
                vcpu = self._vcpu if (self._vcpu_started and self.is_running()) else None
                try:
                    if outer:
                        self._after_quiesce = []
                        for blk in backends:
                            _drain_begin(blk)
                            drained.append(blk)
                        if vcpu is not None:
                            vcpu.pause()
                        for blk in backends:
                            _write_back(blk)
                        # drained, parked, written back: the instant the images are taken
                        self.cuts.record(self, backends, reason)
                    yield
                finally:
                    if outer:
                        for blk in reversed(drained):
                            _drain_end(blk)
                        if vcpu is not None and self.is_running():
                            vcpu.resume()
                        after, self._after_quiesce = self._after_quiesce, None
                    self._quiesce_depth -= 1
            ok = True
        finally:
            # Outside the machine lock: this may wait on the disk while the guest runs.
            errors = []
            for fn in after or ():
                try:
                    fn()
                except Exception as err:  # noqa: BLE001 - every callback runs; first error wins
                    errors.append(err)
            if ok and errors:
                raise errors[0]

    def after_quiesce(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the current outermost quiesce ends, after the guest was let go
        (at once outside a quiesce).  An exception from ``fn`` leaves the ``with`` statement
        of that quiesce."""
        with self._lock:
            pending = self._after_quiesce if self._quiesce_depth else None
            if pending is not None:
                pending.append(fn)
                return
        fn()

    # -------------------------------------------------------------- teardown
    def close(self) -> None:
        """Cancel the block jobs, stop the vCPU and close every block backend (flushing
        images)."""
        # a job still copying would write through backends about to close (QEMU's
        # bdrv_close_all cancels jobs first); outside the lock: job threads may need it
        jobs = getattr(self, "jobs", None)
        if jobs is not None:
            try:
                jobs.cancel_all()
            except Exception:   # noqa: BLE001 - teardown must go on
                pass
        with self._lock:
            if self._vcpu is not None and self._vcpu_started:
                try:
                    self._vcpu.stop()
                except Exception:   # noqa: BLE001 - teardown must go on
                    pass
            for d in self.block_devices:
                blk = d.backend
                if blk is not None and hasattr(blk, "close"):
                    try:
                        blk.close()
                    except Exception:   # noqa: BLE001
                        pass
            graph = self.block_graph
            if graph is not None and hasattr(graph, "close_all"):
                try:
                    graph.close_all()
                except Exception:   # noqa: BLE001
                    pass
            # the idle path's dispatcher thread: the backends are closed, nothing is left
            # for it (a process that builds many machines, as tests do, must not keep one
            # parked thread per machine)
            idle = getattr(getattr(self, "hardware", None), "idle_queue", None)
            if idle is not None:
                idle.close()


def _drain_begin(blk: Any) -> None:
    fn = getattr(blk, "drain_begin", None) or getattr(blk, "drain", None)
    if fn is not None:
        fn()


def _drain_end(blk: Any) -> None:
    fn = getattr(blk, "drain_end", None) or getattr(blk, "resume", None)
    if fn is not None:
        fn()


def _write_back(blk: Any) -> None:
    # BlockBackend.drain() already wrote metadata back; other backends may offer it apart
    fn = getattr(blk, "flush_metadata", None)
    if fn is not None:
        fn()

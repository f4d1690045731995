"""The ``emu`` pytest plugin: hardware regression tests in a few lines.

Registered as the ``pytest11`` entry point ``emu``, so any project with emu installed gets::

    def test_guest_says_hello(emu_machine):
        vm = emu_machine("-m", "64", "-drive", "file=hello.img,format=raw,if=ide", qmp=True)
        vm.console.expect_exact("hello")                 # COM1, through pexpect
        assert vm.qmp.cmd("query-status")["status"] == "running"
        vm.qmp.cmd("quit")
        assert vm.wait() == 0

Fixtures:

* ``emu_machine`` — a factory: ``emu_machine(*args, qmp=False, paused=False)`` starts the
  emulator with QEMU's command line (``-machine pc -nodefaults -display none -serial stdio``
  are added unless given) and returns an :class:`EmuProcess`; every process a test started is
  killed at teardown.
* ``emu_inprocess`` — a factory: ``emu_inprocess(*args)`` builds an in-process
  :class:`emu.machine.pc.Machine` (vCPU, board, disks) with COM1 captured in memory, for tests
  that look at device state directly; closed at teardown.  It is a monitor too, with no
  socket: ``vm.qmp(command, **args)`` returns the command's ``return`` value (or raises
  :class:`QmpCommandError` with QEMU's error), ``vm.hmp(line)`` returns HMP text,
  ``vm.events`` collects every event, ``vm.registers()`` names the vCPU's registers and
  ``vm.read_physical()`` / ``vm.read_virtual()`` read guest memory.

``--emu-emulator "qemu-system-x86_64 -accel tcg"`` runs the same tests on another emulator that
takes QEMU's command line (the reference), so a test proves emu behaves as QEMU does.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

__all__ = ["EmuProcess", "InProcessMachine", "QmpCommandError", "DEFAULT_ARGS", "emulator_argv"]

#: options added unless the test gives its own value for them
DEFAULT_ARGS = {"-machine": "pc", "-nodefaults": None, "-display": "none", "-serial": "stdio"}
QMP_CONNECT_TIMEOUT = 15.0


def emulator_argv(config: pytest.Config | None = None) -> list[str]:
    """The emulator command: ``--emu-emulator``, else ``$EMU_EMULATOR``, else this Python's
    ``python -m emu``."""
    text = None
    if config is not None:
        text = config.getoption("emu_emulator", default=None)
    text = text or os.environ.get("EMU_EMULATOR")
    return shlex.split(text) if text else [sys.executable, "-m", "emu"]


def _with_defaults(args: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for opt, value in DEFAULT_ARGS.items():
        if opt not in args:
            out += [opt] if value is None else [opt, value]
    return out + list(args)


class EmuProcess:
    """A running emulator: its COM1 console (``console``, a :class:`pexpect.spawn` on its
    stdio) and, with ``qmp=True``, a connected QMP client (``qmp``, qemu.qmp's synchronous
    ``QEMUMonitorProtocol``: ``cmd(name, **args)``, ``pull_event(wait)``, ``get_events``).

    :param argv: the full command line.
    :param qmp_path: the QMP unix socket (None: no QMP).
    :param timeout: default pexpect timeout in seconds.
    """

    def __init__(self, argv: list[str], qmp_path: Path | None, timeout: float = 30.0,
                 cwd: str | None = None) -> None:
        import pexpect

        self.argv = argv
        self.qmp_path = qmp_path
        self.console = pexpect.spawn(argv[0], argv[1:], timeout=timeout, encoding="latin-1",
                                     cwd=cwd, codec_errors="replace")
        self._qmp: Any = None
        self._events: list[dict[str, Any]] = []

    @property
    def qmp(self) -> Any:
        """The QMP client, connected (and capabilities negotiated) on first use."""
        if self._qmp is None:
            if self.qmp_path is None:
                raise RuntimeError("started without qmp=True")
            from qemu.qmp.legacy import QEMUMonitorProtocol

            deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
            while True:
                client = QEMUMonitorProtocol(str(self.qmp_path))
                try:
                    client.connect(negotiate=True)
                    break
                except Exception:       # noqa: BLE001 - socket not there yet: retry
                    client.close()
                    if time.monotonic() > deadline or not self.console.isalive():
                        raise
                    time.sleep(0.05)
            self._qmp = client
        return self._qmp

    def command(self, name: str, **args: Any) -> Any:
        """Run QMP command ``name``; return its ``return`` value (raises on an error reply)."""
        return self.qmp.cmd(name, **args)

    def event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the next event called ``name`` (earlier other events are kept)."""
        for i, ev in enumerate(self._events):
            if ev["event"] == name:
                return self._events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event in {timeout} s (saw {self._events})")
            ev = self.qmp.pull_event(wait=left)
            if ev is None:
                continue
            if ev["event"] == name:
                return ev
            self._events.append(ev)

    def expect(self, text: str, timeout: float | None = None) -> str:
        """Wait for ``text`` on COM1; return everything printed before it (CR LF as LF)."""
        self.console.expect_exact(text, timeout=timeout if timeout is not None else -1)
        return self.console.before.replace("\r\n", "\n")

    def output_for(self, seconds: float) -> str:
        """Everything COM1 prints during the next ``seconds``, plus what was read but not yet
        matched (pexpect's ``expect(TIMEOUT)`` would report the previous window instead)."""
        import pexpect

        out = self.console.buffer
        self.console.buffer = ""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out += self.console.read_nonblocking(4096, timeout=left)
            except pexpect.TIMEOUT:
                break
            except pexpect.EOF:
                break
        return out.replace("\r\n", "\n")

    def wait(self, timeout: float = 30.0) -> int | None:
        """Wait for the process to end; return its exit status (negative: killed by a
        signal), or None if it is still running after ``timeout``."""
        import pexpect

        deadline = time.monotonic() + timeout
        while self.console.isalive() and time.monotonic() < deadline:
            try:
                self.console.expect(pexpect.EOF, timeout=max(0.1, deadline - time.monotonic()))
            except pexpect.TIMEOUT:
                break
        if self.console.isalive():
            return None
        self.console.close()
        if self.console.signalstatus is not None:
            return -self.console.signalstatus
        return self.console.exitstatus

    def close(self) -> None:
        """Disconnect QMP and kill the process if it still runs."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:           # noqa: BLE001 - teardown
                pass
            self._qmp = None
        if self.console.isalive():
            self.console.terminate(force=True)
        try:
            self.console.close(force=True)
        except Exception:               # noqa: BLE001
            pass


class InProcessMachine:
    """An in-process emu machine built from QEMU-style arguments; COM1 goes to ``output``.

    :param args: QEMU command-line options (defaults as for :class:`EmuProcess`; ``-serial``
        is replaced by an in-memory console).
    """

    def __init__(self, args: tuple[str, ...]) -> None:
        from emu.cli import parse_args
        from emu.machine.drives import open_drives
        from emu.machine.hardware import build_hardware
        from emu.machine.pc import Machine

        argv = [a for a in _with_defaults(args)]
        i = argv.index("-serial")
        argv[i + 1] = "null"
        cfg, _ = parse_args(argv)
        cfg.serials = ["console"]
        self.output = bytearray()
        self._lock = threading.Lock()
        self.machine = Machine(cfg)
        open_drives(self.machine)
        self.console = _MemoryConsole(self)
        self.machine.serial_chardevs = [self.console]
        self.hardware = build_hardware(self.machine)
        self._loop: threading.Thread | None = None
        self.exit_status: int | None = None
        #: every event the machine emitted, as QMP sends them: ``{"event": name, "data": …}``
        self.events: list[dict[str, Any]] = []
        self.machine.add_event_listener(self._on_event)
        self._cmd_lock = threading.Lock()      # QMP runs one command at a time (QEMU's BQL)

    def _on_event(self, name: str, data: dict[str, Any] | None) -> None:
        ev: dict[str, Any] = {"event": name}
        if data is not None:
            ev["data"] = data
        with self._lock:
            self.events.append(ev)

    # ------------------------------------------------------------- monitor, in process
    def qmp(self, command: str, arguments: dict[str, Any] | None = None, **args: Any) -> Any:
        """Run QMP ``command`` as a monitor client would (arguments checked against QEMU
        7.2's schema, the same handlers) and return its ``return`` value.

        Arguments come as a dict (QMP names keep their dashes) and/or keywords:
        ``vm.qmp("blockdev-snapshot-internal-sync", device="ide0-hd0", name="s1")``.

        :raises QmpCommandError: QEMU's error reply (``error_class``, ``desc``).
        """
        from emu.qmp.commands import CommandContext, load_all
        from emu.qmp.protocol import dispatch

        load_all()
        req: dict[str, Any] = {"execute": command}
        merged = dict(arguments or {}, **args)
        if merged:
            req["arguments"] = merged
        with self._cmd_lock:
            rsp = dispatch(req, CommandContext(self.machine, _InProcessSession()),
                           negotiated=True, oob_enabled=False)
        if "error" in rsp:
            raise QmpCommandError(rsp["error"]["class"], rsp["error"]["desc"])
        return rsp["return"]

    def hmp(self, line: str) -> str:
        """Run one human-monitor command line (``info registers``, ``x /4xb 0x7c00``,
        ``qemu-io ide0-hd0 "read 0 512"`` ...); its output with LF line ends."""
        return self.qmp("human-monitor-command", {"command-line": line}).replace("\r\n", "\n")

    def registers(self) -> dict[str, int]:
        """The vCPU's registers by name (general, segment caches, descriptor tables,
        control, debug, x87 and SSE: :func:`emu.cpu.dump.named_registers`), read with the
        vCPU parked for a moment if it runs; what ``info registers`` prints."""
        from emu.cpu.dump import named_registers, read_state

        return named_registers(read_state(self.hardware.cpu))

    def read_physical(self, address: int, length: int) -> bytes:
        """Guest-physical RAM or ROM bytes (ValueError where there is neither)."""
        from emu.cpu.dump import read_physical

        data = read_physical(self.hardware.cpu, address, length)
        if data is None:
            raise ValueError(f"nothing readable in guest-physical {address:#x}+{length:#x}")
        return data

    def read_virtual(self, address: int, length: int) -> bytes:
        """Bytes at a guest-virtual (linear) address, through the page tables as they are
        now (no Accessed bits set); ValueError where a page is not mapped."""
        from emu.cpu.dump import virtual_reader

        data = virtual_reader(self.hardware.cpu)(address, length)
        if data is None:
            raise ValueError(f"guest-virtual {address:#x}+{length:#x} is not all mapped")
        return data

    def start(self) -> "InProcessMachine":
        """Leave prelaunch (unless ``-S``) and serve guest requests on a thread."""
        self.machine.start()

        def loop() -> None:
            code = None
            while code is None and self.machine.shutdown_cause is None:
                code = self.machine.main_loop(timeout=0.2)
            self.exit_status = code

        self._loop = threading.Thread(target=loop, name="emu-test-main", daemon=True)
        self._loop.start()
        return self

    def text(self) -> str:
        """COM1 output so far (latin-1, CR LF as LF)."""
        with self._lock:
            return self.output.decode("latin-1").replace("\r\n", "\n")

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """Wait until COM1 has printed ``text``; return all output.

        :raises TimeoutError: if it does not appear in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.text()
            if text in out:
                return out
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} not printed in {timeout} s; COM1 so far:\n{self.text()}")

    def send(self, data: bytes) -> None:
        """Type ``data`` on COM1."""
        self.console.receive(data)

    def close(self) -> None:
        self.machine.quit()
        if self._loop is not None:
            self._loop.join(timeout=5)
        self.machine.close()


class QmpCommandError(Exception):
    """A QMP command's error reply, raised by :meth:`InProcessMachine.qmp`."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class _InProcessSession:
    """The monitor session an in-process command runs in (negotiated, no OOB)."""

    negotiated = True
    oob_enabled = False


class _MemoryConsole:
    """COM1's host side for :class:`InProcessMachine`."""

    backend_name = "memory"

    def __init__(self, owner: InProcessMachine) -> None:
        self._owner = owner
        self._receiver: Callable[[bytes], None] | None = None

    def write(self, data: bytes) -> None:
        with self._owner._lock:
            self._owner.output += data

    def set_receiver(self, fn: Callable[[bytes], None]) -> None:
        self._receiver = fn

    def receive(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver(data)


# ------------------------------------------------------------------------- the plugin

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("emu")
    group.addoption("--emu-emulator", dest="emu_emulator", default=None,
                    help="emulator command for the emu_machine fixture (default: python -m emu); "
                         "e.g. 'qemu-system-x86_64 -accel tcg' to run the same tests on QEMU")


@pytest.fixture
def emu_machine(request: pytest.FixtureRequest) -> Iterator[Callable[..., EmuProcess]]:
    """Factory: ``emu_machine(*qemu_args, qmp=False, paused=False, timeout=30)`` →
    :class:`EmuProcess` (``paused`` adds ``-S``; ``qmp`` adds a QMP unix socket)."""
    started: list[EmuProcess] = []
    tmp = tempfile.mkdtemp(prefix="emu-test-")

    def start(*args: str, qmp: bool = False, paused: bool = False,
              timeout: float = 30.0) -> EmuProcess:
        argv = emulator_argv(request.config) + _with_defaults(tuple(args))
        qmp_path = None
        if qmp:
            qmp_path = Path(tmp) / f"qmp{len(started)}.sock"
            argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if paused:
            argv.append("-S")
        proc = EmuProcess(argv, qmp_path, timeout, cwd=tmp)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()
        for name in os.listdir(tmp):
            try:
                os.unlink(os.path.join(tmp, name))
            except OSError:
                pass
        try:
            os.rmdir(tmp)
        except OSError:
            pass


@pytest.fixture
def emu_inprocess() -> Iterator[Callable[..., InProcessMachine]]:
    """Factory: ``emu_inprocess(*qemu_args)`` → a started :class:`InProcessMachine`."""
    made: list[InProcessMachine] = []

    def make(*args: str) -> InProcessMachine:
        m = InProcessMachine(tuple(args))
        made.append(m)
        return m.start()

    try:
        yield make
    finally:
        for m in made:
            try:
                m.close()
            except Exception:           # noqa: BLE001 - teardown
                pass

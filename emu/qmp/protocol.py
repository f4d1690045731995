"""The QMP wire protocol: greeting, capability negotiation, dispatch, replies, events.

Modelled on QEMU 7.2's ``monitor/qmp.c`` + ``qapi/qmp-dispatch.c``:

* on connect the greeting ``{"QMP": {"version": …, "capabilities": ["oob"]}}``
  (:mod:`emu.qmp.greeting`; the chardev sends it, possibly before this module is imported:
  :class:`emu.chardev.EarlyGreeter`);
* before ``qmp_capabilities`` only that command exists, and every ``CommandNotFound`` is
  reworded ``Expecting capabilities negotiation with 'qmp_capabilities'``;
* each input message is checked as QEMU's ``qmp_dispatch_check_obj`` does (walking the
  members in QDict order), the command looked up, the arguments checked against its
  schema, and the command run; the reply gets the request's ``id`` (any JSON value);
  parse errors never echo an id;
* ``exec-oob`` messages bypass the queue and run at once in the I/O thread;
* every line out is :func:`emu.qmp.json.to_json` + ``\\r\\n``.

Threads: one asyncio loop (:class:`emu.chardev.IOThread`) reads and writes every
monitor; commands run one at a time on a single command thread (QEMU's big lock), so a
slow command never stalls reading, other clients, or event delivery.  Events are queued
onto the loop from whatever thread emits them, so they reach clients before the reply
of the command that caused them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
from typing import Any

from emu.chardev import Chardev
from emu.errors import QmpError
from emu.qmp.commands import COMMANDS, Command, CommandContext, load_all
from emu.qmp.errors import COMMAND_NOT_FOUND, GENERIC_ERROR, as_qmp_error, error_response
from emu.qmp.greeting import GREETING_LINE, PACKAGE, QEMU_VERSION, greeting, version_info
from emu.qmp.json import JsonMessageParser, iter_ordered, to_json

__all__ = ["QEMU_VERSION", "PACKAGE", "greeting", "dispatch", "QmpServer", "QmpSession"]

# Deep nesting (up to QEMU's limit of 1024) recurses in the parser and writer.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))

#: requests a client may have queued before emu stops reading its socket (QEMU: 8)
QMP_REQ_QUEUE_LEN_MAX = 8


def _check_obj(d: dict, allow_oob: bool) -> str:
    """QEMU's qmp_dispatch_check_obj: return the exec key or raise with QEMU's text."""
    exec_key = None
    for key, val in iter_ordered(d):
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(val, str):
                raise QmpError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise QmpError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(val, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key == "id":
            continue
        else:
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise QmpError("QMP input lacks member 'execute'")
    return exec_key


def dispatch(request: Any, ctx: CommandContext, *, negotiated: bool,
             oob_enabled: bool) -> dict[str, Any]:
    """Run one parsed request; return the response dict (``return``/``error`` + ``id``).

    :param negotiated: capability negotiation is complete (full command table).
    :param oob_enabled: the client enabled ``oob`` (``exec-oob`` allowed).
    """
    rsp: dict[str, Any]
    has_id = False
    req_id = None
    try:
        if not isinstance(request, dict):
            raise QmpError("QMP input must be a JSON object")
        if "id" in request:
            has_id, req_id = True, request["id"]
        _check_obj(request, oob_enabled)
        name = request.get("execute")
        oob = False
        if not isinstance(name, str):
            name = request["exec-oob"]
            oob = True
        cmd = COMMANDS.get(name) if (negotiated or name == "qmp_capabilities") else None
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        if oob and not cmd.allow_oob:
            raise QmpError(f"The command {name} does not support OOB")
        args = request.get("arguments", {})
        ret = _invoke(cmd, args, ctx)
        rsp = {"return": {} if ret is None else ret}
    except QmpError as e:
        if not negotiated and e.cls == COMMAND_NOT_FOUND:
            # before negotiation QEMU rewords every CommandNotFound
            e = QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                         COMMAND_NOT_FOUND)
        rsp = error_response(e)
    if has_id:
        rsp["id"] = req_id
    return rsp


def _invoke(cmd: Command, args: dict, ctx: CommandContext) -> Any:
    checked = cmd.args.check(args, "", None)
    try:
        if cmd.boxed:
            return cmd.fn(ctx, checked)
        return cmd.fn(ctx, **{k.replace("-", "_"): v for k, v in checked.items()})
    except QmpError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes a QMP error reply
        err = as_qmp_error(e)
        if err.desc.startswith("internal error:"):
            print(f"emu: QMP command {cmd.name} failed: {err.desc}", file=sys.stderr, flush=True)
        raise err from e


class QmpSession:
    """One client connection on one monitor."""

    def __init__(self, server: "QmpServer", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.oob_enabled = False
        self.parser = JsonMessageParser()
        self.queue: asyncio.Queue = asyncio.Queue(QMP_REQ_QUEUE_LEN_MAX)
        self.busy = False
        self.closed = False

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write((to_json(obj) + "\r\n").encode("ascii"))
        except (ConnectionError, OSError, RuntimeError):
            self.closed = True

    def send_line(self, line: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write(line)
        except (ConnectionError, OSError, RuntimeError):
            self.closed = True

    async def run(self) -> None:
        # the greeting went out already: the chardev sends it first (GREETING_LINE)
        consumer = asyncio.get_running_loop().create_task(self._consume())
        self.server.sessions.add(self)
        try:
            while not self.server.closing:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                for value, err in self.parser.feed(data):
                    if err is None and isinstance(value, dict) and "exec-oob" in value \
                            and "execute" not in value:
                        self.send(self._dispatch(value))    # OOB: at once, here
                        continue
                    await self.queue.put((value, err))
                if not self.oob_enabled:
                    # without OOB QEMU suspends reading while a request is pending, so
                    # input that follows (even EOF) is seen only after the replies
                    await self.queue.join()
                try:
                    await self.writer.drain()
                except (ConnectionError, OSError):
                    break
        finally:
            # the command in flight finishes; queued ones are dropped (as QEMU does)
            while not self.queue.empty():
                self.queue.get_nowait()
                self.queue.task_done()
            await self.queue.put(None)
            try:
                await consumer
            except asyncio.CancelledError:
                pass
            self.closed = True
            self.server.sessions.discard(self)

    def _dispatch(self, value: Any) -> dict[str, Any]:
        ctx = CommandContext(self.server.machine, self, self.server)
        return dispatch(value, ctx, negotiated=self.negotiated, oob_enabled=self.oob_enabled)

    def _is_inline(self, value: Any) -> bool:
        """Requests for lock-free read-only commands are answered in the I/O thread."""
        if not isinstance(value, dict):
            return True             # only QMP input checks, no command runs
        name = value.get("execute")
        cmd = COMMANDS.get(name) if isinstance(name, str) else None
        return cmd is None or cmd.inline

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            if item is None or self.server.closing:
                return
            value, err = item
            if err is not None:
                self.send(error_response(QmpError(str(err), GENERIC_ERROR)))
                self.queue.task_done()
                continue
            self.busy = True
            try:
                if not self.server.ready.is_set():
                    await loop.run_in_executor(None, self.server.ready.wait)
                    if self.server.closing:
                        return          # the machine could not be built: no answer
                if self._is_inline(value):
                    rsp = self._dispatch(value)
                else:
                    rsp = await loop.run_in_executor(self.server.executor, self._dispatch,
                                                     value)
                try:
                    self.send(rsp)
                except Exception as e:  # noqa: BLE001 - a reply that cannot be written
                    print(f"emu: QMP reply could not be serialised: {e!r}", file=sys.stderr)
                    bad = error_response(QmpError(f"internal error: {type(e).__name__}"))
                    if "id" in rsp:
                        bad["id"] = rsp["id"]
                    self.send(bad)
                try:
                    await self.writer.drain()
                except (ConnectionError, OSError):
                    pass
            finally:
                self.busy = False
                self.queue.task_done()
                self.server.idle_changed()


class QmpServer:
    """Every QMP monitor of the process, on one I/O loop, sharing one command thread.

    :param machine: the :class:`emu.machine.pc.Machine` facade.
    :param loop: the I/O loop (``IOThread.loop``).
    """

    def __init__(self, machine: Any, loop: asyncio.AbstractEventLoop) -> None:
        load_all()
        self.machine = machine
        self.loop = loop
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emu-qmp")
        self.sessions: set[QmpSession] = set()
        self.chardevs: list[Chardev] = []
        self.closing = False
        self._idle: asyncio.Event | None = None
        #: cleared by the launcher while it builds the machine after the monitors started:
        #: commands wait for it (QEMU answers nothing before its machine exists)
        self.ready = threading.Event()
        self.ready.set()
        machine.add_event_listener(self._on_event)

    def add_monitor(self, chardev: Chardev, mode: str = "control") -> None:
        """Serve a monitor on ``chardev`` (before the chardev is started): QMP
        (``mode="control"``) or the human monitor (``"readline"``)."""
        self.chardevs.append(chardev)
        if mode == "readline":
            from emu.qmp.hmp import hmp_session

            async def human(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await hmp_session(self.machine, self.executor, reader, writer)

            chardev.set_frontend(human)
        else:
            chardev.set_frontend(self._session, GREETING_LINE)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await QmpSession(self, reader, writer).run()

    def _on_event(self, name: str, data: dict[str, Any] | None) -> None:
        now = time.time()
        sec = int(now)
        ev: dict[str, Any] = {"event": name,
                              "timestamp": {"seconds": sec,
                                            "microseconds": int((now - sec) * 1e6)}}
        if data is not None:
            ev["data"] = data
        line = (to_json(ev) + "\r\n").encode("ascii")
        try:
            self.loop.call_soon_threadsafe(self._broadcast, line)
        except RuntimeError:        # loop already closed at exit
            pass

    def _broadcast(self, line: bytes) -> None:
        for s in list(self.sessions):
            if s.negotiated:
                s.send_line(line)

    def idle_changed(self) -> None:
        if self._idle is not None:
            self._idle.set()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop taking commands, let the one in flight reply (``quit``), close all."""
        self.closing = True
        self._idle = asyncio.Event()
        end = self.loop.time() + timeout
        while any(s.busy for s in self.sessions) and self.loop.time() < end:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.01, end - self.loop.time()))
            except asyncio.TimeoutError:
                break
        for s in list(self.sessions):
            try:
                await asyncio.wait_for(s.writer.drain(), 1)
            except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
                pass
        for c in self.chardevs:
            await c.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

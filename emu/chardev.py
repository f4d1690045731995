"""QEMU's character devices (``-chardev``): socket (unix/tcp, server/client, ``fd=``),
stdio, file, null — and the one asyncio loop thread that serves them all.

A chardev carries byte streams between a *frontend* (a QMP monitor, the serial port) and
the host.  Like QEMU's, a socket chardev has at most **one** connection at a time; a
second client waits (accepted by the kernel, but not served — no greeting) until the
first one leaves.  Frontends plug in with :meth:`Chardev.set_frontend`:

* a session frontend (the monitor) gets ``await session(reader, writer)`` per connection;
* a byte frontend (the serial port) uses :meth:`Chardev.write` (thread-safe; dropped while
  nobody is connected, as QEMU drops) and :meth:`Chardev.set_receiver` for input.

Backends register in one table (:func:`backend`).  Unix sockets are created owner-only
(mode 0600 before ``bind``, so no umask window) and removed again on close.
"""

from __future__ import annotations

import _socket
import _thread
import errno
import os
import stat
import sys

from emu.errors import ConfigError

# The launcher creates the chardevs (bind, listen, connect) and greets QMP clients
# (EarlyGreeter) before the I/O loop exists, on C modules only: asyncio, socket (whose enums
# cost ~10 ms of CPU with enum itself), threading and typing are imported where they are
# used, once the greeting is out.  Sockets are _socket.socket objects until their chardev
# starts on the loop (_wrap: the socket module's class, which asyncio needs).
TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import asyncio
    import socket
    from typing import Any, Awaitable, Callable

    Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: sizeof(sockaddr_un.sun_path) on Linux, the terminating NUL included
_UNIX_PATH_MAX = 108

__all__ = ["IOThread", "Chardev", "backend", "create_chardev", "BACKENDS", "EarlyGreeter",
           "SocketChardev", "StdioChardev", "FileChardev", "NullChardev"]


class IOThread:
    """The single asyncio loop thread serving every chardev and monitor."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="emu-io", daemon=True)
        self._started = False

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def call(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _cancel_all(self) -> None:
        import asyncio

        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Cancel every task (connections, servers) and stop the loop thread."""
        if self._started and self.loop.is_running():
            try:
                self.call(self._cancel_all(), timeout=5)
            except Exception:   # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


BACKENDS: dict[str, type["Chardev"]] = {}


def backend(name: str) -> Callable[[type["Chardev"]], type["Chardev"]]:
    """Register a chardev backend class under QEMU's backend name."""

    def deco(cls: type[Chardev]) -> type[Chardev]:
        BACKENDS[name] = cls
        cls.backend_name = name
        return cls

    return deco


def _bool(opts: dict[str, str], key: str, default: bool) -> bool:
    v = opts.get(key)
    if v is None:
        return default
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off'")


class Chardev:
    """Base of every backend.

    :param id: the chardev id (``-chardev …,id=``).
    :param options: the backend's options as strings, QEMU's spelling.
    """

    backend_name = ""

    def __init__(self, id: str, options: dict[str, str]) -> None:
        self.id = id
        self.options = options
        self.loop: asyncio.AbstractEventLoop | None = None
        self._session: Session | None = None
        self._receiver: Callable[[bytes], None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._slot: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()
        self.daemonized = False
        #: bytes every connection gets first (the QMP greeting), before the session runs
        self.greeting: bytes | None = None
        #: the connection the greeting already went to (EarlyGreeter), served first
        self._greeted_conn: _socket.socket | None = None

    # -- frontends
    def set_frontend(self, session: Session, greeting: bytes | None = None) -> None:
        """Serve every connection with ``session`` (a QMP monitor does this); each connection
        first gets ``greeting``, which the launcher may send before the I/O loop runs
        (:class:`EarlyGreeter`)."""
        self._session = session
        self.greeting = greeting

    def set_receiver(self, fn: Callable[[bytes], None]) -> None:
        """Deliver input bytes to ``fn`` (called in the I/O thread)."""
        self._receiver = fn

    def write(self, data: bytes) -> None:
        """Send ``data`` to the connected peer; thread-safe; dropped when unconnected."""
        loop = self.loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._write_now, bytes(data))

    def _write_now(self, data: bytes) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            w.write(data)

    async def _byte_session(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self._receiver is not None:
                self._receiver(data)

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, greeted: bool = False) -> None:
        import asyncio

        assert self._slot is not None
        try:
            async with self._slot:          # one connection at a time, as QEMU
                self._writer = writer
                try:
                    if self.greeting is not None and not greeted:
                        writer.write(self.greeting)
                    await (self._session or self._byte_session)(reader, writer)
                finally:
                    self._writer = None
                    await _close_writer(writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            await _close_writer(writer)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        assert self.loop is not None
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- lifecycle
    def prepare(self) -> None:
        """Synchronous set-up at start-up (bind, connect); raises ConfigError."""

    def greet_early(self) -> _socket.socket | None:
        """Before the loop runs: send :attr:`greeting` to a peer already there (a connected
        socket, stdout) and return None, or return the listening socket whose first client
        should get it (:class:`EarlyGreeter`); by default nothing happens early."""
        return None

    def take_early_client(self, conn: _socket.socket) -> None:
        """EarlyGreeter accepted ``conn`` on the listener and greeted it: serve it first."""
        self._greeted_conn = conn

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving on ``loop``."""
        import asyncio

        self.loop = loop
        self._slot = asyncio.Lock()

    def discard(self) -> None:
        """Release what :meth:`prepare` took, for a chardev that never started (start-up
        failed first): sockets closed, a unix socket's path removed."""

    async def close(self) -> None:
        """Stop serving and close every connection."""
        for t in list(self._tasks):
            t.cancel()
        w = self._writer
        if w is not None:
            await _close_writer(w)


async def _close_writer(w: asyncio.StreamWriter) -> None:
    import asyncio

    try:
        if not w.is_closing():
            try:
                await asyncio.wait_for(w.drain(), 2)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
            w.close()
        await asyncio.wait_for(w.wait_closed(), 2)
    except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
        pass


@backend("socket")
class SocketChardev(Chardev):
    """``-chardev socket``: ``path=`` (unix) or ``host=,port=`` (tcp) or ``fd=N``;
    ``server=on`` listens (``wait=on`` blocks start-up until the first client),
    otherwise emu connects out as the client (QEMU's python harness does this)."""

    def __init__(self, id: str, options: dict[str, str]) -> None:
        super().__init__(id, options)
        self.server = _bool(options, "server", False)
        self.wait = _bool(options, "wait", True)
        self.path = options.get("path")
        self.host = options.get("host")
        self.port = options.get("port")
        self.fd = options.get("fd")
        self._listener: _socket.socket | None = None
        self._conn: _socket.socket | None = None
        self._aserver: asyncio.AbstractServer | None = None
        self._unlink_path: str | None = None
        if self.fd is None and self.path is None and self.port is None:
            # QEMU's text when a socket chardev names no address at all
            raise ConfigError("Unable to parse FD number ")
        if self.path is None and self.fd is None and self.host is None:
            self.host = "localhost"

    def describe(self) -> str:
        if self.path is not None:
            return f"disconnected:unix:{self.path},server=on"
        return f"disconnected:tcp:{self.host}:{self.port},server=on"

    def prepare(self) -> None:
        if self.fd is not None:
            try:
                fd = int(self.fd)
                s = _socket.socket(fileno=fd)
            except (ValueError, OSError) as e:
                raise ConfigError(f"Unable to parse FD number {self.fd}") from e
            accepting = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
            if accepting:
                self._listener = s
            else:
                self._conn = s
            return
        if self.server:
            self._listener = self._listen()
            if self.wait:
                print(f"{_progname()}: -chardev socket,id={self.id}: info: QEMU waiting for "
                      f"connection on: {self.describe()}", file=sys.stderr, flush=True)
                fd, _ = self._listener._accept()
                self._conn = _socket.socket(fileno=fd)
            return
        self._conn = self._connect()

    def _listen(self) -> _socket.socket:
        if self.path is not None:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            # The path appears only once it accepts: bound and listening under a private
            # name, then renamed into place.  Bound at the path itself, a client polling for
            # it (as QEMU users do) could connect between bind and listen and be refused.
            staging = f"{self.path}.{os.getpid()}"
            if len(os.fsencode(staging)) >= _UNIX_PATH_MAX:
                staging = self.path         # no room for a longer name: bind in place
            bound = False
            try:
                # owner-only from the start: the socket inode's mode is applied at bind
                os.fchmod(s.fileno(), 0o600)
                for name in {self.path, staging}:
                    try:
                        if stat.S_ISSOCK(os.lstat(name).st_mode):
                            os.unlink(name)
                        elif name == self.path:
                            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
                    except FileNotFoundError:
                        pass
                s.bind(staging)
                bound = True
                os.chmod(staging, 0o600)
                s.listen(1)
                if staging != self.path:
                    os.rename(staging, self.path)
            except OSError as e:
                s.close()
                if bound and staging != self.path:
                    try:
                        os.unlink(staging)
                    except OSError:
                        pass
                raise ConfigError(f"Failed to bind socket to {self.path}: "
                                  f"{os.strerror(e.errno or 0)}") from e
            self._unlink_path = self.path
            return s
        try:
            infos = _socket.getaddrinfo(self.host or None, int(self.port or 0),
                                        type=_socket.SOCK_STREAM, flags=_socket.AI_PASSIVE)
        except (OSError, ValueError) as e:
            raise ConfigError(f"address resolution failed for {self.host}:{self.port}: "
                              f"{e}") from e
        last: OSError | None = None
        for fam, typ, proto, _, addr in infos:
            s = _socket.socket(fam, typ, proto)
            try:
                s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                s.bind(addr)
                s.listen(1)
                return s
            except OSError as e:
                last = e
                s.close()
        raise ConfigError(f"Failed to bind socket: {os.strerror(last.errno or 0) if last else ''}")

    def _connect(self) -> _socket.socket:
        if self.path is not None:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise ConfigError(f"Failed to connect to '{self.path}': "
                                  f"{os.strerror(e.errno or 0)}") from e
            return s
        import socket

        try:
            return socket.create_connection((self.host or "localhost", int(self.port or 0)))
        except (OSError, ValueError) as e:
            raise ConfigError(f"Failed to connect to '{self.host}:{self.port}': "
                              f"{getattr(e, 'strerror', None) or e}") from e

    def greet_early(self) -> _socket.socket | None:
        if self.greeting is None:
            return None
        if self._conn is not None:
            try:
                self._conn.sendall(self.greeting)
            except OSError:
                pass                        # the peer left: the session sees it at once
            self._greeted_conn, self._conn = self._conn, None
            return None
        return self._listener

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        await super().start(loop)
        for raw, greeted in ((self._greeted_conn, True), (self._conn, False)):
            if raw is None:
                continue
            conn = _wrap(raw)
            conn.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=conn, limit=1 << 20)
            self._spawn(self._serve_connection(reader, writer, greeted))
        self._greeted_conn = self._conn = None
        if self._listener is not None:
            lst = self._listener = _wrap(self._listener)
            lst.setblocking(False)
            if lst.family == _socket.AF_UNIX:
                self._aserver = await asyncio.start_unix_server(
                    self._serve_connection, sock=lst, limit=1 << 20)
            else:
                self._aserver = await asyncio.start_server(
                    self._serve_connection, sock=lst, limit=1 << 20)

    def discard(self) -> None:
        for s in (self._greeted_conn, self._conn, self._listener):
            if s is not None:
                s.close()
        self._greeted_conn = self._conn = self._listener = None
        if self._unlink_path is not None:
            try:
                os.unlink(self._unlink_path)
            except OSError:
                pass
            self._unlink_path = None

    async def close(self) -> None:
        if self._aserver is not None:
            self._aserver.close()
        if self._greeted_conn is not None:     # greeted, never served (start-up failed)
            self._greeted_conn.close()
            self._greeted_conn = None
        await super().close()
        if self._unlink_path is not None:
            try:
                os.unlink(self._unlink_path)
            except OSError:
                pass


@backend("stdio")
class StdioChardev(Chardev):
    """``-chardev stdio``: input from stdin, output to stdout.

    Works whatever stdin/stdout are (terminal, pipe, regular file): input is read by a
    small thread, output written synchronously.
    """

    #: the greeting went out before the loop ran (greet_early)
    _greeted = False

    def prepare(self) -> None:
        if self.daemonized:
            raise ConfigError("cannot use stdio with -daemonize")

    def greet_early(self) -> _socket.socket | None:
        if self.greeting is not None:
            _FdSink(1).write(self.greeting)
            self._greeted = True
        return None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        await super().start(loop)
        reader = asyncio.StreamReader(limit=1 << 20)

        def pump() -> None:
            while True:
                try:
                    data = os.read(0, 65536)
                except OSError:
                    data = b""
                try:
                    if data:
                        loop.call_soon_threadsafe(reader.feed_data, data)
                    else:
                        loop.call_soon_threadsafe(reader.feed_eof)
                        return
                except RuntimeError:        # loop closed at exit
                    return

        import threading

        threading.Thread(target=pump, name="emu-stdin", daemon=True).start()
        self._spawn(self._serve_connection(reader, _FdSink(1),  # type: ignore[arg-type]
                                           self._greeted))


class _FileSink:
    """A StreamWriter-like sink for the file and null backends (output only)."""

    def __init__(self, fobj: Any) -> None:
        self._f = fobj
        self._closing = False

    def write(self, data: bytes) -> None:
        if self._f is not None and not self._closing:
            self._f.write(data)
            self._f.flush()

    def is_closing(self) -> bool:
        return self._closing

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self._closing = True
        if self._f is not None:
            self._f.close()
            self._f = None

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _FdSink(_FileSink):
    """Blocking writes to a file descriptor (stdout); never closes it."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self._fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._closing:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                continue
            except OSError:
                self._closing = True
                return
            view = view[n:]


@backend("file")
class FileChardev(Chardev):
    """``-chardev file,path=``: output appended to/truncating a file; no input."""

    def __init__(self, id: str, options: dict[str, str]) -> None:
        super().__init__(id, options)
        if not options.get("path"):
            raise ConfigError("chardev: file: no filename given")
        self._f: Any = None

    def prepare(self) -> None:
        append = _bool(self.options, "append", False)
        try:
            self._f = open(self.options["path"], "ab" if append else "wb")
        except OSError as e:
            raise ConfigError(f"Could not open '{self.options['path']}': "
                              f"{os.strerror(e.errno or 0)}") from e

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        await super().start(loop)
        reader = asyncio.StreamReader()     # never fed: a file has no input
        self._spawn(self._serve_connection(reader, _FileSink(self._f)))  # type: ignore[arg-type]


@backend("null")
class NullChardev(Chardev):
    """``-chardev null``: discards output, never has input."""

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        await super().start(loop)
        reader = asyncio.StreamReader()
        self._spawn(self._serve_connection(reader, _FileSink(None)))  # type: ignore[arg-type]


class EarlyGreeter:
    """Greets QMP clients before the I/O loop exists.

    What a QMP client waits for first is the greeting (QEMU sends it ~30 ms after exec), and
    it never changes, so the launcher sends it from this minimal path while asyncio, the
    command table and QEMU's type table are still being imported.  :meth:`start` has each
    chardev send its :attr:`Chardev.greeting` to a peer already there (a connected socket:
    ``wait=on``, ``fd=``, client mode; stdout) and greets the *first* client of each
    listening socket, at once if one is waiting, else from a small thread as soon as it
    comes (later clients wait in the kernel's queue,
    as they wait for the first one to leave anyway).  The thread never reads: what a client
    sends stays in its socket until the session runs.  :meth:`stop`, called before the
    chardevs start on the loop, ends the thread; each greeted client is then the first
    connection its chardev serves.

    Python hands the GIL to a waiting thread only every switch interval (5 ms), which the
    launcher's imports would make the greeting's latency: the interval is 0.1 ms while the
    thread runs.

    :param chardevs: the QMP monitors' chardevs (their ``greeting`` set, not started).
    """

    SWITCH_INTERVAL = 0.0001

    def __init__(self, chardevs: list[Chardev]) -> None:
        self.chardevs = list(chardevs)
        self._running: _thread.LockType | None = None
        self._wake: tuple[int, int] | None = None
        self._switch = 0.0

    def start(self) -> None:
        listeners: dict[int, tuple[Chardev, _socket.socket]] = {}
        for c in self.chardevs:
            lst = c.greet_early()
            if lst is not None:
                lst.setblocking(False)
                if not self._greet_first(c, lst):   # nobody yet: the thread waits for one
                    listeners[lst.fileno()] = (c, lst)
        if not listeners:
            return
        self._wake = os.pipe()
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(self.SWITCH_INTERVAL)
        self._running = _thread.allocate_lock()
        self._running.acquire()         # held by the thread until it ends
        _thread.start_new_thread(self._run, (listeners, self._running))

    @staticmethod
    def _greet_first(chardev: Chardev, lst: _socket.socket) -> bool:
        """Accept a client waiting on ``lst`` and greet it; False if none is waiting."""
        try:
            conn = _socket.socket(fileno=lst._accept()[0])
        except OSError:                 # none waiting, or a client that left
            return False
        try:
            conn.sendall(chardev.greeting or b"")
        except OSError:
            pass                        # the client left: its session sees EOF at once
        chardev.take_early_client(conn)
        return True

    def _run(self, listeners: dict[int, tuple[Chardev, _socket.socket]],
             running: _thread.LockType) -> None:
        import select

        try:
            assert self._wake is not None
            wake = self._wake[0]
            poll = select.poll()
            for fd in (wake, *listeners):
                poll.register(fd, select.POLLIN)
            while listeners:
                for fd, _ in poll.poll():
                    if fd == wake:
                        return
                    chardev, lst = listeners[fd]
                    if not self._greet_first(chardev, lst):
                        continue
                    poll.unregister(fd)
                    del listeners[fd]
        finally:
            running.release()

    def stop(self) -> None:
        """End the thread (idempotent); afterwards the chardevs may start."""
        if self._running is None:
            return
        assert self._wake is not None
        os.write(self._wake[1], b"x")
        with self._running:             # the thread has ended
            pass
        self._running = None
        for fd in self._wake:
            os.close(fd)
        self._wake = None
        sys.setswitchinterval(self._switch)


def _wrap(raw: _socket.socket) -> socket.socket:
    """The socket module's object for ``raw`` (what asyncio needs), same descriptor."""
    import socket

    if isinstance(raw, socket.socket):
        return raw
    return socket.socket(fileno=raw.detach())


def create_chardev(backend_name: str, id: str, options: dict[str, str]) -> Chardev:
    """Instantiate a registered backend; ConfigError with QEMU's text otherwise."""
    cls = BACKENDS.get(backend_name)
    if cls is None:
        raise ConfigError(f"'{backend_name}' is not a valid char driver name")
    return cls(id, options)


def _progname() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "emu"
    return "emu" if name in ("__main__.py", "-c", "") else name

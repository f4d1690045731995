"""Monitors over real sockets: several monitors and clients, event fan-out, one client at
a time per socket, emu as the client, inherited ``fd=``, vanishing clients, quit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.s = sock
        self.s.settimeout(10)
        self.buf = b""

    @classmethod
    def unix(cls, path: str, timeout: float = 10) -> "Client":
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return cls(s)
            except OSError:
                s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def line(self, timeout: float = 10) -> bytes:
        self.s.settimeout(timeout)
        while b"\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError(self.buf)
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self, timeout: float = 10) -> dict:
        return json.loads(self.line(timeout))

    def send(self, obj: dict | bytes) -> None:
        self.s.sendall(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")

    def cmd(self, name: str, **args) -> dict:
        req: dict = {"execute": name}
        if args:
            req["arguments"] = args
        self.send(req)
        while True:
            m = self.msg()
            if "event" not in m:
                return m

    def negotiate(self) -> dict:
        g = self.msg()
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return g


def launch(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-display", "none",
                             "-S", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def finish(p: subprocess.Popen, c: Client) -> None:
    c.send({"execute": "quit"})
    assert p.wait(20) == 0


def test_two_monitors_events_fan_out_and_one_client_per_socket(tmp_path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    p = launch("-qmp", f"unix:{a},server=on,wait=off",
               "-chardev", f"socket,id=m2,path={b},server=on,wait=off",
               "-mon", "chardev=m2,mode=control")
    try:
        ca = Client.unix(a)
        greeting = ca.negotiate()
        assert greeting["QMP"]["version"]["qemu"] == {"micro": 22, "minor": 2, "major": 7}
        assert greeting["QMP"]["capabilities"] == ["oob"]
        cb = Client.unix(b)
        cb.msg()                                   # greeting, not negotiated yet
        ca.send({"execute": "cont"})
        assert ca.msg()["event"] == "RESUME" and ca.msg() == {"return": {}}
        assert cb.cmd("qmp_capabilities") == {"return": {}}   # no RESUME for it before
        ca.send({"execute": "stop"})
        assert ca.msg()["event"] == "STOP"
        assert cb.msg()["event"] == "STOP"         # fan-out to the negotiated client
        # a second client on socket a waits (no greeting) until the first leaves
        ca2 = Client.unix(a)
        with pytest.raises(socket.timeout):
            ca2.line(timeout=0.5)
        ca.s.close()
        assert "QMP" in ca2.msg()
        ca2.cmd("qmp_capabilities")
        for path in (a, b):
            assert (os.stat(path).st_mode & 0o777) == 0o600
        finish(p, ca2)
    finally:
        p.kill()
        p.wait()


def test_emu_connects_out_as_client_and_fd_socketpair(tmp_path) -> None:
    path = str(tmp_path / "harness.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    p = launch("-chardev", f"socket,id=mon,path={path}", "-mon", "chardev=mon,mode=control")
    try:
        lst.settimeout(20)
        conn, _ = lst.accept()
        c = Client(conn)
        c.negotiate()
        assert c.cmd("query-status")["return"]["status"] == "prelaunch"
        finish(p, c)
    finally:
        p.kill()
        p.wait()
        lst.close()
    ours, theirs = socket.socketpair()
    p = launch("-chardev", f"socket,id=mon,fd={theirs.fileno()}", "-mon",
               "chardev=mon,mode=control", pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        c = Client(ours)
        c.negotiate()
        assert c.cmd("query-version")["return"]["qemu"]["minor"] == 2
        finish(p, c)
    finally:
        p.kill()
        p.wait()


def test_vanishing_clients_and_quit_order(tmp_path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    p = launch("-qmp", f"unix:{a},server=on,wait=off", "-qmp", f"unix:{b},server=on,wait=off")
    try:
        watcher = Client.unix(b)
        watcher.negotiate()
        for i in range(20):
            c = Client.unix(a)
            c.msg()
            c.send(b'{"execute": "qmp_capabilities"}\n{"execute": "query-qmp-schema"}\n'
                   b'{"execute": "query-status", "id": ')
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.s.close()                               # RST while the schema reply is built
            assert watcher.cmd("query-status")["return"]["status"] == "prelaunch"
        c = Client.unix(a)
        c.negotiate()
        c.send({"execute": "quit"})
        ev = c.msg()
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert c.msg() == {"return": {}}
        assert watcher.msg()["event"] == "SHUTDOWN"
        assert p.wait(20) == 0
        assert not os.path.exists(a)
    finally:
        p.kill()
        p.wait()


def test_qemu_qmp_library_client(tmp_path) -> None:
    qmp = pytest.importorskip("qemu.qmp")
    import asyncio

    path = str(tmp_path / "q.sock")
    p = launch("-qmp", f"unix:{path},server=on,wait=off")

    async def session() -> None:
        client = qmp.QMPClient("emu-test")
        for _ in range(200):
            if os.path.exists(path):
                break
            await asyncio.sleep(0.05)
        await client.connect(path)
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        with pytest.raises(qmp.ExecuteError) as ei:
            await client.execute("blockdev-snapshot-internal-sync", {"device": "nodev", "name": "x"})
        assert ei.value.error.error.desc == "Cannot find device='nodev' nor node-name='nodev'"
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:        # emu closed first, as QEMU does after quit
            pass

    try:
        asyncio.run(session())
        assert p.wait(20) == 0
    finally:
        p.kill()
        p.wait()


def test_sigterm_sends_shutdown_host_signal(tmp_path) -> None:
    import signal

    a = str(tmp_path / "a.sock")
    p = launch("-qmp", f"unix:{a},server=on,wait=off")
    try:
        c = Client.unix(a)
        c.negotiate()
        p.send_signal(signal.SIGTERM)
        ev = c.msg()
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-signal"}
        assert p.wait(20) == 0
        assert b"terminating on signal 15" in p.stderr.read()
    finally:
        p.kill()
        p.wait()


def test_stdio_monitor_answers_every_piped_command() -> None:
    r = subprocess.run([sys.executable, "-m", "emu", "-nodefaults", "-display", "none", "-S",
                        "-qmp", "stdio"], cwd=REPO, capture_output=True, timeout=30,
                       input=b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n'
                             b'{"execute": "quit"}\n')
    lines = r.stdout.split(b"\r\n")
    assert r.returncode == 0 and lines[0].startswith(b'{"QMP": ')
    assert lines[1:3] == [b'{"return": {}}',
                          b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}}']
    assert b'"event": "SHUTDOWN"' in lines[3] and lines[4] == b'{"return": {}}'


def test_human_monitor_on_a_socket(tmp_path) -> None:
    """-monitor: banner, prompt, QEMU's readline echo, output (checked against QEMU 7.2)."""
    path = str(tmp_path / "hmp.sock")
    p = launch("-monitor", f"unix:{path},server=on,wait=off")
    try:
        c = Client.unix(path)
        got = b""
        while not got.endswith(b"(qemu) "):
            got += c.s.recv(4096)
        assert got == b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "
        c.send(b"info status\n")
        got = b""
        while not got.endswith(b"(qemu) "):
            got += c.s.recv(4096)
        echo = b"".join(b"\x1b[D" * (k - 1) + b"info status"[:k] + b"\x1b[K" for k in range(1, 12))
        assert got == echo + b"\r\nVM status: paused (prelaunch)\r\n(qemu) "
        c.send(b"quit\n")
        assert p.wait(20) == 0
    finally:
        p.kill()
        p.wait()


def test_unix_socket_path_appears_only_once_listening(tmp_path) -> None:
    """The socket is bound and listening under a private name and renamed into place, so the
    first connect after the path appears is accepted (a client polling for the path, as the
    qemu.qmp test above does, was refused between bind and listen on a loaded host); nothing
    else is left in the directory, and a non-socket file at the path is refused, untouched."""
    path = str(tmp_path / "q.sock")
    for attempt in range(3):
        p = launch("-qmp", f"unix:{path},server=on,wait=off")
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path):
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.001)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)                       # no retry: a listener is behind the path
            c = Client(s)
            assert "QMP" in c.msg()
            assert os.listdir(tmp_path) == ["q.sock"]
            assert (os.stat(path).st_mode & 0o777) == 0o600
            c.cmd("qmp_capabilities")
            finish(p, c)
        finally:
            p.kill()
            p.wait()
        assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("keep")
    p = launch("-qmp", f"unix:{path},server=on,wait=off")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert f"Failed to bind socket to {path}: Address already in use" in err.decode()
    assert os.listdir(tmp_path) == ["q.sock"] and open(path).read() == "keep"

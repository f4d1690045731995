"""Start-up order: the monitor greets while the hardware is being built, and a command that
arrives meanwhile waits for the machine instead of failing or seeing it half-built."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from emu.chardev import IOThread, create_chardev
from emu.cli import parse_args
from emu.machine.pc import Machine
from emu.qmp.protocol import QmpServer


def _connect(path: str) -> socket.socket:
    for _ in range(400):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(10)
            return s
        except OSError:
            s.close()
            time.sleep(0.025)
    raise AssertionError(f"no monitor on {path}")


def _lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\r\n") < n:
        data = s.recv(65536)
        assert data, buf
        buf += data
    return [json.loads(x) for x in buf.split(b"\r\n")[:n]]


def test_commands_wait_until_the_machine_is_ready(tmp_path) -> None:
    cfg, _ = parse_args(["-S"])
    machine = Machine(cfg)
    io = IOThread()
    io.start()
    server = QmpServer(machine, io.loop)
    try:
        path = str(tmp_path / "qmp.sock")
        chardev = create_chardev("socket", "qmp0", {"path": path, "server": "on", "wait": "off"})
        chardev.prepare()
        server.add_monitor(chardev)
        server.ready.clear()                    # as emu.cli does while building the hardware
        io.call(chardev.start(io.loop))
        s = _connect(path)
        [greeting] = _lines(s, 1)
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        s.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
        # the command is taken and held (the session is busy with it), not answered
        for _ in range(2000):
            if any(sess.busy for sess in server.sessions):
                break
            time.sleep(0.005)
        assert any(sess.busy for sess in server.sessions)
        # the machine changes while the command waits; it must see the machine as it is
        # once ready (here: running), not as it was when the command came in (prelaunch)
        machine.resume()
        s.sendall(b'{"execute": "query-status", "id": 2}\n')
        server.ready.set()
        # (no RESUME event: the session was not negotiated when it happened)
        assert _lines(s, 2) == [{"return": {}, "id": 1},
                                {"return": {"running": True, "singlestep": False,
                                            "status": "running"}, "id": 2}]
        s.close()
    finally:
        io.call(server.shutdown(), timeout=10)
        machine.close()
        io.stop()


def test_bad_configuration_fails_before_the_greeting(tmp_path) -> None:
    """What build_hardware would refuse is refused before any monitor greets (QEMU refuses a
    bad configuration before its main loop greets): exit 1, QEMU's text, and a client that
    connects meanwhile gets no greeting."""
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    path = tmp_path / "qmp.sock"
    p = subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-display", "none", "-S",
                          "-qmp", f"unix:{path},server=on,wait=off", "-bios", str(empty)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = b""
    while p.poll() is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.settimeout(30)
            got = s.recv(65536)
            break
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert f"could not load PC BIOS '{empty}'" in err
    assert got == b""

"""The launcher greets QMP clients from a minimal path (emu.chardev.EarlyGreeter) before
asyncio, the command table and the machine are imported: the greeting is the writer's, sent
once per connection whichever path sent it, commands that come early are answered in order
once the machine exists, and a second client still waits for the first to leave."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from emu.cli import _bios_looks_loadable, parse_args
from emu.errors import ConfigError
from emu.qmp.greeting import GREETING_LINE, greeting
from emu.qmp.json import to_json


def _launch(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-display", "none",
                             "-S", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _connect(path: str, p: subprocess.Popen) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(30)
            return s
        except OSError:
            s.close()
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)


def _lines(s: socket.socket, n: int, buf: bytearray) -> list[bytes]:
    while buf.count(b"\r\n") < n:
        data = s.recv(65536)
        assert data, bytes(buf)
        buf += data
    out = []
    for _ in range(n):
        line, _, rest = bytes(buf).partition(b"\r\n")
        out.append(line)
        buf[:] = rest
    return out


def test_greeting_line_is_what_the_json_writer_gives() -> None:
    assert GREETING_LINE == (to_json(greeting()) + "\r\n").encode("ascii")
    assert json.loads(GREETING_LINE) == {
        "QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
                            "package": "emu 0.1.0"}, "capabilities": ["oob"]}}


def test_nothing_heavy_is_imported_before_the_greeting(tmp_path) -> None:
    """What the process has imported when the greeter starts (no drives, no devices):
    neither asyncio nor dataclasses/typing, nor the socket/signal/threading wrappers (their
    enums), nor the monitor, the machine, the block layer or Unicorn.  The launch is the
    real one; the greeter's start is only observed."""
    path = str(tmp_path / "q.sock")
    probe = (
        "import sys\n"
        "import emu.chardev as c\n"
        "start = c.EarlyGreeter.start\n"
        "def observed(self):\n"
        "    print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr, flush=True)\n"
        "    start(self)\n"
        "c.EarlyGreeter.start = observed\n"
        "from emu.cli import main\n"
        "sys.argv[0] = 'emu'\n"
        "sys.exit(main())\n")
    p = subprocess.Popen([sys.executable, "-c", probe, "-nodefaults", "-display", "none", "-S",
                          "-qmp", f"unix:{path},server=on,wait=off"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        s = _connect(path, p)
        buf = bytearray()
        assert _lines(s, 1, buf) == [GREETING_LINE.rstrip(b"\r\n")]
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        p.kill()
        p.wait()
    [line] = [x for x in err.splitlines() if x.startswith("MODULES ")]
    modules = set(line.split()[1:])
    assert "emu.cli" in modules and "emu.chardev" in modules
    heavy = {"asyncio", "concurrent.futures", "dataclasses", "typing", "logging", "json",
             "socket", "selectors", "signal", "threading", "emu.qmp.protocol", "emu.qmp.commands", "emu.qmp.qapi72_table",
             "emu.machine.pc", "emu.machine.hardware", "emu.block.node", "unicorn"}
    assert modules & heavy == set()


def test_early_commands_are_answered_in_order_after_one_greeting(tmp_path) -> None:
    """A client that connects at once and sends commands before reading anything gets the
    greeting once, then every reply in order (the errors before negotiation as usual); a second client waits, ungreeted, until the
    first leaves, then gets its own greeting."""
    path = str(tmp_path / "q.sock")
    p = _launch("-qmp", f"unix:{path},server=on,wait=off")
    try:
        s = _connect(path, p)
        s.sendall(b'{"execute": "query-status", "id": 0}\n{"execute": 1}\n'
                  b'{"execute": "qmp_capabilities", "id": 1}\n'
                  b'{"execute": "query-status", "id": 2}\n')
        buf = bytearray()
        first = _lines(s, 5, buf)
        assert first[0] == GREETING_LINE.rstrip(b"\r\n")
        assert [json.loads(x) for x in first[1:]] == [
            {"error": {"class": "CommandNotFound",
                       "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
             "id": 0},
            {"error": {"class": "GenericError",
                       "desc": "QMP input member 'execute' must be a string"}},
            {"return": {}, "id": 1},
            {"return": {"status": "prelaunch", "singlestep": False, "running": False}, "id": 2}]
        s2 = _connect(path, p)
        s2.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s2.recv(1)
        s.close()
        s2.settimeout(30)
        buf2 = bytearray()
        assert _lines(s2, 1, buf2) == [GREETING_LINE.rstrip(b"\r\n")]
        s2.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
        assert json.loads(_lines(s2, 1, buf2)[0]) == {"return": {}}
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()


def test_wait_on_client_is_greeted_once(tmp_path) -> None:
    """``server=on`` with ``wait=on``: the start-up blocks until a client connects; that
    client is greeted at once, from the minimal path, and not again by its session."""
    path = str(tmp_path / "q.sock")
    p = _launch("-qmp", f"unix:{path},server=on")
    try:
        s = _connect(path, p)
        buf = bytearray()
        assert _lines(s, 1, buf) == [GREETING_LINE.rstrip(b"\r\n")]
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-version"}\n')
        ret, version = (json.loads(x) for x in _lines(s, 2, buf))
        assert ret == {"return": {}} and version["return"]["package"] == "emu 0.1.0"
        s.sendall(b'{"execute": "quit"}\n')
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert not os.path.exists(path)


@pytest.mark.parametrize("size,ok", [(64 << 10, True), (128 << 10, True), (16 << 20, True),
                                     (0, False), (1, False), ((64 << 10) + 1, False),
                                     ((16 << 20) + (64 << 10), False)])
def test_light_bios_check_agrees_with_load_bios(tmp_path, size: int, ok: bool) -> None:
    """The launcher's check without the machine (which decides whether the real one runs
    before the greeting) accepts only what emu.machine.hardware.load_bios accepts."""
    from emu.machine.hardware import load_bios

    bios = tmp_path / "bios.bin"
    with open(bios, "wb") as f:
        f.truncate(size)
    cfg, _ = parse_args(["-bios", str(bios)])
    try:
        load_bios(cfg.bios)
        loads = True
    except ConfigError:
        loads = False
    assert loads is ok
    assert _bios_looks_loadable(cfg) is ok


def test_light_bios_check_defers_to_the_real_one(tmp_path) -> None:
    """A directory, a missing file, -kernel or any device: the real check runs first."""
    cfg, _ = parse_args(["-bios", str(tmp_path)])
    assert not _bios_looks_loadable(cfg)
    cfg, _ = parse_args(["-bios", str(tmp_path / "missing.bin")])
    assert not _bios_looks_loadable(cfg)
    cfg, _ = parse_args([])
    assert _bios_looks_loadable(cfg)            # emu's own BIOS
    cfg.kernel = str(tmp_path / "vmlinuz")
    assert not _bios_looks_loadable(cfg)
    cfg, _ = parse_args(["-device", "isa-debug-exit"])
    assert not _bios_looks_loadable(cfg)


def test_bad_bios_after_the_light_check_still_fails_before_the_greeting(tmp_path) -> None:
    """A BIOS of a size emu refuses: exit 1 with QEMU's text, no client greeted."""
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 1000)
    path = tmp_path / "qmp.sock"
    p = _launch("-qmp", f"unix:{path},server=on,wait=off", "-bios", str(bad))
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
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert f"could not load PC BIOS '{bad}'" in err.decode()
    assert got == b""
    assert not path.exists()


def test_tcp_and_inherited_listening_sockets_greet_once(tmp_path) -> None:
    """A tcp server socket and an inherited listening socket (``fd=``) are greeted from the
    minimal path as a unix one is: one greeting, then answers."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(tmp_path / "inherited.sock"))
    lst.listen(1)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    p = _launch("-chardev", f"socket,id=inh,fd={lst.fileno()}", "-mon", "chardev=inh,mode=control",
                "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off", pass_fds=[lst.fileno()])
    try:
        c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c1.connect(str(tmp_path / "inherited.sock"))
        c1.settimeout(30)
        lst.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                c2 = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        for c in (c1, c2):
            c.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
            buf = bytearray()
            lines = _lines(c, 3, buf)
            assert lines[0] == GREETING_LINE.rstrip(b"\r\n")
            assert json.loads(lines[1]) == {"return": {}}
            assert json.loads(lines[2])["return"]["status"] == "prelaunch"
        c2.sendall(b'{"execute": "quit"}\n')
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()

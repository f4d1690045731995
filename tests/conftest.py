"""Shared test helpers: markers that skip cleanly when a reference tool is missing.

Tests that compare against QEMU's own tools or assemble guests with nasm use these
fixtures/decorators; CI (.ci/run) installs the tools, a developer machine may not have them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The workplace's shared material (golden QMP corpus, replay tool); only tests may use it.
SHARED = REPO.parent / "shared"


def _need(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


requires_qemu_img = _need("qemu-img")
requires_qemu_io = _need("qemu-io")
requires_qemu_system = _need("qemu-system-x86_64")
requires_nasm = _need("nasm")
requires_shared = pytest.mark.skipif(
    not (SHARED / "qmp-golden").is_dir(), reason="../shared/qmp-golden is not beside the checkout"
)


class SocketLines:
    """Text lines over a connected socket, read and written through separate buffers.

    One ``sock.makefile("rw")`` text file drops the lines it has read ahead whenever it is
    written to (TextIOWrapper.write discards its decoded-but-unread text), so a QMP client
    built on it loses events that arrived together with a reply.
    """

    def __init__(self, sock) -> None:
        self._r = sock.makefile("r", encoding="utf-8")
        self._w = sock.makefile("w", encoding="utf-8")

    def readline(self) -> str:
        return self._r.readline()

    def write(self, text: str) -> int:
        return self._w.write(text)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class QmpProcess:
    """An emulator (emu's ``python -m emu`` or ``qemu-system-x86_64``: ``argv``) started with
    ``-qmp unix:SOCK,server=on,wait=off`` appended, its QMP socket connected and the greeting
    read (``greeting``); capabilities are not negotiated, so a test can check that step too.

    :meth:`cmd` returns the raw reply (``return`` or ``error``); events that arrive meanwhile
    go to ``events``.  :meth:`close` (also on leaving a ``with`` block) sends ``quit`` if the
    process still runs, waits for it and returns its output (stdout and stderr together).
    emu runs from this checkout (``PYTHONPATH``), whatever the current directory is.
    """

    def __init__(self, argv: list[str], sock: Path, cwd: Path | None = None,
                 connect_timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(list(argv) + ["-qmp", f"unix:{sock},server=on,wait=off"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.events: list[dict] = []
        self._sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(str(sock))
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{argv[0]} exited: {self.proc.communicate()[0].decode()}")
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"no QMP socket {sock} after {connect_timeout} s")
                time.sleep(0.05)
        self.lines = SocketLines(self._sock)
        self.greeting = json.loads(self.lines.readline())

    def cmd(self, name: str, args: dict | None = None) -> dict:
        msg: dict = {"execute": name}
        if args:
            msg["arguments"] = args
        self.lines.write(json.dumps(msg) + "\n")
        self.lines.flush()
        while True:
            line = self.lines.readline()
            if not line:
                raise AssertionError(f"QMP connection closed waiting for the reply to {name}")
            r = json.loads(line)
            if "event" not in r:
                return r
            self.events.append(r)

    def close(self, timeout: float = 60.0) -> str:
        if self.proc.poll() is None and self.proc.returncode is None:
            try:
                self.cmd("quit")
            except (OSError, AssertionError, ValueError):
                pass
        self._sock.close()
        try:
            out = self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out = self.proc.communicate()[0]
        return out.decode(errors="replace")

    def __enter__(self) -> "QmpProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.close()

"""Shared test helpers: markers that skip cleanly when a reference tool is missing.

Tests that compare against QEMU's own tools or assemble guests with nasm use these
fixtures/decorators; CI (.ci/run) installs the tools, a developer machine may not have them.
"""

from __future__ import annotations

import shutil
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

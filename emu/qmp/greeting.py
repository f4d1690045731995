"""The QMP greeting, importable before anything else of the monitor.

Every QMP connection starts with ``{"QMP": {"version": …, "capabilities": ["oob"]}}``.  It
never changes during a run, so the launcher can send it from a minimal path (a socket and a
thread, :class:`emu.chardev.EarlyGreeter`) while the rest of the monitor (asyncio, the
command table, QEMU's type table) is still being imported.  This module imports nothing.
"""

from __future__ import annotations

__all__ = ["QEMU_VERSION", "PACKAGE", "version_info", "greeting", "GREETING_LINE"]

#: The version QMP clients see: QEMU 7.2's, so they enable 7.2 behaviour.
QEMU_VERSION = {"micro": 22, "minor": 2, "major": 7}
#: The ``package`` string names the emulator actually answering.
PACKAGE = "emu 0.1.0"


def version_info() -> dict[str, object]:
    """``VersionInfo``: ``{"qemu": {"major", "minor", "micro"}, "package"}``."""
    return {"qemu": {"major": QEMU_VERSION["major"], "minor": QEMU_VERSION["minor"],
                     "micro": QEMU_VERSION["micro"]}, "package": PACKAGE}


def greeting() -> dict[str, object]:
    """The unsolicited first message of every QMP connection."""
    return {"QMP": {"version": version_info(), "capabilities": ["oob"]}}


#: :func:`greeting` as it goes on the wire: :func:`emu.qmp.json.to_json` (QEMU's member
#: order, micro first) and ``\r\n``.  Written out here so that sending it needs no JSON
#: writer; a unit test checks it against the writer.
GREETING_LINE = (
    '{"QMP": {"version": {"qemu": {"micro": %d, "minor": %d, "major": %d}, "package": "%s"}, '
    '"capabilities": ["oob"]}}\r\n' % (QEMU_VERSION["micro"], QEMU_VERSION["minor"],
                                       QEMU_VERSION["major"], PACKAGE)).encode("ascii")

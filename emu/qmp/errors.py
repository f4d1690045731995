"""QMP error classes and the error reply shape.

QEMU 7.2's ``QapiErrorClass``: ``GenericError`` for nearly everything,
``CommandNotFound``, ``DeviceNotActive`` (unknown block job), ``DeviceNotFound``,
``KVMMissingCap``.  Commands raise :class:`emu.errors.QmpError` (class + QEMU's text);
any other :class:`emu.errors.EmuError` from a lower layer already carries QEMU's text and
becomes a ``GenericError`` with ``str(err)``.
"""

from __future__ import annotations

from typing import Any

from emu.errors import EmuError, QmpError

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"

__all__ = ["GENERIC_ERROR", "COMMAND_NOT_FOUND", "DEVICE_NOT_ACTIVE", "DEVICE_NOT_FOUND",
           "KVM_MISSING_CAP", "unsupported", "error_response", "desc_of", "as_qmp_error", "QmpError"]


def as_qmp_error(err: BaseException) -> QmpError:
    """Map an exception from a command to the QMP error QEMU would give."""
    if isinstance(err, QmpError):
        return err
    if isinstance(err, EmuError):
        return QmpError(desc_of(err), GENERIC_ERROR)
    return QmpError(f"internal error: {type(err).__name__}: {err}", GENERIC_ERROR)


def desc_of(err: BaseException) -> str:
    """A lower layer's error text as QMP shows it: QEMU sends only the message, never
    the hint lines (``Is another process using the image …?``) the command line shows."""
    return str(err).split("\n", 1)[0]


def error_response(err: QmpError) -> dict[str, Any]:
    """``{"error": {"class": …, "desc": …}}`` (the caller adds ``id``)."""
    return {"error": {"class": err.cls, "desc": err.desc}}


def unsupported(command: str, what: str) -> QmpError:
    """The GenericError for a command that needs a subsystem emu does not have (README's
    "not supported" list): ``emu does not support <what> (<command>)``."""
    return QmpError(f"emu does not support {what} ({command})", GENERIC_ERROR)

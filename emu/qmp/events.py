"""QMP events: one table of every event emu emits, with its data type.

The table feeds ``query-qmp-schema``; the events themselves are emitted by the machine
(:meth:`emu.machine.pc.Machine.emit`) and the block layer's jobs, and fanned out to every
negotiated client by :class:`emu.qmp.protocol.QmpServer` as
``{"timestamp": {"seconds", "microseconds"}, "event": NAME, "data": {...}}`` (no ``data``
for STOP, RESUME and POWERDOWN).
"""

from __future__ import annotations

from emu.qmp.schema import BOOL, INT, STR, Enum, QType, Struct

__all__ = ["EVENTS", "event", "SHUTDOWN_CAUSE", "RUN_STATE"]

#: QEMU's ShutdownCause enum.
SHUTDOWN_CAUSE = Enum("ShutdownCause", [
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
    "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
    "snapshot-load"])
#: QEMU's RunState enum.
RUN_STATE = Enum("RunState", [
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
    "suspended", "watchdog", "guest-panicked", "colo"])
JOB_STATUS = Enum("JobStatus", [
    "undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending",
    "aborting", "concluded", "null"])
JOB_TYPE = Enum("JobType", [
    "commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load",
    "snapshot-save", "snapshot-delete"])
IO_OP = Enum("IoOperationType", ["read", "write"])
ERROR_ACTION = Enum("BlockErrorAction", ["ignore", "report", "stop"])

#: name -> data type (None: the event has no ``data``), in QEMU's schema order
EVENTS: dict[str, QType | None] = {}


def event(name: str, data: QType | None) -> None:
    """Declare an event for introspection."""
    EVENTS[name] = data


event("SHUTDOWN", Struct("q_obj_SHUTDOWN-arg", [("guest", BOOL), ("reason", SHUTDOWN_CAUSE)]))
event("POWERDOWN", None)
event("RESET", Struct("q_obj_RESET-arg", [("guest", BOOL), ("reason", SHUTDOWN_CAUSE)]))
event("STOP", None)
event("RESUME", None)
_JOB_INFO = [("type", JOB_TYPE), ("device", STR), ("len", INT), ("offset", INT),
             ("speed", INT), ("?error", STR)]
event("BLOCK_JOB_COMPLETED", Struct("q_obj_BLOCK_JOB_COMPLETED-arg", _JOB_INFO))
event("BLOCK_JOB_CANCELLED", Struct("q_obj_BLOCK_JOB_CANCELLED-arg", _JOB_INFO[:5]))
event("BLOCK_JOB_ERROR", Struct("q_obj_BLOCK_JOB_ERROR-arg",
                                [("device", STR), ("operation", IO_OP),
                                 ("action", ERROR_ACTION)]))
event("BLOCK_JOB_READY", Struct("q_obj_BLOCK_JOB_READY-arg", _JOB_INFO[:5]))
event("BLOCK_JOB_PENDING", Struct("q_obj_BLOCK_JOB_PENDING-arg",
                                  [("type", JOB_TYPE), ("id", STR)]))
event("JOB_STATUS_CHANGE", Struct("q_obj_JOB_STATUS_CHANGE-arg",
                                  [("id", STR), ("status", JOB_STATUS)]))

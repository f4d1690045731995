"""File descriptor sets, trace events, yank, command-line introspection.

emu's monitor does not take file descriptors over SCM_RIGHTS, so no fd or fd set ever
exists: the commands give QEMU's texts for that state.  emu has no trace events, so a
pattern matches none and an exact name is unknown (QEMU's texts).
"""

from __future__ import annotations

from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, qemu_command
from emu.qmp.errors import DEVICE_NOT_FOUND, unsupported

_NO_FD = "No file descriptor supplied via SCM_RIGHTS"


@qemu_command("getfd")
def getfd(ctx: CommandContext, fdname: str) -> dict:
    raise QmpError(_NO_FD)


@qemu_command("add-fd")
def add_fd(ctx: CommandContext, **kw: Any) -> dict:
    raise QmpError(_NO_FD)


@qemu_command("closefd")
def closefd(ctx: CommandContext, fdname: str) -> dict:
    raise QmpError(f"File descriptor named '{fdname}' not found")


@qemu_command("remove-fd")
def remove_fd(ctx: CommandContext, fdset_id: int, fd: int | None = None) -> dict:
    what = f"fdset-id:{fdset_id}" + ("" if fd is None else f", fd:{fd}")
    raise QmpError(f"File descriptor named '{what}' not found")


@qemu_command("query-fdsets")
def query_fdsets(ctx: CommandContext) -> list:
    return []


@qemu_command("add_client")
def add_client(ctx: CommandContext, protocol: str, fdname: str, **kw: Any) -> dict:
    raise QmpError(f"File descriptor named '{fdname}' has not been found")


def _is_pattern(name: str) -> bool:
    return "*" in name or "?" in name


@qemu_command("trace-event-get-state")
def trace_event_get_state(ctx: CommandContext, name: str, **kw: Any) -> list:
    if not _is_pattern(name):
        raise QmpError(f'unknown event "{name}"')
    return []


@qemu_command("trace-event-set-state")
def trace_event_set_state(ctx: CommandContext, name: str, enable: bool, **kw: Any) -> dict:
    if not _is_pattern(name):
        raise QmpError(f'unknown event "{name}"')
    return {}


def _yank_chardevs(ctx: CommandContext) -> list[str]:
    """Chardevs QEMU registers as yank instances: socket chardevs (monitors, serials)."""
    out = []
    for c in ctx.machine.config.chardevs:
        if c.backend == "socket":
            out.append(c.id)
    return out


@qemu_command("query-yank")
def query_yank(ctx: CommandContext) -> list:
    return [{"type": "chardev", "id": i} for i in _yank_chardevs(ctx)]


@qemu_command("yank")
def yank(ctx: CommandContext, instances: list) -> dict:
    known = set(_yank_chardevs(ctx))
    for inst in instances:
        if inst.get("type") != "chardev" or inst.get("id") not in known:
            raise QmpError("Instance not found", DEVICE_NOT_FOUND)
    if instances:
        raise unsupported("yank", "yanking a chardev's connection")
    return {}


@qemu_command("query-command-line-options")
def query_command_line_options(ctx: CommandContext, option: str | None = None) -> list:
    raise unsupported("query-command-line-options", "command-line option introspection")

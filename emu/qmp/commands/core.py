"""Core commands: negotiation, run state, version, introspection, quit."""

from __future__ import annotations

from typing import Any

from emu.errors import QmpError
from emu.machine.pc import ShutdownCause
from emu.qmp.commands import COMMANDS, CommandContext, command
from emu.qmp.errors import COMMAND_NOT_FOUND
from emu.qmp.events import EVENTS, RUN_STATE
from emu.qmp.schema import BOOL, INT, STR, Enum, List, SchemaBuilder, Struct

QMP_CAPABILITY = Enum("QMPCapability", ["oob"])
STATUS_INFO = Struct("StatusInfo", [("running", BOOL), ("singlestep", BOOL),
                                    ("status", RUN_STATE)])
VERSION_TRIPLE = Struct("VersionTriple", [("major", INT), ("minor", INT), ("micro", INT)])
VERSION_INFO = Struct("VersionInfo", [("qemu", VERSION_TRIPLE), ("package", STR)])
COMMAND_INFO = Struct("CommandInfo", [("name", STR)])
NAME_INFO = Struct("NameInfo", [("?name", STR)])
SCHEMA_INFO = Struct("SchemaInfo", [("name", STR), ("meta-type", STR)])


@command("qmp_capabilities", args=[("?enable", List(QMP_CAPABILITY))], inline=True)
def qmp_capabilities(ctx: CommandContext, enable: list[str] | None = None) -> dict:
    """Leave capabilities-negotiation mode, optionally enabling ``oob``."""
    s = ctx.session
    if s is None or s.negotiated:
        raise QmpError("Capabilities negotiation is already complete, command ignored",
                       COMMAND_NOT_FOUND)
    s.oob_enabled = "oob" in (enable or [])
    s.negotiated = True
    return {}


@command("query-status", returns=STATUS_INFO, inline=True)
def query_status(ctx: CommandContext) -> dict:
    return ctx.machine.query_status()


@command("query-version", returns=VERSION_INFO, inline=True)
def query_version(ctx: CommandContext) -> dict:
    from emu.qmp.protocol import version_info

    return version_info()


@command("query-commands", returns=List(COMMAND_INFO))
def query_commands(ctx: CommandContext) -> list:
    """QEMU 7.2's commands in QEMU's order (emu answers every one of them).  emu's own
    ``x-emu-*`` extensions are left out, so a client comparing with QEMU sees QEMU's list;
    ``query-qmp-schema`` describes them."""
    from emu.qmp.qapi72 import ORDER

    return [{"name": n} for n in ORDER if n in COMMANDS]


@command("query-name", returns=NAME_INFO, inline=True)
def query_name(ctx: CommandContext) -> dict:
    name = ctx.machine.name
    return {} if name is None else {"name": name}


@command("query-qmp-schema", returns=List(SCHEMA_INFO))
def query_qmp_schema(ctx: CommandContext) -> list:
    """QEMU's introspection format, describing exactly what emu implements."""
    b = SchemaBuilder()
    for c in COMMANDS.values():
        b.command(c.name, c.args, c.returns, c.allow_oob, c.features)
    for name, data in EVENTS.items():
        b.event(name, data)
    return b.result()


@command("stop")
def stop(ctx: CommandContext) -> dict:
    ctx.machine.pause()
    return {}


@command("cont")
def cont(ctx: CommandContext) -> dict:
    ctx.machine.resume()
    return {}


@command("system_reset")
def system_reset(ctx: CommandContext) -> dict:
    ctx.machine.reset(ShutdownCause.HOST_QMP_SYSTEM_RESET)
    return {}


@command("system_powerdown")
def system_powerdown(ctx: CommandContext) -> dict:
    ctx.machine.powerdown()
    return {}


@command("quit")
def quit_(ctx: CommandContext) -> dict:
    ctx.machine.quit(ShutdownCause.HOST_QMP_QUIT)
    return {}


@command("migrate-pause", allow_oob=True)
def migrate_pause(ctx: CommandContext) -> Any:
    """emu does not migrate, so there is never a postcopy to pause (QEMU's text)."""
    raise QmpError("migrate-pause is currently only supported during postcopy-active state")

"""The QMP command table: one ``@command("name")`` registry for every command.

A command module declares its arguments QAPI-style and gets them checked (with QEMU's
texts) before it runs::

    @command("blockdev-snapshot-internal-sync", args=[("device", STR), ("name", STR)])
    def snapshot_internal(ctx: CommandContext, device: str, name: str) -> dict: ...

Argument names reach the handler with ``-`` turned into ``_``; absent optional members
are not passed.  Modules: :mod:`.core` (negotiation, run state, version, schema),
:mod:`.hmp` (human-monitor-command), :mod:`.block` (block queries and snapshots).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from emu.qmp.schema import QType, Struct

__all__ = ["command", "Command", "CommandContext", "COMMANDS", "load_all"]


@dataclass
class Command:
    """One registered command."""

    name: str
    fn: Callable[..., Any]
    args: QType
    returns: QType | None
    allow_oob: bool = False
    features: Sequence[str] = ()
    #: runs in the monitor I/O thread instead of the command thread (OOB commands)
    boxed: bool = False


@dataclass
class CommandContext:
    """What a handler may use: the machine facade, the calling session, the server."""

    machine: Any
    session: Any = None
    server: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


#: name -> Command, in registration order (query-commands order)
COMMANDS: dict[str, Command] = {}


def command(name: str, args: Sequence[tuple[str, QType]] | QType = (),
            returns: QType | None = None, allow_oob: bool = False,
            features: Sequence[str] = (), boxed: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` as QMP command ``name``.

    :param args: QAPI members ``[("device", STR), ("?name", STR)]`` or a ready type.
    :param returns: the return type (introspection only).
    :param allow_oob: the command may be run with ``exec-oob``.
    :param boxed: pass the checked argument dict as one ``args`` parameter.
    """

    def deco(fn: Callable) -> Callable:
        t = args if isinstance(args, QType) else Struct(f"q_obj_{name}-arg", args)
        COMMANDS[name] = Command(name, fn, t, returns, allow_oob, tuple(features), boxed)
        return fn

    return deco


_MODULES = ("core", "hmp", "block")


def load_all() -> dict[str, Command]:
    """Import every command module (registration happens at import)."""
    for m in _MODULES:
        importlib.import_module(f"emu.qmp.commands.{m}")
    return COMMANDS

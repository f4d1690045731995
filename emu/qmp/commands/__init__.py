"""The QMP command table: one ``@command("name")`` registry for every command.

A command module declares its arguments QAPI-style and gets them checked (with QEMU's
texts) before it runs::

    @command("blockdev-snapshot-internal-sync", args=[("device", STR), ("name", STR)])
    def snapshot_internal(ctx: CommandContext, device: str, name: str) -> dict: ...

Argument names reach the handler with ``-`` turned into ``_``; absent optional members
are not passed.  Modules: :mod:`.core` (negotiation, run state, version, schema),
:mod:`.hmp` (human-monitor-command), :mod:`.block` (block queries and snapshots),
:mod:`.machine` (machine, CPU, memory, PCI, display queries; memsave), :mod:`.misc` (fd sets,
trace events, yank), :mod:`.chardev`, :mod:`.qom` (QOM tree, objects, devices),
:mod:`.block_extra` (block commands beyond snapshots and backup), :mod:`.unsupported`
(subsystems emu lacks: QEMU's own error where the machine lacks the feature, else an
``emu does not support`` error).  Commands QEMU 7.2 has are declared with
:func:`qemu_command`, which takes their types from QEMU's schema (:mod:`emu.qmp.qapi72`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from emu.qmp.schema import QType, Struct

__all__ = ["command", "qemu_command", "Command", "CommandContext", "COMMANDS", "load_all"]


@dataclass
class Command:
    """One registered command."""

    name: str
    fn: Callable[..., Any]
    args: QType
    returns: QType | None
    allow_oob: bool = False
    features: Sequence[str] = ()
    #: pass the checked arguments as one dict
    boxed: bool = False
    #: a lock-free read that may run in the I/O thread, skipping the hop to the command
    #: thread (query-status round trips are what clients poll)
    inline: bool = False


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
            features: Sequence[str] = (), boxed: bool = False,
            inline: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` as QMP command ``name``.

    :param args: QAPI members ``[("device", STR), ("?name", STR)]`` or a ready type.
    :param returns: the return type (introspection only).
    :param allow_oob: the command may be run with ``exec-oob``.
    :param boxed: pass the checked argument dict as one ``args`` parameter.
    :param inline: the handler only reads state without locks; it may run in the I/O
        thread (never for anything that waits or changes the machine).
    :raises ValueError: ``name`` is registered already (one table, one entry per name).
    """

    def deco(fn: Callable) -> Callable:
        if name in COMMANDS:
            # a second registration would silently replace the first (and its arguments)
            raise ValueError(f"QMP command '{name}' is already registered by "
                             f"{COMMANDS[name].fn.__module__}")
        t = args if isinstance(args, QType) else Struct(f"q_obj_{name}-arg", args)
        COMMANDS[name] = Command(name, fn, t, returns, allow_oob, tuple(features), boxed,
                                 inline)
        return fn

    return deco


def qemu_command(name: str, **kw: Any) -> Callable[[Callable], Callable]:
    """Register QEMU 7.2's command ``name`` with QEMU's own argument and return types, OOB
    flag and features (:mod:`emu.qmp.qapi72`), so its arguments are checked as QEMU checks
    them and ``query-qmp-schema`` describes it as QEMU does."""
    from emu.qmp import qapi72

    kw.setdefault("args", qapi72.arg_type(name))
    kw.setdefault("returns", qapi72.ret_type(name))
    kw.setdefault("allow_oob", qapi72.allow_oob(name))
    kw.setdefault("features", qapi72.features(name))
    return command(name, **kw)


_MODULES = ("core", "hmp", "block", "oracle", "jobs", "transaction", "machine", "misc",
            "chardev", "qom", "block_extra", "unsupported")


def load_all() -> dict[str, Command]:
    """Import every command module (registration happens at import)."""
    for m in _MODULES:
        importlib.import_module(f"emu.qmp.commands.{m}")
    return COMMANDS

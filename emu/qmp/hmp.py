"""The HMP (human monitor) commands emu offers through ``human-monitor-command``.

Output is built with ``\\n`` and returned with QEMU's ``\\r\\n`` line ends.  Unknown
commands give QEMU's text as a *successful* reply: ``unknown command: 'foo'``.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable

__all__ = ["run_hmp", "HMP_COMMANDS", "INFO_COMMANDS", "hmp"]

HmpFn = Callable[[Any, list[str]], str]
#: top-level HMP commands: name -> fn(machine, args) -> text
HMP_COMMANDS: dict[str, HmpFn] = {}
#: ``info`` sub-commands
INFO_COMMANDS: dict[str, HmpFn] = {}


def hmp(name: str, info: bool = False) -> Callable[[HmpFn], HmpFn]:
    """Register an HMP command (``info=True``: an ``info`` sub-command)."""

    def deco(fn: HmpFn) -> HmpFn:
        (INFO_COMMANDS if info else HMP_COMMANDS)[name] = fn
        return fn

    return deco


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def run_hmp(machine: Any, line: str) -> str:
    """Run one HMP command line; return its output with ``\\r\\n`` line ends."""
    text = line.strip()
    if not text:
        return ""
    name, _, rest = text.partition(" ")
    if name == "info":
        sub, _, rest2 = rest.strip().partition(" ")
        fn = INFO_COMMANDS.get(sub)
        if fn is None:
            out = f"unknown command: 'info {sub}'\n" if sub else _info_help()
        else:
            out = fn(machine, _split(rest2))
    else:
        fn = HMP_COMMANDS.get(name)
        if fn is None:
            out = f"unknown command: '{name}'\n"
        else:
            out = fn(machine, _split(rest))
    return out.replace("\n", "\r\n")


def _info_help() -> str:
    return "".join(f"info {n}\n" for n in sorted(INFO_COMMANDS))


@hmp("status", info=True)
def info_status(machine: Any, args: list[str]) -> str:
    st = machine.query_status()
    out = "VM status: " + ("running" if st["running"] else "paused")
    if not st["running"] and st["status"] != "paused":
        out += f" ({st['status']})"
    return out + "\n"


@hmp("version", info=True)
def info_version(machine: Any, args: list[str]) -> str:
    from emu.qmp.protocol import PACKAGE, QEMU_VERSION

    v = QEMU_VERSION
    return f"{v['major']}.{v['minor']}.{v['micro']}{PACKAGE and ' (' + PACKAGE + ')'}\n"


@hmp("name", info=True)
def info_name(machine: Any, args: list[str]) -> str:
    return f"{machine.name}\n" if machine.name else ""

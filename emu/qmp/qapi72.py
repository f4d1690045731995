"""QEMU 7.2's QMP interface as emu.qmp.schema types.

:mod:`emu.qmp.qapi72_table` holds QEMU 7.2's introspection (every command's argument and
return type and every type they reach).  Commands that emu declares from it get their
arguments checked exactly as QEMU's schema says (member names, optional members, enums,
unions, alternates) and are described by ``query-qmp-schema`` with QEMU's structure.

What the introspection does not carry, and therefore neither does the table: integer
widths (every integer is checked as a 64-bit ``int``) and type names (an alternate's
mismatch message names the type; the few alternates get their QEMU names here).
"""

from __future__ import annotations

from typing import Any

from emu.qmp import qapi72_table as _t
from emu.qmp.schema import (ANY, BOOL, INT, NULL, NUMBER, STR, Alternate, Enum, List, Member,
                            QType, Struct, Union)

__all__ = ["ORDER", "arg_type", "ret_type", "allow_oob", "features", "qtype"]

#: query-commands' order in QEMU 7.2
ORDER: tuple[str, ...] = _t.ORDER

_BUILTIN: dict[str, QType] = {"str": STR, "int": INT, "bool": BOOL, "number": NUMBER,
                              "any": ANY, "null": NULL}

#: QEMU's names for the alternates (its mismatch text says ``expected: <name>``)
_ALTERNATE_NAMES = {
    ("49", "str"): "BlockdevRef", ("49", "str", "null"): "BlockdevRefOrNull",
    ("str", "null"): "StrOrNull", ("str", "37"): "BlockDirtyBitmapOrStr",
    ("639", "640"): "Qcow2OverlapChecks", ("int", "bool", "[int]"): "StatsValue",
}

_cache: dict[str, QType] = {}


def qtype(name: str) -> QType:
    """The type the introspection calls ``name`` (``"197"``, ``"[int]"``, ``"str"``)."""
    t = _cache.get(name)
    if t is not None:
        return t
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name.startswith("["):
        t = _cache[name] = List(qtype(name[1:-1]))
        return t
    entry: tuple[Any, ...] = _t.TYPES[name]
    kind = entry[0]
    if kind == "enum":
        t = _cache[name] = Enum(name, entry[1])
        return t
    if kind == "alternate":
        alt = Alternate(_ALTERNATE_NAMES.get(tuple(entry[1]), name), ())
        _cache[name] = alt
        alt.choices = tuple(qtype(c) for c in entry[1])
        return alt
    # objects may be recursive (BlockdevOptions -> BlockdevRef -> BlockdevOptions): cache
    # the object before building its members
    base = Struct(name)
    if len(entry) > 2:
        u = Union(name, base, entry[2], {})
        _cache[name] = u
        base.members = _members(entry[1])
        u.branches = {case: qtype(branch) for case, branch in entry[3]}
        return u
    _cache[name] = base
    base.members = _members(entry[1])
    return base


def _members(spec: tuple) -> list[Member]:
    out = []
    for m in spec:
        key, tname = m[0], m[1]
        opt = key.startswith("?")
        out.append(Member(key[1:] if opt else key, qtype(tname), opt,
                          m[2] if len(m) > 2 else ()))
    return out


def arg_type(command: str) -> QType:
    """The argument type of QEMU 7.2's ``command``."""
    return qtype(_t.COMMANDS[command][0])


def ret_type(command: str) -> QType:
    return qtype(_t.COMMANDS[command][1])


def allow_oob(command: str) -> bool:
    return _t.COMMANDS[command][2]


def features(command: str) -> tuple[str, ...]:
    return _t.COMMANDS[command][3]

"""Declarative QAPI-style types: argument checking with QEMU's texts, and introspection.

Each command's arguments are one :class:`Struct` (members spelled as in QAPI: a leading
``?`` marks an optional member).  :meth:`QType.check` walks a parsed request exactly in
the order QEMU's ``qobject-input-visitor`` does, so the *first* problem found is the one
QEMU reports:

* wrong JSON type   -> ``Invalid parameter type for 'actions[0].data.device', expected: string``
* missing member    -> ``Parameter 'actions[0].data' is missing``
* unknown member    -> ``Parameter 'actions[0].extra' is unexpected`` (after all members)
* bad enum value    -> ``Parameter 'sync' does not accept value 'bogus'`` (member name only;
  ``'null'`` for list elements, a QEMU quirk kept on purpose)

The same objects produce ``query-qmp-schema`` entries in QEMU's introspection format
(:class:`SchemaBuilder`), with type names masked as numbers like QEMU does.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from emu.errors import QmpError
from emu.qmp.json import qdict_order

__all__ = [
    "QType", "Builtin", "Enum", "Struct", "Union", "Alternate", "List", "Member",
    "STR", "INT", "BOOL", "NUMBER", "ANY", "NULL", "UINT64", "SIZE", "INT64",
    "SchemaBuilder", "child_name",
]


def child_name(parent: str, key: str) -> str:
    """QEMU's ``full_name`` for a dictionary member below ``parent``."""
    return f"{parent}.{key}" if parent else key


def _type_error(full: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{full}', expected: {expected}")


class QType:
    """A QAPI type: checks a JSON value and describes itself for introspection."""

    name: str = ""

    def check(self, value: Any, full: str, name: str | None) -> Any:
        """Validate ``value``; return it (converted where QEMU converts).

        :param value: the parsed JSON value.
        :param full: QEMU's full path of the value (``actions[0].data``).
        :param name: the bare member name (``None`` for list elements).
        :raises QmpError: with QEMU's text for the first problem.
        """
        raise NotImplementedError

    def json_kind(self) -> str:
        return "object"


class Builtin(QType):
    """A QAPI builtin (``str``, ``int``, ``bool``, ``number``, ``any``, ``null``, sized ints)."""

    def __init__(self, name: str, json_type: str, lo: int | None = None,
                 hi: int | None = None) -> None:
        self.name = name
        self.json_type = json_type
        self.lo = lo
        self.hi = hi

    def json_kind(self) -> str:
        return self.json_type

    def check(self, value: Any, full: str, name: str | None) -> Any:
        jt = self.json_type
        if jt == "string":
            if not isinstance(value, str):
                raise _type_error(full, "string")
            return value
        if jt == "boolean":
            if not isinstance(value, bool):
                raise _type_error(full, "boolean")
            return value
        if jt == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(full, "number")
            return value
        if jt == "null":
            if value is not None:
                raise _type_error(full, "null")
            return None
        if jt == "value":
            return value
        # integers
        if self.name in ("uint64", "size"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise QmpError(f"Parameter '{full}' expects {self.name}")
            if value < 0:       # QEMU accepts negative int64 for compatibility
                value &= (1 << 64) - 1
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not (
                -(1 << 63) <= value < (1 << 63)):
            if self.name.startswith("uint") and isinstance(value, int) and not isinstance(value, bool):
                raise QmpError(f"Parameter '{name or 'null'}' expects {self.name}_t")
            raise _type_error(full, "integer")
        if self.lo is not None and not (self.lo <= value <= self.hi):
            raise QmpError(f"Parameter '{name or 'null'}' expects {self.name}_t")
        return value


STR = Builtin("str", "string")
INT = Builtin("int", "int")
INT64 = Builtin("int64", "int")
UINT64 = Builtin("uint64", "int")
SIZE = Builtin("size", "int")
UINT32 = Builtin("uint32", "int", 0, (1 << 32) - 1)
UINT16 = Builtin("uint16", "int", 0, (1 << 16) - 1)
UINT8 = Builtin("uint8", "int", 0, 255)
INT32 = Builtin("int32", "int", -(1 << 31), (1 << 31) - 1)
BOOL = Builtin("bool", "boolean")
NUMBER = Builtin("number", "number")
ANY = Builtin("any", "value")
NULL = Builtin("null", "null")


class Enum(QType):
    """A QAPI enum: a string from a fixed set."""

    def __init__(self, name: str, values: Sequence[str]) -> None:
        self.name = name
        self.values = tuple(values)
        self._set = frozenset(values)

    def json_kind(self) -> str:
        return "string"

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if not isinstance(value, str):
            raise _type_error(full, "string")
        if value not in self._set:
            raise QmpError(f"Parameter '{name if name is not None else 'null'}' "
                           f"does not accept value '{value}'")
        return value


class List(QType):
    """A QAPI array ``[T]``."""

    def __init__(self, elem: QType) -> None:
        self.elem = elem
        self.name = f"[{elem.name}]"

    def json_kind(self) -> str:
        return "array"

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if not isinstance(value, list):
            raise _type_error(full, "array")
        return [self.elem.check(v, f"{full}[{i}]", None) for i, v in enumerate(value)]


class Member:
    """One struct member; ``optional`` members may be absent."""

    def __init__(self, name: str, type_: QType, optional: bool = False,
                 features: Sequence[str] = ()) -> None:
        self.name = name
        self.type = type_
        self.optional = optional
        self.features = tuple(features)


def _members(spec: Iterable[tuple[str, QType]]) -> list[Member]:
    out = []
    for key, t in spec:
        opt = key.startswith("?")
        out.append(Member(key[1:] if opt else key, t, opt))
    return out


class Struct(QType):
    """A QAPI struct; members given as ``[("name", T), ("?optional", T), …]``."""

    def __init__(self, name: str, spec: Iterable[tuple[str, QType]] = (),
                 base: "Struct | None" = None) -> None:
        self.name = name
        own = _members(spec)
        self.members: list[Member] = (list(base.members) if base else []) + own

    def visit_members(self, d: dict, seen: set, full: str, out: dict) -> None:
        for m in self.members:
            key = m.name
            if key not in d:
                if not m.optional:
                    raise QmpError(f"Parameter '{child_name(full, key)}' is missing")
                continue
            seen.add(key)
            out[key] = m.type.check(d[key], child_name(full, key), key)

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if not isinstance(value, dict):
            raise _type_error(full or "null", "object")
        out: dict = {}
        seen: set = set()
        self.visit_members(value, seen, full, out)
        _check_unexpected(value, seen, full)
        return out


def _check_unexpected(d: dict, seen: set, full: str) -> None:
    if len(seen) == len(d):
        return
    for key in ghash_order(qdict_order(list(d))):
        if key not in seen:
            raise QmpError(f"Parameter '{child_name(full, key)}' is unexpected")


_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521)


def _g_str_hash(key: str) -> int:
    h = 5381
    for c in key.encode("utf-8", "surrogatepass"):
        h = (h * 33 + c) & 0xFFFFFFFF
    return h if h > 1 else 2


def ghash_order(keys: list[str]) -> list[str]:
    """Iteration order of a GLib ``GHashTable`` (g_str_hash) after inserting ``keys``.

    QEMU's input visitor copies a struct's members into a GHashTable, removes each one
    it visits and reports the first one left over — in this order.
    """
    shift = 3
    slots: list[str | None] = [None] * (1 << shift)

    def index(key: str, shift: int) -> int:
        return (_g_str_hash(key) * 11 & 0xFFFFFFFF) % _PRIME_MOD[shift]

    n = 0
    for k in keys:
        mask = (1 << shift) - 1
        idx, step = index(k, shift), 0
        while slots[idx] is not None:
            step += 1
            idx = (idx + step) & mask
        slots[idx] = k
        n += 1
        if len(slots) <= n + n // 16:
            # g_hash_table_resize: grow in place, relocating by eviction in slot order
            old_size = len(slots)
            shift = max(3, int(n * 1.333).bit_length())
            mask = (1 << shift) - 1
            slots = slots + [None] * ((1 << shift) - old_size)
            done = [False] * len(slots)
            for i in range(old_size):
                if slots[i] is None or done[i]:
                    continue
                key: str | None = slots[i]
                slots[i] = None
                while key is not None:
                    j, step = index(key, shift), 0
                    while done[j]:
                        step += 1
                        j = (j + step) & mask
                    done[j] = True
                    key, slots[j] = slots[j], key
    return [k for k in slots if k is not None]


class Union(QType):
    """A QAPI flat union: base members (including the discriminator), then the members
    of the branch the discriminator selects, all in one JSON object."""

    def __init__(self, name: str, base: Struct, discriminator: str,
                 branches: dict[str, Struct]) -> None:
        self.name = name
        self.base = base
        self.discriminator = discriminator
        self.branches = branches

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if not isinstance(value, dict):
            raise _type_error(full or "null", "object")
        out: dict = {}
        seen: set = set()
        self.base.visit_members(value, seen, full, out)
        branch = self.branches.get(out[self.discriminator])
        if branch is not None:
            branch.visit_members(value, seen, full, out)
        _check_unexpected(value, seen, full)
        return out


class Alternate(QType):
    """A QAPI alternate: the branch is chosen by the JSON type of the value."""

    def __init__(self, name: str, choices: Sequence[QType]) -> None:
        self.name = name
        self.choices = tuple(choices)

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if isinstance(value, dict):
            kind = "object"
        elif isinstance(value, list):
            kind = "array"
        elif isinstance(value, str):
            kind = "string"
        elif isinstance(value, bool):
            kind = "boolean"
        elif isinstance(value, (int, float)):
            kind = "int" if isinstance(value, int) else "number"
        else:
            kind = "null"
        for c in self.choices:
            ck = c.json_kind()
            if ck == kind or (ck == "number" and kind == "int"):
                return c.check(value, full, name)
        raise _type_error(name or "null", self.name)


# ----------------------------------------------------------------- keyval input

_KEYVAL_TRUE = ("on", "yes", "true", "y")
_KEYVAL_FALSE = ("off", "no", "false", "n")


def keyval_typed(qtype: QType, value: Any, full: str = "") -> Any:
    """Command-line keyval (``-blockdev driver=raw,read-only=on,file.filename=x``: every
    leaf a string) to the typed value QEMU's keyval input visitor makes of it for
    ``qtype``: booleans from on/off/yes/no/true/false, integers in C notation, sizes with
    suffixes, alternates by shape (a dict or a string); enums and strings stay strings.
    Keys the type lacks stay as they are, for :meth:`QType.check` to refuse with QEMU's text.

    :raises QmpError: QEMU's ``Parameter 'x' expects ...`` for a leaf that does not parse.
    """
    if isinstance(qtype, Alternate):
        for c in qtype.choices:
            if isinstance(value, dict) and isinstance(c, (Struct, Union)):
                return keyval_typed(c, value, full)
            if isinstance(value, str) and isinstance(c, (Builtin, Enum)) and c.json_kind() == "string":
                return value
        scalars = [c for c in qtype.choices if isinstance(c, Builtin) and c.json_type != "null"]
        return keyval_typed(scalars[0], value, full) if scalars and isinstance(value, str) else value
    if isinstance(qtype, Union):
        if not isinstance(value, dict):
            return value
        out = _keyval_members(qtype.base, value, full)
        branch = qtype.branches.get(out.get(qtype.discriminator))
        return _keyval_members(branch, out, full) if branch is not None else out
    if isinstance(qtype, Struct):
        return _keyval_members(qtype, value, full) if isinstance(value, dict) else value
    if isinstance(qtype, List) or not isinstance(value, str) or not isinstance(qtype, Builtin):
        return value
    jt = qtype.json_type
    if jt == "boolean":
        if value in _KEYVAL_TRUE:
            return True
        if value in _KEYVAL_FALSE:
            return False
        raise QmpError(f"Parameter '{full}' expects 'on' or 'off'")
    if jt == "int":
        if qtype.name == "size":
            from emu.img.util import parse_size

            try:
                n = parse_size(value)
            except ValueError:
                raise QmpError(f"Parameter '{full}' expects a non-negative number below 2^64\n"
                               "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                               "tera-, peta-\nand exabytes, respectively.") from None
            return n
        try:
            return int(value, 0)
        except ValueError:
            raise QmpError(f"Parameter '{full}' expects {'integer' if qtype.name in ('int', 'int64') else qtype.name}") from None
    if jt == "number":
        try:
            return float(value)
        except ValueError:
            raise QmpError(f"Parameter '{full}' expects number") from None
    return value


def _keyval_members(struct: Struct, d: dict, full: str) -> dict:
    out = dict(d)
    for m in struct.members:
        if m.name in d:
            out[m.name] = keyval_typed(m.type, d[m.name], child_name(full, m.name))
    return out


# ----------------------------------------------------------------- introspection

class SchemaBuilder:
    """Builds ``query-qmp-schema``'s list: entities first, then every type they use,
    non-builtin type names masked as decimal strings in order of first use (as QEMU)."""

    def __init__(self) -> None:
        self.entities: list[dict] = []
        self.types: list[dict] = []
        self._names: dict[int, str] = {}
        self._count = 0
        self._builtins: set[str] = set()

    def _use(self, t: QType | None) -> str:
        if t is None:
            t = _EMPTY
        key = id(t)
        if key in self._names:
            return self._names[key]
        if isinstance(t, Builtin):
            name = {"string": "str", "boolean": "bool", "value": "any", "int": "int",
                    "number": "number", "null": "null"}[t.json_type]
            self._names[key] = name
            if name not in self._builtins:
                self._builtins.add(name)
                self.types.append({"name": name, "json-type": t.json_type,
                                   "meta-type": "builtin"})
            return name
        if isinstance(t, List):
            elem = self._use(t.elem)
            name = f"[{elem}]"
            self._names[key] = name
            if name not in self._builtins:
                self._builtins.add(name)
                self.types.append({"name": name, "element-type": elem, "meta-type": "array"})
            return name
        name = str(self._count)
        self._count += 1
        self._names[key] = name
        entry: dict = {"name": name}
        self.types.append(entry)
        if isinstance(t, Enum):
            entry["members"] = [{"name": v} for v in t.values]
            entry["meta-type"] = "enum"
            entry["values"] = list(t.values)
        elif isinstance(t, Alternate):
            entry["members"] = [{"type": self._use(c)} for c in t.choices]
            entry["meta-type"] = "alternate"
        elif isinstance(t, Union):
            entry["members"] = self._member_list(t.base.members)
            entry["meta-type"] = "object"
            entry["tag"] = t.discriminator
            entry["variants"] = [{"case": case, "type": self._use(s)}
                                 for case, s in t.branches.items()]
        elif isinstance(t, Struct):
            entry["members"] = self._member_list(t.members)
            entry["meta-type"] = "object"
        return name

    def _member_list(self, members: list[Member]) -> list[dict]:
        out = []
        for m in members:
            d: dict = {"name": m.name, "type": self._use(m.type)}
            if m.optional:
                d["default"] = None
            out.append(d)
        return out

    def command(self, name: str, args: QType | None, ret: QType | None, allow_oob: bool,
                features: Sequence[str]) -> None:
        entry: dict = {"name": name, "ret-type": self._use(ret)}
        if allow_oob:
            entry["allow-oob"] = True
        entry["meta-type"] = "command"
        entry["arg-type"] = self._use(args)
        if features:
            entry["features"] = list(features)
        self.entities.append(entry)

    def event(self, name: str, data: QType | None) -> None:
        self.entities.append({"name": name, "meta-type": "event", "arg-type": self._use(data)})

    def result(self) -> list[dict]:
        return self.entities + self.types


_EMPTY = Struct("q_empty")

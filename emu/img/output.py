"""Output formatting shared by the emu-img subcommands, byte-compatible with qemu-img 7.2.

qemu-img builds its JSON from QObjects: a QDict is a 512-bucket hash table whose
iteration order is bucket order (QEMU's ``tdb_hash``), newest entry first inside a
bucket.  :func:`to_json_pretty` reproduces that order from an insertion-ordered
Python dict, so ``--output=json`` prints members exactly where qemu-img does.
"""

from __future__ import annotations

import math
import time
from typing import Any

QDICT_BUCKET_MAX = 512


def _tdb_hash(name: str) -> int:
    """QEMU's qdict.c ``tdb_hash`` (32-bit arithmetic)."""
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(d: dict[str, Any]) -> list[str]:
    """The iteration order QEMU's QDict gives to keys inserted in ``d``'s order."""
    buckets: dict[int, list[str]] = {}
    for key in d:
        buckets.setdefault(_tdb_hash(key) % QDICT_BUCKET_MAX, []).insert(0, key)
    return [k for b in sorted(buckets) for k in buckets[b]]


def _scalar(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    import json  # here: json costs every emu-img start-up ~5 ms and few commands print it
    return json.dumps(v, ensure_ascii=False)


def to_json_pretty(obj: Any, indent: int = 0) -> str:
    """Serialise like QEMU 7.2's ``qobject_to_json_pretty`` (4-space indent, QDict order).

    :param obj: dicts (insertion order = QAPI member order), lists and scalars.
    :param indent: current nesting level.
    """
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + end + "}"
        import json
        items = [f'{pad}{json.dumps(k)}: {to_json_pretty(obj[k], indent + 1)}' for k in qdict_order(obj)]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[\n" + end + "]"
        items = [pad + to_json_pretty(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return _scalar(obj)


def size_to_str(val: int) -> str:
    """QEMU's ``size_to_str``: ``196 KiB``, ``1.27 MiB``, ``0 B``."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    _, e = math.frexp(val / (1000.0 / 1024.0))
    i = max((e - 1) // 10, 0)
    return "%0.3g %s" % (val / (1 << (i * 10)), suffixes[i])


SNAPSHOT_HEADER_LINE = "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def snapshot_line(id_str: str, name: str, vm_state_size: int, date_sec: int, vm_clock_nsec: int,
                  icount: int | None) -> str:
    """One row of qemu-img's snapshot table (``bdrv_snapshot_dump``), local time as QEMU."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date_sec))
    secs = vm_clock_nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                      (vm_clock_nsec // 1_000_000) % 1000)
    ic = "" if icount is None else str(icount)
    return "%-9s %-16s %8s%20s%13s%11s" % (id_str, name, size_to_str(vm_state_size), date, clock, ic)

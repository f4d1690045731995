"""``x-emu-query-cuts``: the cut report of the consistency oracle (``emu/oracle/README.md``).

An ``x-`` query (QEMU's prefix for experimental commands) and not an event: a client that
replays QEMU's exchanges never sees anything QEMU would not send unless it asks.
"""

from __future__ import annotations

from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, command
from emu.qmp.schema import BOOL, INT, STR, List, Struct

EMU_CUT_TIMESTAMP = Struct("EmuCutTimestamp", [("seconds", INT), ("microseconds", INT)])
EMU_CUT_DEVICE = Struct("EmuCutDevice", [
    ("device", STR), ("node-name", STR), ("accounted", BOOL), ("?wr_operations", INT),
    ("?failed_wr_operations", INT), ("?flush_operations", INT), ("?wr_bytes", INT),
    ("in-flight", INT)])
EMU_CUT = Struct("EmuCut", [("id", INT), ("command", STR), ("timestamp", EMU_CUT_TIMESTAMP),
                            ("vm-clock-ns", INT), ("devices", List(EMU_CUT_DEVICE))])


@command("x-emu-query-cuts", args=[("?since", INT), ("?limit", INT)], returns=List(EMU_CUT))
def x_emu_query_cuts(ctx: CommandContext, since: int | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
    """The recent cuts, oldest first: every quiesce (transaction, snapshot, backup start, stop)
    with per-device completed-write counters taken after the drain.

    :param since: only cuts with a larger id.
    :param limit: only the newest ``limit`` cuts.
    """
    if limit is not None and limit < 1:
        raise QmpError("Parameter 'limit' expects a positive number")
    log = getattr(ctx.machine, "cuts", None)
    if log is None:
        return []
    return [c.to_qmp() for c in log.recent(since, limit)]

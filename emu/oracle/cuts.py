"""The cut report: what every quiesce froze, per block device, for the consistency oracle.

``Machine.quiesce()`` calls :meth:`CutLog.record` once per outermost drained section, after
every affected BlockBackend has drained (nothing in flight, completions delivered to the
guest), the vCPU is parked and metadata is written back — i.e. at the instant the
transaction's images are taken.  A :class:`Cut` holds, per device, the BlockBackend's
counters as ``query-blockstats`` names them (QEMU's ``wr_operations`` counts *completed*
writes; failed ones go to ``failed_wr_operations``), a monotonically increasing id, and the
command that ran inside (``transaction``, ``blockdev-snapshot-internal-sync``, ``stop``, ...),
which the caller names: ``Machine.quiesce(reason=…)``.

QMP clients read them with ``x-emu-query-cuts`` (:mod:`emu.qmp.commands.oracle`): an
``x-`` query rather than an event, because an event QEMU never sends would break clients that
replay QEMU's exchanges.  The oracle (:mod:`emu.oracle.check`) maps devices to the guest's
disks with :func:`emu.oracle.check.disk_for_device` and checks the snapshot against it.

This module imports nothing of the machine; the machine imports it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Cut", "DeviceCut", "CutLog", "backend_counters", "COUNTER_KEYS"]

#: The counters a cut records, named as query-blockstats names them.
COUNTER_KEYS = ("wr_operations", "failed_wr_operations", "flush_operations", "wr_bytes")
#: The command of a cut whose quiesce() was given no reason.
UNKNOWN_COMMAND = "unknown"
#: Cuts kept for ``x-emu-query-cuts`` (older ones are dropped; ids keep counting).
DEFAULT_KEEP = 256


def backend_counters(blk: Any) -> dict[str, int] | None:
    """The BlockBackend's accounting (``blk.stats``: a dict or an object with the
    query-blockstats names), or None when the backend keeps none.

    :param blk: an ``emu.block.api.BlockBackend`` (or anything with ``stats``).
    """
    stats = getattr(blk, "stats", None)
    if stats is None:
        return None
    if not isinstance(stats, dict):
        stats = dict(getattr(stats, "__dict__", {}))
    if "wr_operations" not in stats:
        return None
    return {k: int(stats.get(k, 0)) for k in COUNTER_KEYS}


@dataclass(frozen=True)
class DeviceCut:
    """One block device at a cut.

    :param device: the BlockBackend/device name (``ide0-hd0``, ``virtio0``), or the qdev path of
        a device attached to a node by ``drive=<node-name>`` (its BlockBackend has no name).
    :param node_name: its root node's name ('' with no medium).
    :param counters: :data:`COUNTER_KEYS` values, or None when the backend keeps no accounting.
    :param in_flight: requests in flight after the drain (0 unless the drain failed).
    """

    device: str
    node_name: str
    counters: dict[str, int] | None
    in_flight: int

    def to_qmp(self) -> dict[str, Any]:
        d: dict[str, Any] = {"device": self.device, "node-name": self.node_name,
                             "accounted": self.counters is not None}
        if self.counters is not None:
            d.update(self.counters)
        d["in-flight"] = self.in_flight
        return d


@dataclass(frozen=True)
class Cut:
    """One quiesce: id, what ran inside, when, and every drained device."""

    id: int
    command: str
    #: wall clock, QEMU event timestamp style
    seconds: int
    microseconds: int
    #: guest-running time (QEMU's vm clock), as internal snapshots record it
    vm_clock_ns: int
    devices: tuple[DeviceCut, ...]

    def to_qmp(self) -> dict[str, Any]:
        """The ``x-emu-query-cuts`` entry (member order fixed)."""
        return {"id": self.id, "command": self.command,
                "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
                "vm-clock-ns": self.vm_clock_ns,
                "devices": [d.to_qmp() for d in self.devices]}

    def writes(self) -> dict[str, int]:
        """``{device: completed writes}`` of the accounted devices (the oracle's cut)."""
        return {d.device: d.counters["wr_operations"] for d in self.devices if d.counters is not None}


class CutLog:
    """The machine's recent cuts, thread-safe.

    :param keep: how many cuts to keep.
    """

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self._lock = threading.Lock()
        self._cuts: deque[Cut] = deque(maxlen=keep)
        self._next = 1

    def record(self, machine: Any, backends: Iterable[Any], command: str | None = None) -> Cut:
        """Record a cut of ``backends`` (call it drained, vCPU parked).

        :param machine: the ``Machine`` (device names, vm clock).
        :param backends: the drained BlockBackends.
        :param command: what runs in the drained section (``quiesce(reason=…)``: the QMP
            command name); ``unknown`` when the caller gave none.
        """
        names = {id(d.backend): d for d in getattr(machine, "block_devices", [])
                 if getattr(d, "backend", None) is not None}
        devices = []
        for blk in backends:
            dev = names.get(id(blk))
            root = getattr(blk, "root", None)
            devices.append(DeviceCut(
                # a device's own BlockBackend on a -blockdev node has no name: its qdev
                # path keys it (several such devices would all be "")
                device=(dev.name or dev.qdev) if dev is not None else str(getattr(blk, "name", "")),
                node_name=str(getattr(root, "node_name", "") or "") if root is not None else "",
                counters=backend_counters(blk),
                in_flight=int(getattr(blk, "in_flight", 0) or 0)))
        clock = getattr(machine, "vm_clock_ns", None)
        now = time.time()
        with self._lock:
            cut = Cut(self._next, command or UNKNOWN_COMMAND, int(now), int(now % 1 * 1e6),
                      int(clock()) if callable(clock) else 0, tuple(devices))
            self._next += 1
            self._cuts.append(cut)
        return cut

    def recent(self, since: int | None = None, limit: int | None = None) -> list[Cut]:
        """Cuts oldest first: those with ``id > since``, at most the newest ``limit``."""
        with self._lock:
            cuts = [c for c in self._cuts if since is None or c.id > since]
        return cuts[-limit:] if limit else cuts

    def last(self) -> Cut | None:
        with self._lock:
            return self._cuts[-1] if self._cuts else None

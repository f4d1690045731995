"""The consistency oracle: does a set of disk images hold exactly one cut of the guest's writes?

Inputs: the diskwriter guest's serial log (:func:`emu.oracle.records.parse_log`), one image per
disk (``ide``, ``vd``: raw bytes of the data area, or an :class:`DiskImage` naming a file and
optionally an internal snapshot), and optionally the **cut**: per disk, the number of guest write
requests the device had completed when the snapshot was taken (emu's ``x-emu-query-cuts``, i.e.
the BlockBackend's ``wr_operations`` after the drain).

Model.  Each disk has one request in flight, so its writes complete in issue order and "the
first N writes of that disk (failed ones do not count: QEMU accounts them apart)" is exactly the
set a device had completed after N completions.  The device completes a write after its ``W``
line and before its ``C``/``E`` line; a cut is one instant T, so disk d cut after its k-th write
needs ``W(k-th) < T < end(k+1-th)`` in log line order.  The cuts of several disks are
**consistent** (one point of the guest's global order) when those windows intersect.

Checks, per LBA of the data area, against the newest write of the cut there:

- ``missing``: a write completed before the cut is not there (older record or zeros);
- ``after-cut``: a record of a write that is not in the cut;
- ``torn``: a sector that is neither zeros nor a valid record (crc/payload/magic damage);
- ``misplaced``: a valid record of another LBA or disk;
- ``unknown``: a record of this run that the log never issued (or with another LBA/gen);
- ``inconsistent``: the disks' cuts are not one instant; ``cut``: the cut contradicts the log.

Without a cut (:func:`check` with ``cut=None``) the oracle infers, per disk, the range of prefixes
the image agrees with, intersects their windows, and checks the tightest cut in it, so it works
on snapshots made by qemu-system-x86_64 too.  LBAs whose last write failed (``E``) are undefined
and skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from emu.errors import EmuError
from emu.oracle.images import read_region
from emu.oracle.records import (DISK_IDS, DISK_NAMES, SECTOR_SIZE, Sector, SerialLog, Write,
                                scan_region)

__all__ = ["DiskImage", "Violation", "DiskResult", "OracleResult", "OracleError", "check",
           "disk_for_device"]

INF = math.inf


class OracleError(EmuError):
    """The oracle cannot run: bad input (no such disk in the log, unreadable image...)."""


@dataclass(frozen=True)
class DiskImage:
    """Where one disk's state is: an image file (active layer through its backing chain, e.g.
    an external snapshot's backing file or a backup target) or an internal snapshot in it.

    :param path: the image file.
    :param snapshot: an internal qcow2 snapshot's name or id; None for the active layer.
    :param fmt: ``qcow2``/``raw``, probed when None.
    """

    path: str
    snapshot: str | None = None
    fmt: str | None = None

    def read(self, start: int, count: int) -> bytes:
        """The sectors ``start .. start+count-1``."""
        return read_region(self.path, start, count, snapshot=self.snapshot, fmt=self.fmt)

    def __str__(self) -> str:
        return f"{self.path}@{self.snapshot}" if self.snapshot else self.path


@dataclass(frozen=True)
class Violation:
    """One thing wrong: ``kind`` (see the module doc), where, what was expected, what was found."""

    kind: str
    disk: str | None
    lba: int | None
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"{self.disk or '*'}" + (f" lba {self.lba}" if self.lba is not None else "")
        return f"VIOLATION {self.kind}: {where}: expected {self.expected}; found {self.found}"


@dataclass
class DiskResult:
    """The verdict on one disk."""

    disk: str
    source: str
    #: completed (successful) writes in the cut, as the device counts them
    cut: int
    #: index into the disk's issued writes: the cut holds ``writes[:prefix]``
    prefix: int
    #: the range of ``cut`` values the image agrees with (inferred mode), else (cut, cut)
    cut_range: tuple[int, int]
    #: seq of the newest write in the cut (0: none)
    last_seq: int
    checked: int = 0
    match: int = 0
    empty: int = 0
    undefined: int = 0
    violations: list[Violation] = field(default_factory=list)


@dataclass
class OracleResult:
    """The verdict: :attr:`ok` when there is no violation."""

    inferred: bool
    disks: dict[str, DiskResult]
    #: the cut instant lies strictly between these log lines (indices of ``SerialLog.lines``)
    window: tuple[float, float]
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        """Human-readable text: one line per disk, one per violation, a verdict."""
        lo, hi = self.window
        out = [f"cut {'inferred from the images' if self.inferred else 'as reported'}: "
               f"between log lines {_line(lo)} and {_line(hi)}"]
        for d in self.disks.values():
            rng = "" if d.cut_range[0] == d.cut_range[1] else f" (image agrees with {d.cut_range[0]}..{d.cut_range[1]})"
            out.append(f"{d.disk} {d.source}: cut after {d.cut} completed writes{rng}, newest seq "
                       f"{d.last_seq}; checked={d.checked} match={d.match} empty={d.empty} "
                       f"undefined={d.undefined} violations={len(d.violations)}")
        out += [str(v) for v in self.violations]
        out.append("OK: 0 violations" if self.ok else f"FAIL: {len(self.violations)} violation(s)")
        return "\n".join(out)


def _line(x: float) -> str:
    return "start" if x < 0 else "end" if x == INF else str(int(x))


def disk_for_device(device: str) -> str | None:
    """The diskwriter disk of a QEMU device name: ``ide…`` -> ``ide``, ``virtio…`` -> ``vd``."""
    if device in DISK_IDS:
        return device
    if device.startswith("ide"):
        return "ide"
    if device.startswith("virtio") or device.startswith("vd"):
        return "vd"
    return None


# ---------------------------------------------------------------- per disk

class _Disk:
    """One disk's writes in issue order and its image's sectors."""

    def __init__(self, log: SerialLog, disk: str, sectors: list[Sector], source: str) -> None:
        self.log, self.disk, self.sectors, self.source = log, disk, sectors, source
        self.writes: list[Write] = sorted(log.issued_writes(disk), key=lambda w: w.seq)
        self.index = {w.seq: i for i, w in enumerate(self.writes)}
        self.by_lba: dict[int, list[int]] = {}
        for i, w in enumerate(self.writes):
            self.by_lba.setdefault(w.lba, []).append(i)
        # LBAs whose content is undefined: some write there failed
        self.undefined = {w.lba for w in self.writes if w.failed is not None}

    def end_line(self, i: int) -> float:
        """Log line by which write ``i`` had certainly completed at the device (INF: never seen)."""
        if i >= len(self.writes):
            return INF
        w = self.writes[i]
        done = w.completed if w.completed is not None else w.failed
        return INF if done is None else done

    def start_line(self, k: int) -> float:
        """Log line after which a cut holding ``writes[:k]`` lies (the ``W`` of the k-th)."""
        return -1 if k == 0 else self.writes[k - 1].issued

    def count(self, k: int) -> int:
        """Completed-write count (failed writes excluded) of the prefix ``writes[:k]``."""
        return sum(1 for w in self.writes[:k] if w.failed is None)

    def prefix_for(self, n: int) -> int | None:
        """Smallest k whose prefix holds ``n`` counted writes (None: the log has fewer)."""
        if n == 0:
            return 0
        c = 0
        for i, w in enumerate(self.writes):
            if w.failed is None:
                c += 1
                if c == n:
                    return i + 1
        return None

    def _record_problem(self, s: Sector, expected: str) -> Violation | None:
        """A violation that no cut can excuse (torn, misplaced, unknown), or None."""
        disk, lba = self.disk, s.lba
        if s.error is not None:
            return Violation("torn", disk, lba, expected, f"a damaged sector ({s.error})")
        rec = s.record
        if rec is None or rec.run != self.log.run:
            return None
        if rec.disk != DISK_IDS[disk] or rec.lba != lba:
            return Violation("misplaced", disk, lba, expected,
                             f"the record of {DISK_NAMES.get(rec.disk, rec.disk)} lba {rec.lba} "
                             f"seq {rec.seq} gen {rec.gen}")
        w = self.log.writes.get(rec.seq)
        if w is None or w.disk != disk or w.lba != lba or w.gen != rec.gen:
            return Violation("unknown", disk, lba, expected,
                             f"record seq {rec.seq} gen {rec.gen}, which the log never issued here")
        return None

    def bounds(self) -> tuple[int, int, list[Violation], str, str]:
        """Prefix range [lo, hi] the image agrees with, cut-independent violations, and the
        LBAs that set lo and hi (for messages)."""
        lo, hi = 0, len(self.writes)
        why_lo = why_hi = ""
        problems = []
        for s in self.sectors:
            if s.lba in self.undefined:
                continue
            p = self._record_problem(s, "a record of this disk and LBA, or zeros")
            if p is not None:
                problems.append(p)
                continue
            idxs = self.by_lba.get(s.lba, [])
            rec = s.record
            if rec is None or rec.run != self.log.run:
                if idxs and idxs[0] < hi:
                    hi, why_hi = idxs[0], f"lba {s.lba} lacks seq {self.writes[idxs[0]].seq}"
                continue
            i = self.index[rec.seq]
            if i + 1 > lo:
                lo, why_lo = i + 1, f"lba {s.lba} holds seq {rec.seq}"
            later = [j for j in idxs if j > i]
            if later and later[0] < hi:
                hi, why_hi = later[0], f"lba {s.lba} holds seq {rec.seq}, not seq {self.writes[later[0]].seq}"
        return lo, hi, problems, why_lo, why_hi

    def verify(self, k: int) -> DiskResult:
        """Check the image against the cut holding ``writes[:k]``."""
        newest: dict[int, Write] = {}
        for w in self.writes[:k]:
            newest[w.lba] = w  # issue order = seq order on one disk
        n = self.count(k)
        res = DiskResult(self.disk, self.source, n, k, (n, n), self.writes[k - 1].seq if k else 0)
        for s in self.sectors:
            res.checked += 1
            if s.lba in self.undefined:
                res.undefined += 1
                continue
            exp = newest.get(s.lba)
            want = f"seq {exp.seq} gen {exp.gen}" if exp else "zeros (no write completed before the cut)"
            p = self._record_problem(s, want)
            if p is not None:
                res.violations.append(p)
                continue
            rec = s.record
            if rec is None or rec.run != self.log.run:
                if exp is None:
                    res.empty += 1
                else:
                    got = "zeros" if s.zero else f"a record of another run ({rec.run:08x})"
                    res.violations.append(Violation("missing", self.disk, s.lba, want, got))
                continue
            i = self.index[rec.seq]
            if i >= k:
                w = self.writes[i]
                res.violations.append(Violation(
                    "after-cut", self.disk, s.lba, want,
                    f"seq {rec.seq} gen {rec.gen}, issued after the cut (log line {w.issued})"))
            elif exp is not None and rec.seq != exp.seq:
                res.violations.append(Violation(
                    "missing", self.disk, s.lba, want,
                    f"older seq {rec.seq} gen {rec.gen} (seq {exp.seq} completed before the cut)"))
            else:
                res.match += 1
        return res


def _window(disks: list[_Disk], prefixes: dict[str, int]) -> tuple[float, float, list[Violation]]:
    lo = max((d.start_line(prefixes[d.disk]) for d in disks), default=-1)
    hi = min((d.end_line(prefixes[d.disk]) for d in disks), default=INF)
    if lo < hi:
        return lo, hi, []
    a = max(disks, key=lambda d: d.start_line(prefixes[d.disk]))
    b = min(disks, key=lambda d: d.end_line(prefixes[d.disk]))
    wa, wb = a.writes[prefixes[a.disk] - 1], b.writes[prefixes[b.disk]]
    return lo, hi, [Violation(
        "inconsistent", None, None,
        "one cut instant on every disk (the guest's global order)",
        f"{a.disk} holds seq {wa.seq} (issued at log line {wa.issued}) but {b.disk} lacks seq {wb.seq}, "
        f"which had completed at log line {int(b.end_line(prefixes[b.disk]))}, before it was issued")]


def _sectors(log: SerialLog, source: bytes | DiskImage | str | os.PathLike) -> tuple[list[Sector], str]:
    start, count = log.region_start, log.region_count
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
        if len(data) == count * SECTOR_SIZE:  # the region alone
            data = bytes(start * SECTOR_SIZE) + data
        return scan_region(data, start, count), name
    img = source if isinstance(source, DiskImage) else DiskImage(os.fspath(source))
    region = img.read(start, count)
    return [Sector(s.lba + start, s.record, s.zero, s.error) for s in scan_region(region, 0, count)], str(img)


def check(log: SerialLog, images: Mapping[str, bytes | DiskImage | str | os.PathLike],
          cut: Mapping[str, int] | None = None) -> OracleResult:
    """Prove (or refute) that ``images`` hold one consistent cut of the guest's writes.

    :param log: the parsed serial log (it must cover the cut: take it after the snapshot).
    :param images: per disk (``ide``/``vd``): a whole raw image's bytes, the data area's bytes,
        a path, or a :class:`DiskImage`.
    :param cut: per disk, completed guest writes at the cut (``x-emu-query-cuts``'s
        ``wr_operations``); None infers the tightest cut from the log and the images.
    :raises OracleError: a disk name that is not ``ide``/``vd``, a cut for a disk without an
        image, or an unreadable image.
    """
    disks: list[_Disk] = []
    for name, source in images.items():
        if name not in DISK_IDS:
            raise OracleError(f"unknown disk '{name}' (the diskwriter's disks are ide and vd)")
        try:
            sectors, label = _sectors(log, source)
        except EmuError as err:
            raise OracleError(f"{name}: {err}") from err
        disks.append(_Disk(log, name, sectors, label))
    if cut is not None:
        extra = set(cut) - set(images)
        if extra:
            raise OracleError(f"the cut names disk(s) without an image: {', '.join(sorted(extra))}")
    violations: list[Violation] = []
    prefixes: dict[str, int] = {}
    ranges: dict[str, tuple[int, int]] = {}
    if cut is not None:
        for d in disks:
            n = cut.get(d.disk)
            if n is None:
                raise OracleError(f"no cut given for disk {d.disk}")
            k = d.prefix_for(n)
            if k is None:
                violations.append(Violation("cut", d.disk, None, f"{n} completed writes (the cut)",
                                            f"only {d.count(len(d.writes))} in the log (take the log after the snapshot)"))
                k = len(d.writes)
            prefixes[d.disk] = k
            ranges[d.disk] = (n, n)
        lo, hi, bad = _window(disks, prefixes)
        violations += bad
    else:
        bounds = {d.disk: d.bounds() for d in disks}
        for d in disks:
            blo, bhi, _, why_lo, why_hi = bounds[d.disk]
            if blo > bhi:
                violations.append(Violation(
                    "missing", d.disk, None, f"one prefix of the {d.disk} log ({why_lo})",
                    f"{why_hi}: no cut of the log explains this image"))
        lo = max((d.start_line(bounds[d.disk][0]) for d in disks), default=-1)
        hi = min((d.end_line(bounds[d.disk][1]) for d in disks if bounds[d.disk][0] <= bounds[d.disk][1]),
                 default=INF)
        if lo >= hi and not violations:
            prefixes = {d.disk: bounds[d.disk][0] for d in disks}
            _, _, bad = _window(disks, prefixes)
            violations += bad
        for d in disks:
            blo, bhi = bounds[d.disk][0], bounds[d.disk][1]
            # the tightest cut: writes that had completed before the window opens are in it
            k = blo
            while k < min(bhi, len(d.writes)) and d.end_line(k) <= lo:
                k += 1
            prefixes[d.disk] = k
            ranges[d.disk] = (d.count(blo), d.count(max(blo, bhi)))
    results: dict[str, DiskResult] = {}
    for d in disks:
        r = d.verify(prefixes[d.disk])
        r.cut_range = ranges[d.disk]
        results[d.disk] = r
        # a cut-less run's range failure is already one violation; the per-LBA ones explain it
        violations += r.violations
    return OracleResult(cut is None, results, (lo, hi), violations)

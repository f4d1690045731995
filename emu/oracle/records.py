"""Reference decoder for the diskwriter guest: its on-disk records and its serial log.

The format is specified in ``guest-images/diskwriter/FORMAT.md`` (sections "Record" and "Serial
protocol"); this module is its executable form, and the consistency oracle builds on it:

- :func:`decode_record` / :func:`encode_record` - one 512-byte sector <-> :class:`Record`;
- :func:`scan_region` - every sector of the data area of a raw image (bytes or a file);
- :func:`parse_log` - the COM1 output -> :class:`SerialLog` (writes, flushes, verify results);
- :meth:`SerialLog.expected` - what each LBA must hold after a prefix of the log.

Malformed input raises :class:`RecordError` or :class:`LogError` (both :class:`~emu.errors.EmuError`)
with a message that says what and where, never another exception.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from emu.errors import EmuError

SECTOR_SIZE = 512
#: Record magic (bytes 0-7).
RECORD_MAGIC = b"EMUDWR01"
#: magic, run, disk, seq, lba, gen, xfer, region_start, region_count, time (FORMAT.md "Record").
RECORD_HEADER = struct.Struct("<8s9I")
PAYLOAD_OFFSET = RECORD_HEADER.size  # 44
PAYLOAD_WORDS = 116
CRC_OFFSET = 508
PAYLOAD_STEP = 0x01000193
#: Seed multipliers of run, seq, lba, gen (the disk id is added as is).
SEED_RUN, SEED_SEQ, SEED_LBA, SEED_GEN = 0x27D4EB2F, 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35
MASK32 = 0xFFFFFFFF

#: Disk ids in records and their names on serial.
DISK_NAMES = {0: "ide", 1: "vd"}
DISK_IDS = {name: ident for ident, name in DISK_NAMES.items()}
#: Transfer methods in records and their names on serial.
XFER_NAMES = {0: "pio", 1: "dma", 2: "vq"}
XFER_IDS = {name: ident for ident, name in XFER_NAMES.items()}
#: Parameter block in the image (FORMAT.md "Parameters").
PARAMS_OFFSET = 0x180
PARAMS = struct.Struct("<8s6I")
PARAMS_MAGIC = b"DWPARAMS"
#: Sectors of the bootable image; the data area starts at or after this.
IMAGE_SECTORS = 128


class RecordError(EmuError):
    """A sector is not a valid diskwriter record (the message says why)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        #: One of ``size``, ``magic``, ``crc``, ``payload``, ``disk``, ``xfer``.
        self.reason = reason


class LogError(EmuError):
    """A serial log line does not follow the protocol, or contradicts an earlier line."""

    def __init__(self, lineno: int, line: str, why: str) -> None:
        super().__init__(f"serial log line {lineno}: {why}: {line!r}")
        self.lineno = lineno
        self.line = line


@dataclass(frozen=True)
class Record:
    """One decoded record (every field as FORMAT.md names it)."""

    run: int
    disk: int
    seq: int
    lba: int
    gen: int
    xfer: int
    region_start: int
    region_count: int
    time: int

    @property
    def disk_name(self) -> str:
        """``ide`` or ``vd``."""
        return DISK_NAMES[self.disk]


def _seed(run: int, disk: int, seq: int, lba: int, gen: int) -> int:
    return (run * SEED_RUN + seq * SEED_SEQ + lba * SEED_LBA + gen * SEED_GEN + disk) & MASK32


def _payload(seed: int) -> bytes:
    return struct.pack(f"<{PAYLOAD_WORDS}I",
                       *((seed ^ (k * PAYLOAD_STEP)) & MASK32 for k in range(PAYLOAD_WORDS)))


def encode_record(record: Record) -> bytes:
    """The 512 bytes the guest writes for ``record`` (the reference encoder).

    :param record: the fields; each must fit in 32 bits.
    :raises RecordError: a field is out of range.
    """
    values = (record.run, record.disk, record.seq, record.lba, record.gen, record.xfer,
              record.region_start, record.region_count, record.time)
    if any(not 0 <= v <= MASK32 for v in values):
        raise RecordError("range", f"a field of {record} does not fit in 32 bits")
    head = RECORD_HEADER.pack(RECORD_MAGIC, *values)
    body = head + _payload(_seed(record.run, record.disk, record.seq, record.lba, record.gen))
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(sector: bytes) -> Record:
    """Decode and check one sector.

    :param sector: exactly 512 bytes.
    :raises RecordError: wrong size, magic, CRC, payload pattern, or unknown disk/xfer id.
    """
    if len(sector) != SECTOR_SIZE:
        raise RecordError("size", f"a record is {SECTOR_SIZE} bytes, got {len(sector)}")
    magic, *values = RECORD_HEADER.unpack_from(sector)
    if magic != RECORD_MAGIC:
        raise RecordError("magic", f"magic is {magic!r}, not {RECORD_MAGIC!r}")
    (crc,) = struct.unpack_from("<I", sector, CRC_OFFSET)
    if zlib.crc32(sector[:CRC_OFFSET]) != crc:
        raise RecordError("crc", f"CRC32 {zlib.crc32(sector[:CRC_OFFSET]):08x} != stored {crc:08x}")
    record = Record(*values)
    if sector[PAYLOAD_OFFSET:CRC_OFFSET] != _payload(
            _seed(record.run, record.disk, record.seq, record.lba, record.gen)):
        raise RecordError("payload", f"payload pattern of seq {record.seq} lba {record.lba} does not match")
    if record.disk not in DISK_NAMES:
        raise RecordError("disk", f"unknown disk id {record.disk}")
    if record.xfer not in XFER_NAMES:
        raise RecordError("xfer", f"unknown transfer method {record.xfer}")
    return record


@dataclass(frozen=True)
class Sector:
    """One sector of a scanned region: a record, all zeros, or damage (``error`` says why)."""

    lba: int
    record: Record | None
    zero: bool
    error: RecordError | None

    @property
    def ok(self) -> bool:
        """A valid record that claims this LBA."""
        return self.record is not None and self.record.lba == self.lba


def scan_region(image: bytes | str | os.PathLike | BinaryIO, start: int, count: int) -> list[Sector]:
    """Read sectors ``start .. start+count-1`` of a **raw** image and decode each.

    (qcow2 snapshots are turned into raw first, e.g. with ``qemu-img convert``; sectors past the
    end of the image read as zero, as a short raw file does.)

    :param image: the image's bytes, its path, or a binary file object positioned anywhere.
    :param start: first LBA.
    :param count: number of sectors.
    :raises RecordError: negative ``start``/``count`` (``reason`` ``range``).
    """
    if start < 0 or count < 0:
        raise RecordError("range", f"region start {start} count {count}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image[start * SECTOR_SIZE:(start + count) * SECTOR_SIZE])
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            f.seek(start * SECTOR_SIZE)
            data = f.read(count * SECTOR_SIZE)
    else:
        image.seek(start * SECTOR_SIZE)
        data = image.read(count * SECTOR_SIZE)
    data = data.ljust(count * SECTOR_SIZE, b"\0")
    sectors = []
    for i in range(count):
        raw = data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]
        if raw.count(0) == SECTOR_SIZE:
            sectors.append(Sector(start + i, None, True, None))
            continue
        try:
            sectors.append(Sector(start + i, decode_record(raw), False, None))
        except RecordError as err:
            sectors.append(Sector(start + i, None, False, err))
    return sectors


@dataclass(frozen=True)
class Params:
    """The image's parameter block (FORMAT.md "Parameters")."""

    region_start: int = 2048
    region_count: int = 256
    rate: int = 100
    flush_every: int = 16
    ide_mode: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        """The 32 bytes to place at :data:`PARAMS_OFFSET` of the image."""
        return PARAMS.pack(PARAMS_MAGIC, self.region_start, self.region_count, self.rate,
                           self.flush_every, self.ide_mode, self.flags)

    @classmethod
    def unpack(cls, image: bytes) -> "Params":
        """Read the block from the start of an image.

        :raises RecordError: no parameter block (``reason`` ``magic``).
        """
        if len(image) < PARAMS_OFFSET + PARAMS.size:
            raise RecordError("size", "image too short for the parameter block")
        magic, *values = PARAMS.unpack_from(image, PARAMS_OFFSET)
        if magic != PARAMS_MAGIC:
            raise RecordError("magic", f"parameter block magic is {magic!r}")
        return cls(*values)


# ---------------------------------------------------------------- serial log


@dataclass
class Write:
    """One write as the log tells it; line numbers index :attr:`SerialLog.lines`."""

    disk: str
    seq: int
    lba: int
    gen: int
    xfer: str
    issued: int                  #: log line of its ``W``
    completed: int | None = None  #: log line of its ``C`` (None: not completed in this log)
    failed: int | None = None     #: log line of its ``E``
    status: int | None = None     #: the ``E`` status


@dataclass
class Flush:
    """One flush: every write of ``disk`` completed before :attr:`issued` is durable after :attr:`completed`."""

    disk: str
    upto: int
    issued: int
    completed: int | None = None
    failed: int | None = None


@dataclass
class SerialLog:
    """The guest's log, from its ``S hello`` line on.

    :attr:`lines` holds those lines (index = the line numbers in :class:`Write`/:class:`Flush`;
    ``lines[0]`` is the hello line).
    """

    lines: list[str]
    run: int
    version: int
    region_start: int
    region_count: int
    hello: dict[str, int]
    writes: dict[int, Write] = field(default_factory=dict)       #: by seq
    flushes: list[Flush] = field(default_factory=list)
    disks: dict[str, dict[str, str]] = field(default_factory=dict)  #: ``S disk`` fields by disk
    verify: list[dict[str, dict[str, int] | bool]] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  #: last ``S stats`` per disk ('' = global)
    #: ``B`` bench results in log order: disk, method, dir, pattern and the integer fields
    bench: list[dict[str, str | int]] = field(default_factory=list)
    quit: bool = False
    fatal: str | None = None

    def completed_writes(self, disk: str | None = None, before: int | None = None) -> list[Write]:
        """Writes whose ``C`` line is before log line ``before`` (all when None), in seq order.

        :param disk: only this disk (``ide``/``vd``).
        :param before: a line index of :attr:`lines` (a cut).
        """
        return [w for w in self.writes.values()
                if w.completed is not None and (before is None or w.completed < before)
                and (disk is None or w.disk == disk)]

    def issued_writes(self, disk: str | None = None, before: int | None = None) -> list[Write]:
        """Writes whose ``W`` line is before log line ``before`` (all when None), in seq order."""
        return [w for w in self.writes.values()
                if (before is None or w.issued < before) and (disk is None or w.disk == disk)]

    def expected(self, disk: str, before: int | None = None) -> dict[int, Write]:
        """``{lba: newest write completed there}`` for the log prefix before line ``before``.

        LBAs that no completed write touched are absent. A write that failed (``E``) before that
        point makes its LBA undefined: it maps to that :class:`Write` with ``failed`` set when it is
        newer than the last completion there.
        """
        newest: dict[int, Write] = {}
        for w in self.writes.values():
            if w.disk != disk:
                continue
            done = w.completed if w.completed is not None else w.failed
            if done is None or (before is not None and done >= before):
                continue
            if w.lba not in newest or w.seq > newest[w.lba].seq:
                newest[w.lba] = w
        return newest

    def xfer_counts(self, completed_only: bool = True) -> dict[tuple[str, str], int]:
        """``{(disk, xfer): count}`` of (completed) writes."""
        counts: dict[tuple[str, str], int] = {}
        for w in self.writes.values():
            if completed_only and w.completed is None:
                continue
            counts[(w.disk, w.xfer)] = counts.get((w.disk, w.xfer), 0) + 1
        return counts


_NUM = r"(0|[1-9][0-9]*)"
_DISK = r"(ide|vd)"
_HEX8 = r"([0-9a-f]{8})"
_LINE_W = re.compile(rf"W {_DISK} {_NUM} {_NUM} {_NUM} (pio|dma|vq)")
_LINE_C = re.compile(rf"C {_DISK} {_NUM}")
_LINE_E = re.compile(rf"E {_DISK} {_NUM} {_HEX8}")
_LINE_F = re.compile(rf"(F|FC) {_DISK} {_NUM}")
_LINE_FE = re.compile(rf"FE {_DISK} {_NUM} {_HEX8}")
_KV = re.compile(r"([a-z_]+)=(\S+)")
# bench result (FORMAT.md "Bench"); "b" alone is a trace tick after each bench completion
_LINE_B = re.compile(rf"B {_DISK} (pio|dma|vq) (read|write) (seq|rand)((?: \S+)*)")
_LINE_S = re.compile(r"S ([a-z-]+)((?: \S+)*)")
_LINE_V = re.compile(rf"V ({_DISK[1:-1]}|end|bad)((?: \S+)*)")
_S_WORDS = {"hello", "disk", "nodisk", "polling", "irq-missing", "running", "paused", "rate", "mode",
            "verify", "stats", "error", "quit", "fatal", "fault"}


def _fields(text: str, lineno: int, line: str) -> dict[str, str]:
    out = {}
    for token in text.split():
        m = _KV.fullmatch(token)
        if not m:
            raise LogError(lineno, line, f"{token!r} is not key=value")
        out[m.group(1)] = m.group(2)
    return out


def _int_fields(fields: dict[str, str], lineno: int, line: str) -> dict[str, int]:
    try:
        return {k: int(v, 0) for k, v in fields.items()}
    except ValueError:
        raise LogError(lineno, line, "a field is not a number") from None


def parse_log(text: str, strict: bool = True) -> SerialLog:
    """Parse the guest's COM1 output.

    Everything before the first ``S hello`` line (BIOS, MBR) is skipped, and so is a last line
    without its line end (a run killed mid-line).

    :param text: the serial output (CR LF or LF line ends).
    :param strict: reject lines that are not in the protocol; when False they are skipped.
    :raises LogError: no hello line, a malformed line, or one that contradicts the log
        (completion of a write never issued, a sequence number reused or going backwards, ...).
    """
    raw = text.replace("\r\n", "\n").split("\n")
    partial = raw.pop()  # "" when the text ends with a line end
    del partial
    start = next((i for i, line in enumerate(raw) if line.startswith("S hello ")), None)
    if start is None:
        raise LogError(0, "", "no 'S hello' line: the guest did not start")
    lines = [line.rstrip("\r") for line in raw[start:]]
    hello_line = lines[0]
    m = re.fullmatch(r"S hello diskwriter((?: \S+)*)", hello_line)
    if not m:
        raise LogError(0, hello_line, "malformed hello line")
    hello_raw = _fields(m.group(1), 0, hello_line)
    try:
        run = int(hello_raw.pop("run"), 16)
        hello = _int_fields(hello_raw, 0, hello_line)
        log = SerialLog(lines=lines, run=run, version=hello["version"], region_start=hello["region"],
                        region_count=hello["count"], hello=hello)
    except (KeyError, ValueError):
        raise LogError(0, hello_line, "hello line lacks run/version/region/count") from None
    pending: dict[str, Write | Flush] = {}
    last_seq = 0
    for n, line in enumerate(lines[1:], start=1):
        if m := _LINE_W.fullmatch(line):
            disk, seq, lba, gen, xfer = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
            if seq <= last_seq:
                raise LogError(n, line, f"sequence number {seq} does not increase (last {last_seq})")
            if disk in pending:
                raise LogError(n, line, f"{disk} already has a request in flight")
            if not log.region_start <= lba < log.region_start + log.region_count:
                raise LogError(n, line, "LBA outside the region")
            last_seq = seq
            log.writes[seq] = pending[disk] = Write(disk, seq, lba, gen, xfer, issued=n)
        elif (m := _LINE_C.fullmatch(line)) or (m := _LINE_E.fullmatch(line)):
            disk, seq = m.group(1), int(m.group(2))
            w = pending.get(disk)
            if not isinstance(w, Write) or w.seq != seq:
                raise LogError(n, line, f"completes {disk} write {seq}, which is not in flight")
            del pending[disk]
            if line[0] == "C":
                w.completed = n
            else:
                w.failed, w.status = n, int(m.group(3), 16)
        elif m := _LINE_FE.fullmatch(line):
            _end_flush(log, pending, m.group(1), int(m.group(2)), n, line, ok=False)
        elif m := _LINE_F.fullmatch(line):
            disk, upto = m.group(2), int(m.group(3))
            if m.group(1) == "F":
                if disk in pending:
                    raise LogError(n, line, f"{disk} already has a request in flight")
                f = Flush(disk, upto, issued=n)
                log.flushes.append(f)
                pending[disk] = f
            else:
                _end_flush(log, pending, disk, upto, n, line, ok=True)
        elif m := _LINE_S.fullmatch(line):
            _status_line(log, m.group(1), m.group(2).split(), n, line, strict)
        elif m := _LINE_V.fullmatch(line):
            _verify_line(log, m.group(1), m.group(2).split(), n, line)
        elif m := _LINE_B.fullmatch(line):
            fields: dict[str, str | int] = {"disk": m.group(1), "method": m.group(2),
                                            "dir": m.group(3), "pattern": m.group(4)}
            fields.update(_int_fields(_fields(m.group(5), n, line), n, line))
            log.bench.append(fields)
        elif line == "b":
            pass  # bench trace: timed by the host, carries no data
        elif strict:
            raise LogError(n, line, "not a diskwriter protocol line")
    return log


def _end_flush(log: SerialLog, pending: dict, disk: str, upto: int, n: int, line: str, ok: bool) -> None:
    f = pending.get(disk)
    if not isinstance(f, Flush) or f.upto != upto:
        raise LogError(n, line, f"ends a {disk} flush up to {upto}, which is not in flight")
    del pending[disk]
    if ok:
        f.completed = n
    else:
        f.failed = n


def _status_line(log: SerialLog, word: str, rest: list[str], n: int, line: str, strict: bool) -> None:
    if word not in _S_WORDS:
        if strict:
            raise LogError(n, line, f"unknown status line 'S {word}'")
        return
    if word == "hello":
        raise LogError(n, line, "a second hello: the guest restarted (parse each boot's log on its own)")
    if word == "disk":
        if not rest or rest[0] not in DISK_IDS:
            raise LogError(n, line, "S disk names no disk")
        log.disks[rest[0]] = _fields(" ".join(rest[1:]), n, line)
    elif word == "stats":
        name = rest[0] if rest and "=" not in rest[0] else ""
        log.stats[name] = _int_fields(_fields(" ".join(rest[1:] if name else rest), n, line), n, line)
    elif word == "quit":
        log.quit = True
    elif word in ("fatal", "fault"):
        log.fatal = line


def _verify_line(log: SerialLog, what: str, rest: list[str], n: int, line: str) -> None:
    if what == "bad":
        return  # details; the per-disk line carries the counts
    if what == "end":
        if rest not in (["ok"], ["bad"]):
            raise LogError(n, line, "V end is neither ok nor bad")
        if not log.verify or "ok" in log.verify[-1]:
            log.verify.append({})
        log.verify[-1]["ok"] = rest == ["ok"]
        return
    if not log.verify or "ok" in log.verify[-1]:
        log.verify.append({})
    log.verify[-1][what] = _int_fields(_fields(" ".join(rest), n, line), n, line)


def iter_records(sectors: list[Sector]) -> Iterator[Record]:
    """The valid records among scanned sectors (convenience for the oracle)."""
    return (s.record for s in sectors if s.record is not None)


def read_params(image: str | os.PathLike) -> Params:
    """The parameter block of a diskwriter image file (first sector)."""
    return Params.unpack(Path(image).read_bytes()[:SECTOR_SIZE])

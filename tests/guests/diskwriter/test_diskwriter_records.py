"""emu.oracle.records: the reference decoder of the diskwriter's records and serial log
(FORMAT.md), checked against hand-computed values and hostile input. No emulator needed."""

from __future__ import annotations

import io
import struct
import zlib

import pytest

from diskwriter_runner import IMAGE
from emu.oracle.records import (PARAMS_OFFSET, SECTOR_SIZE, LogError, Params, Record, RecordError,
                                decode_record, encode_record, parse_log, read_params, scan_region)

REC = Record(run=0x2C307CC9, disk=1, seq=7, lba=2050, gen=3, xfer=2, region_start=2048, region_count=64,
             time=1234)


def test_diskwriter_record_layout_by_hand() -> None:
    sector = encode_record(REC)
    assert len(sector) == SECTOR_SIZE
    assert sector[:8] == b"EMUDWR01"
    assert struct.unpack_from("<9I", sector, 8) == (0x2C307CC9, 1, 7, 2050, 3, 2, 2048, 64, 1234)
    seed = (0x2C307CC9 * 0x27D4EB2F + 7 * 0x9E3779B1 + 2050 * 0x85EBCA6B + 3 * 0xC2B2AE35 + 1) & 0xFFFFFFFF
    words = struct.unpack_from("<116I", sector, 44)
    assert words[0] == seed and words[1] == seed ^ 0x01000193 and words[115] == seed ^ ((115 * 0x01000193) & 0xFFFFFFFF)
    assert struct.unpack_from("<I", sector, 508)[0] == zlib.crc32(sector[:508])
    assert decode_record(sector) == REC
    assert decode_record(sector).disk_name == "vd"


@pytest.mark.parametrize("offset,reason", [(0, "magic"), (20, "crc"), (300, "crc"), (509, "crc")])
def test_diskwriter_record_damage_is_named(offset: int, reason: str) -> None:
    sector = bytearray(encode_record(REC))
    sector[offset] ^= 0x40
    with pytest.raises(RecordError) as err:
        decode_record(bytes(sector))
    assert err.value.reason == reason


def test_diskwriter_record_payload_and_ids_checked() -> None:
    sector = bytearray(encode_record(REC))
    sector[100] ^= 1                                     # payload changed, CRC recomputed
    sector[508:] = struct.pack("<I", zlib.crc32(bytes(sector[:508])))
    with pytest.raises(RecordError, match="payload") as err:
        decode_record(bytes(sector))
    assert err.value.reason == "payload"
    with pytest.raises(RecordError) as err:
        decode_record(encode_record(Record(1, 5, 1, 2048, 1, 0, 2048, 8, 0)))
    assert err.value.reason == "disk"
    with pytest.raises(RecordError) as err:
        decode_record(b"\0" * 100)
    assert err.value.reason == "size"
    with pytest.raises(RecordError):
        encode_record(Record(1 << 32, 0, 1, 1, 1, 0, 0, 1, 0))


def test_diskwriter_scan_region_sources() -> None:
    a = encode_record(REC)
    b = encode_record(Record(REC.run, 1, 9, 2052, 3, 2, 2048, 64, 1300))
    image = b"\0" * (2050 * SECTOR_SIZE) + a + b"\x55" * SECTOR_SIZE + b
    for source in (image, io.BytesIO(image)):
        sectors = scan_region(source, 2049, 5)
        assert [s.lba for s in sectors] == [2049, 2050, 2051, 2052, 2053]
        assert sectors[0].zero and sectors[0].record is None
        assert sectors[1].ok and sectors[1].record == REC
        assert sectors[2].error is not None and sectors[2].error.reason == "magic"
        assert sectors[3].ok and sectors[3].record.seq == 9
        assert sectors[4].zero                           # past the end reads as zero
    misplaced = scan_region(b"\0" * SECTOR_SIZE + a, 1, 1)[0]
    assert misplaced.record == REC and not misplaced.ok  # a valid record on the wrong LBA
    with pytest.raises(RecordError):
        scan_region(image, -1, 2)


def test_diskwriter_committed_image_parameters() -> None:
    params = read_params(IMAGE)
    assert params == Params(2048, 256, 100, 16, 0, 0)
    blob = bytearray(IMAGE.read_bytes()[:SECTOR_SIZE])
    blob[PARAMS_OFFSET:PARAMS_OFFSET + 32] = Params(4096, 8, 0, 1, 2, 3).pack()
    assert Params.unpack(bytes(blob)) == Params(4096, 8, 0, 1, 2, 3)
    assert blob[510:512] == b"\x55\xaa"
    blob[PARAMS_OFFSET] = 0
    with pytest.raises(RecordError, match="parameter block"):
        Params.unpack(bytes(blob))


LOG = """\
\x1b[2Jsome BIOS output\r\r
diskwriter mbr: loading payload\r
S hello diskwriter version=1 run=2c307cc9 region=2048 count=4 rate=100 flush_every=2 ide_mode=0 flags=0\r
S disk ide pci=00:01.1 bm=0xc080 irq=14 sectors=32768 dma=1\r
S disk vd pci=00:02.0 io=0xc000 irq=10 sectors=32768 flush=1 queue=256\r
S running\r
W ide 1 2048 1 pio\r
W vd 2 2048 1 vq\r
C ide 1\r
W ide 3 2049 1 dma\r
C vd 2\r
C ide 3\r
F ide 3\r
W vd 4 2049 1 vq\r
E vd 4 00000001\r
FC ide 3\r
W ide 5 2048 2 pio\r
S stats seq=5 ticks=300 extra=1\r
S stats ide issued=3 completed=2 errors=0 flushes=1 irqs=4 pio=2 dma=1 vq=0 polling=0\r
V bad vd 2049 want=4294967295 got=4 why=seq\r
V ide checked=4 match=2 empty=2 other=0 unknown=0 mismatch=0 read_errors=0\r
V vd checked=4 match=1 empty=2 other=0 unknown=1 mismatch=0 read_errors=0\r
V end ok\r
C ide 5\r
S quit seq=5\r
S f"""


def test_diskwriter_parse_log() -> None:
    log = parse_log(LOG)
    assert log.run == 0x2C307CC9 and (log.region_start, log.region_count) == (2048, 4)
    assert log.lines[0].startswith("S hello") and log.lines[-1] == "S quit seq=5"   # partial line dropped
    assert sorted(log.writes) == [1, 2, 3, 4, 5]
    w4 = log.writes[4]
    assert (w4.disk, w4.lba, w4.gen, w4.xfer, w4.completed, w4.status) == ("vd", 2049, 1, "vq", None, 1)
    assert log.writes[3].xfer == "dma" and log.writes[3].completed == log.lines.index("C ide 3")
    assert [(f.disk, f.upto, f.completed is not None) for f in log.flushes] == [("ide", 3, True)]
    assert log.disks["vd"]["irq"] == "10" and log.disks["ide"]["bm"] == "0xc080"
    assert log.stats[""] == {"seq": 5, "ticks": 300, "extra": 1}
    assert log.stats["ide"]["dma"] == 1
    assert log.verify == [{"ide": {"checked": 4, "match": 2, "empty": 2, "other": 0, "unknown": 0,
                                   "mismatch": 0, "read_errors": 0},
                           "vd": {"checked": 4, "match": 1, "empty": 2, "other": 0, "unknown": 1,
                                  "mismatch": 0, "read_errors": 0},
                           "ok": True}]
    assert log.quit and log.fatal is None
    # The newest write per LBA, at the end and at a cut before "C ide 5".
    assert {lba: w.seq for lba, w in log.expected("ide").items()} == {2048: 5, 2049: 3}
    cut = log.lines.index("C ide 5")
    assert {lba: w.seq for lba, w in log.expected("ide", before=cut).items()} == {2048: 1, 2049: 3}
    assert {lba: (w.seq, w.failed is not None) for lba, w in log.expected("vd").items()} == {
        2048: (2, False), 2049: (4, True)}
    assert [w.seq for w in log.completed_writes("ide", before=cut)] == [1, 3]
    assert [w.seq for w in log.issued_writes(before=cut)] == [1, 2, 3, 4, 5]
    assert log.xfer_counts() == {("ide", "pio"): 2, ("vd", "vq"): 1, ("ide", "dma"): 1}


@pytest.mark.parametrize("bad,why", [
    ("C ide 9", "not in flight"),
    ("W ide 1 2048 1 pio", "does not increase"),
    ("W ide 9 9999 1 pio", "outside the region"),
    ("W vd 9 2048 1 pio\nW vd 10 2049 1 vq", "already has a request in flight"),
    ("FC vd 2", "not in flight"),
    ("W ide 9 2048 1 nvme", "not a diskwriter protocol line"),
    ("S banana", "unknown status line"),
    ("V end maybe", "neither ok nor bad"),
    ("S stats ide issued=x", "not a number"),
    ("S disk ide pci", "not key=value"),
    ("hello from nowhere", "not a diskwriter protocol line"),
    ("S hello diskwriter version=1 run=00000002 region=2048 count=4", "restarted"),
])
def test_diskwriter_parse_log_rejects(bad: str, why: str) -> None:
    head = "S hello diskwriter version=1 run=00000001 region=2048 count=4\nW ide 1 2048 1 pio\nC ide 1\n"
    with pytest.raises(LogError, match=why) as err:
        parse_log(head + bad + "\n")
    assert err.value.lineno >= 3
    if why != "not a diskwriter protocol line":
        return
    # Lenient mode skips unknown lines instead.
    assert len(parse_log(head + bad + "\n", strict=False).writes) == 1


@pytest.mark.parametrize("text", ["", "BIOS only\n", "S hello diskwriter version=1\n",
                                  "S hello diskwriter run=zz version=1 region=1 count=1\n",
                                  "S hello nonsense\n", "\x00\xff" * 100])
def test_diskwriter_parse_log_no_start(text: str) -> None:
    with pytest.raises(LogError):
        parse_log(text)

"""The oracle on constructed images: a correct cut passes; each kind of damage fails with its message."""

from __future__ import annotations

import pytest

from emu.oracle.check import DiskImage, OracleError, check
from emu.oracle.records import SECTOR_SIZE, parse_log

from oracle_sim import COUNT, START, Sim


def _cut(sim: Sim, upto: int) -> dict[str, int]:
    return {d: sim.count(d, upto) for d in ("ide", "vd")}


def _kinds(res) -> list[str]:
    return [v.kind for v in res.violations]


@pytest.mark.parametrize("upto", [0, 1, 2, 7, 13, 24])
def test_oracle_correct_cut_passes_with_and_without_report(upto: int) -> None:
    sim = Sim()
    log = parse_log(sim.text())
    images = {d: bytes(sim.image(d, upto)) for d in ("ide", "vd")}
    res = check(log, images, _cut(sim, upto))
    assert res.ok, res.report()
    assert res.disks["ide"].cut == sim.count("ide", upto)
    assert sum(r.match for r in res.disks.values()) == sum(
        min(sim.count(d, upto), COUNT) for d in ("ide", "vd"))
    inferred = check(log, images)
    assert inferred.ok, inferred.report()
    assert inferred.inferred
    for d in ("ide", "vd"):
        lo, hi = inferred.disks[d].cut_range
        assert lo <= sim.count(d, upto) <= hi
    assert "OK: 0 violations" in res.report()


def test_oracle_missing_completed_write() -> None:
    sim = Sim()
    img = sim.image("vd", 10)
    # vd's newest write (seq 10, lba 2052 gen 1) never reached the image
    img[2052 * SECTOR_SIZE:2053 * SECTOR_SIZE] = bytes(SECTOR_SIZE)
    log = parse_log(sim.text())
    res = check(log, {"ide": bytes(sim.image("ide", 10)), "vd": bytes(img)}, _cut(sim, 10))
    assert _kinds(res) == ["missing"]
    v = res.violations[0]
    assert (v.disk, v.lba) == ("vd", 2052)
    assert str(v) == ("VIOLATION missing: vd lba 2052: expected seq 10 gen 1; found zeros")
    # the same vd image beside ide cut after seq 9 is a consistent earlier cut (seq 9 was
    # issued before seq 10): inferred without a report, it passes
    assert check(log, {"ide": bytes(sim.image("ide", 9)), "vd": bytes(img)}).ok


def test_oracle_older_record_is_missing_write() -> None:
    sim = Sim()
    upto = 20                      # vd lba 2048 was overwritten by gen 2 (seq 18)
    img = sim.image("vd", upto)
    img[2048 * SECTOR_SIZE:2049 * SECTOR_SIZE] = sim.record("vd", 2, 2048, 1)
    res = check(parse_log(sim.text()), {"ide": bytes(sim.image("ide", upto)), "vd": bytes(img)},
                _cut(sim, upto))
    assert _kinds(res) == ["missing"]
    assert res.violations[0].expected == "seq 18 gen 2"
    assert "older seq 2 gen 1" in res.violations[0].found


def test_oracle_write_after_cut() -> None:
    sim = Sim()
    img = sim.image("ide", 11)
    img[2054 * SECTOR_SIZE:2055 * SECTOR_SIZE] = sim.record("ide", 13, 2054, 1)
    res = check(parse_log(sim.text()), {"ide": bytes(img), "vd": bytes(sim.image("vd", 11))},
                _cut(sim, 11))
    assert _kinds(res) == ["after-cut"]
    v = res.violations[0]
    assert (v.disk, v.lba) == ("ide", 2054)
    assert v.expected.startswith("zeros")
    assert v.found.startswith("seq 13 gen 1, issued after the cut")


def test_oracle_torn_record() -> None:
    sim = Sim()
    img = sim.image("ide", 24)
    img[2050 * SECTOR_SIZE + 100] ^= 0xFF          # half-written sector
    res = check(parse_log(sim.text()), {"ide": bytes(img), "vd": bytes(sim.image("vd", 24))},
                _cut(sim, 24))
    assert _kinds(res) == ["torn"]
    assert res.violations[0].lba == 2050 and "crc" in res.violations[0].found
    assert _kinds(check(parse_log(sim.text()), {"ide": bytes(img)})) == ["torn"]


def test_oracle_misplaced_record() -> None:
    sim = Sim()
    img = sim.image("vd", 24)
    # vd lba 2049 holds ide's record for 2049 (a write that landed on the wrong disk)
    img[2049 * SECTOR_SIZE:2050 * SECTOR_SIZE] = sim.record("ide", 19, 2049, 2)
    res = check(parse_log(sim.text()), {"ide": bytes(sim.image("ide", 24)), "vd": bytes(img)},
                _cut(sim, 24))
    assert _kinds(res) == ["misplaced"]
    assert res.violations[0].found.startswith("the record of ide lba 2049 seq 19")
    img = sim.image("vd", 24)
    img[2050 * SECTOR_SIZE:2051 * SECTOR_SIZE] = sim.record("vd", 20, 2049, 2)  # wrong LBA
    res = check(parse_log(sim.text()), {"vd": bytes(img)}, {"vd": 12})
    assert _kinds(res) == ["misplaced"] and res.violations[0].lba == 2050


def test_oracle_disks_cut_at_different_points() -> None:
    sim = Sim()
    log = parse_log(sim.text())
    # ide cut after its write seq 21 (issued after vd's seq 10 had completed), vd after seq 8
    images = {"ide": bytes(sim.image("ide", 21)), "vd": bytes(sim.image("vd", 8))}
    res = check(log, images, {"ide": sim.count("ide", 21), "vd": sim.count("vd", 8)})
    assert _kinds(res) == ["inconsistent"]
    assert "ide holds seq 21" in res.violations[0].found
    assert "vd lacks seq 10" in res.violations[0].found
    inferred = check(log, images)
    assert _kinds(inferred) == ["inconsistent"]
    assert "FAIL: 1 violation(s)" in inferred.report()


def test_oracle_reported_cut_disagrees_with_image() -> None:
    sim = Sim()
    images = {d: bytes(sim.image(d, 12)) for d in ("ide", "vd")}
    res = check(parse_log(sim.text()), images, _cut(sim, 14))   # the report says one more each
    assert sorted(_kinds(res)) == ["missing", "missing"]
    res = check(parse_log(sim.text()), images, {"ide": 99, "vd": 6})
    assert _kinds(res)[0] == "cut" and "only 12 in the log" in res.violations[0].found


def test_oracle_other_run_and_unknown_records() -> None:
    sim = Sim()
    img = sim.image("ide", 24)
    other = Sim(run=0x55)
    img[2048 * SECTOR_SIZE:2049 * SECTOR_SIZE] = other.record("ide", 23, 2048, 3, run=0x55)
    res = check(parse_log(sim.text()), {"ide": bytes(img)}, {"ide": 12})
    assert _kinds(res) == ["missing"] and "another run" in res.violations[0].found
    img = sim.image("ide", 0)
    img[2048 * SECTOR_SIZE:2049 * SECTOR_SIZE] = other.record("ide", 23, 2048, 3, run=0x55)
    assert check(parse_log(sim.text()), {"ide": bytes(img)}, {"ide": 0}).ok  # stale data, no write yet
    img[2048 * SECTOR_SIZE:2049 * SECTOR_SIZE] = sim.record("ide", 99, 2048, 1)
    res = check(parse_log(sim.text()), {"ide": bytes(img)}, {"ide": 0})
    assert _kinds(res) == ["unknown"]


def test_oracle_failed_write_makes_lba_undefined() -> None:
    sim = Sim(writes_per_disk=2)
    text = sim.text().replace("C vd 2\r\n", "E vd 2 00000051\r\n")
    img = sim.image("vd", 4)
    img[2048 * SECTOR_SIZE + 7] ^= 1
    res = check(parse_log(text), {"vd": bytes(img)}, {"vd": 1})
    assert res.ok, res.report()
    assert res.disks["vd"].undefined == 1


def test_oracle_region_only_bytes_and_files(tmp_path) -> None:
    sim = Sim()
    img = sim.image("ide", 24)
    path = tmp_path / "ide.raw"
    path.write_bytes(bytes(img))
    log = parse_log(sim.text())
    assert check(log, {"ide": bytes(img[START * SECTOR_SIZE:])}, {"ide": 12}).ok
    res = check(log, {"ide": DiskImage(str(path))}, {"ide": 12})
    assert res.ok and res.disks["ide"].source == str(path)
    assert check(log, {"ide": str(path)}).ok


def test_oracle_bad_input_is_a_clear_error(tmp_path) -> None:
    sim = Sim()
    log = parse_log(sim.text())
    with pytest.raises(OracleError, match="unknown disk 'sda'"):
        check(log, {"sda": b""})
    with pytest.raises(OracleError, match="without an image: vd"):
        check(log, {"ide": bytes(sim.image("ide", 0))}, {"ide": 0, "vd": 0})
    with pytest.raises(OracleError, match="ide: .*missing"):
        check(log, {"ide": DiskImage(str(tmp_path / "missing.qcow2"))})
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    with pytest.raises(OracleError, match="ide: "):
        check(log, {"ide": DiskImage(str(bad), snapshot="s")})

"""The diskwriter guest on a real machine: it writes records to an IDE and a virtio-blk qcow2 disk,
and every write its serial log says completed is in the image, with a valid checksum.

Each session boots the guest with two qcow2 disks, lets it write, asks it to verify (``v``) and to
quit (``q``, which flushes both disks), then reads the images back with qemu-img and checks them
against the log with :mod:`emu.oracle.records` - the same checks the consistency oracle makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diskwriter_runner import (EMULATORS, MiB, STATUS_QUIT, Emulator, Session, make_disks,
                               prepare, to_raw)
from emu.oracle.records import SECTOR_SIZE, Params, SerialLog, scan_region

REGION_START = 2048
REGION_COUNT = 192          # small, so a few seconds of writing overwrites it (gen 2 and up)
WRITE_SECONDS = 3.0


#: The scenarios beyond the main one run on SeaBIOS/QEMU and emu (our BIOS on QEMU is covered once).
REFERENCE_AND_EMU = [EMULATORS[0], EMULATORS[2]]


@pytest.fixture(params=EMULATORS)
def emulator(request: pytest.FixtureRequest) -> Emulator:
    return request.param


def check_disk(log: SerialLog, disk: str, image: bytes, boot: bytes | None) -> dict[str, int]:
    """Every completed write of ``disk`` is its LBA's content; nothing else in the image changed.

    Returns counts for the caller's own assertions.
    """
    expected = log.expected(disk)
    sectors = scan_region(image, log.region_start, log.region_count)
    newest_gen = 0
    for sector in sectors:
        want = expected.get(sector.lba)
        if want is None:
            assert sector.zero, f"{disk} LBA {sector.lba}: no completed write, but {sector}"
            continue
        assert want.failed is None, f"{disk} write {want.seq} failed: status {want.status:08x}"
        assert sector.ok, f"{disk} LBA {sector.lba}: want write {want.seq}, sector is {sector}"
        rec = sector.record
        assert (rec.run, rec.seq, rec.gen) == (log.run, want.seq, want.gen), (disk, sector, want)
        assert rec.disk_name == disk and rec.region_start == log.region_start
        assert {"pio": 0, "dma": 1, "vq": 2}[want.xfer] == rec.xfer, (sector, want)
        newest_gen = max(newest_gen, rec.gen)
    # Outside the region: the boot image on the IDE disk, zeros everywhere else.
    lo, hi = log.region_start * SECTOR_SIZE, (log.region_start + log.region_count) * SECTOR_SIZE
    if boot is not None:
        assert image[:len(boot)] == boot, f"{disk}: the boot sectors changed"
        rest = image[len(boot):lo]
    else:
        rest = image[:lo]
    assert rest.count(0) == len(rest), f"{disk}: a write landed below the region"
    assert image[hi:].count(0) == len(image) - hi, f"{disk}: a write landed past the region"
    return {"records": len(expected), "newest_gen": newest_gen}


def test_diskwriter_writes_reach_both_disks(emulator: Emulator, request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    prepare(emulator, request)
    params = Params(region_start=REGION_START, region_count=REGION_COUNT, rate=150, flush_every=16)
    ide, vd, boot = make_disks(tmp_path, params)
    session = Session.start(emulator, ide, vd)
    try:
        session.run_for(WRITE_SECONDS)
        session.command("v")
        verdict = session.expect(r"V end (ok|bad)", 60)
        status = session.quit()
    finally:
        session.close()
    log = session.log()
    assert verdict == "V end ok", session.text[-3000:]
    assert status == STATUS_QUIT, f"exit status {status}"
    assert log.quit and log.fatal is None
    assert set(log.disks) == {"ide", "vd"}
    assert log.disks["ide"]["irq"] == "14"
    vd_irq = int(log.disks["vd"]["irq"])
    assert 0 < vd_irq < 16, "the BIOS routed the virtio INTx line"
    # Interrupt-driven, every request answered.
    for disk in ("ide", "vd"):
        stats = log.stats[disk]
        assert stats["polling"] == 0, f"{disk} fell back to polling"
        assert stats["errors"] == 0
        assert stats["issued"] == stats["completed"] == len(log.completed_writes(disk))
        assert stats["irqs"] >= stats["completed"], stats
        assert stats["flushes"] >= 1
    # All three transfer methods wrote, and the region wrapped (records were overwritten).
    counts = log.xfer_counts()
    for key in (("ide", "pio"), ("ide", "dma"), ("vd", "vq")):
        assert counts.get(key, 0) >= 20, counts
    # The guest's own read-back agrees with its log.
    verify = log.verify[-1]
    assert verify["ok"] is True
    # Every flush completed and covered what was completed before it.
    assert log.flushes and all(f.completed is not None for f in log.flushes)
    for f in log.flushes:
        done = [w.seq for w in log.completed_writes(f.disk, before=f.issued)]
        assert f.upto == (max(done) if done else 0), f
    # The images hold exactly what the log says completed (qemu-img reads them back).
    ide_result = check_disk(log, "ide", to_raw(ide), boot)
    vd_result = check_disk(log, "vd", to_raw(vd), None)
    for result, disk in ((ide_result, "ide"), (vd_result, "vd")):
        assert verify[disk]["match"] == result["records"], (verify, result)
        assert result["records"] == REGION_COUNT and result["newest_gen"] >= 2, (disk, result)


@pytest.mark.parametrize("emulator", REFERENCE_AND_EMU)
def test_diskwriter_commands(emulator: Emulator, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """p/r/rate/mode/s and a bad command."""
    prepare(emulator, request)
    params = Params(region_start=4096, region_count=64, rate=100, flush_every=0, ide_mode=0, flags=1)
    ide, vd, boot = make_disks(tmp_path, params)
    session = Session.start(emulator, ide, vd)
    try:
        assert "S paused" in session.text              # flags bit 0: start paused
        session.run_for(0.5)
        assert "\nW " not in session.text, "a paused guest wrote"
        session.command("mode dma")
        session.expect(r"S mode dma")
        session.command("rate 0")
        session.expect(r"S rate 0")
        session.command("r")
        session.expect(r"S running")
        session.wait_count(r"^C ide \d+", 30)
        session.command("p")
        session.expect(r"S paused")
        session.run_for(0.3)
        paused_at = session.text.rindex("S paused")
        assert "\nW " not in session.text[paused_at:], "a write after S paused"
        session.command("bogus")
        session.expect(r"S error unknown-command")
        session.command("x" * 60)
        session.expect(r"S error line-too-long")
        session.command("rate 2000000")
        session.expect(r"S error rate-too-high")
        session.command("s")
        session.expect(r"S stats vd [^\r\n]*\r*\n")
        session.command("v")
        session.expect(r"V end (ok|bad)", 60)
        status = session.quit()
    finally:
        session.close()
    log = session.log()
    assert status == STATUS_QUIT
    assert log.verify[-1]["ok"] is True, session.text[-2000:]
    ide_writes = [w for w in log.writes.values() if w.disk == "ide"]
    assert ide_writes and {w.xfer for w in ide_writes} == {"dma"}
    # flush_every=0: the only flushes are quit's, one per disk, covering everything.
    assert [(f.disk, f.upto) for f in log.flushes] == [
        (d, max(w.seq for w in log.completed_writes(d))) for d in ("ide", "vd")]
    check_disk(log, "ide", to_raw(ide), boot)
    check_disk(log, "vd", to_raw(vd), None)


@pytest.mark.parametrize("emulator", REFERENCE_AND_EMU)
def test_diskwriter_polling_and_small_disk(emulator: Emulator, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    """flags bit 1 polls both devices (the documented fallback); a virtio disk too small for the
    region is left alone and the IDE disk still gets written."""
    prepare(emulator, request)
    params = Params(region_start=2048, region_count=64, rate=0, flush_every=8, ide_mode=0, flags=2)
    ide, vd, boot = make_disks(tmp_path, params, vd_size=1 * MiB)
    session = Session.start(emulator, ide, vd)
    try:
        session.wait_count(r"^C ide \d+", 40)
        session.command("v")
        session.expect(r"V end (ok|bad)", 60)
        status = session.quit()
    finally:
        session.close()
    log = session.log()
    assert status == STATUS_QUIT
    assert "S nodisk vd reason=small" in log.lines
    assert "S polling ide" in log.lines
    assert log.stats["ide"]["polling"] == 1 and "vd" not in log.stats
    assert log.verify[-1]["ok"] is True and "vd" not in log.verify[-1]
    counts = log.xfer_counts()
    assert counts[("ide", "pio")] >= 20 and counts[("ide", "dma")] >= 20, counts
    check_disk(log, "ide", to_raw(ide), boot)
    assert to_raw(vd).count(0) == 1 * MiB, "the too-small disk was written"


@pytest.mark.parametrize("modern_only", [False, True], ids=["transitional", "disable-legacy"])
@pytest.mark.parametrize("emulator", REFERENCE_AND_EMU)
def test_diskwriter_virtio_modern(emulator: Emulator, modern_only: bool, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    """The modern virtio-pci transport (capabilities in a memory BAR): chosen by flags bit 2 on a
    transitional device, the only one on 1AF4:1042."""
    prepare(emulator, request)
    params = Params(region_start=2048, region_count=48, rate=0, flush_every=8, flags=0 if modern_only else 4)
    ide, vd, boot = make_disks(tmp_path, params)
    session = Session.start(emulator, ide, vd, modern_only=modern_only)
    try:
        session.wait_count(r"^C vd \d+", 60)
        session.command("v")
        session.expect(r"V end (ok|bad)", 60)
        status = session.quit()
    finally:
        session.close()
    log = session.log()
    assert status == STATUS_QUIT
    assert log.disks["vd"]["transport"] == "modern"
    assert log.verify[-1]["ok"] is True and log.verify[-1]["vd"]["match"] == 48
    assert log.stats["vd"]["polling"] == 0 and log.stats["vd"]["irqs"] >= log.stats["vd"]["completed"]
    check_disk(log, "vd", to_raw(vd), None)
    check_disk(log, "ide", to_raw(ide), boot)


@pytest.mark.parametrize("emulator", REFERENCE_AND_EMU)
def test_diskwriter_write_errors_reported(emulator: Emulator, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    """Every virtio write fails (blkdebug injects EIO under the qcow2 layer): the guest reports
    each as ``E``, each flush as ``FE``, keeps writing the IDE disk, and its verify counts the
    failed LBAs as unknown, not as mismatches."""
    prepare(emulator, request)
    params = Params(region_start=2048, region_count=32, rate=0, flush_every=8)
    ide, vd, boot = make_disks(tmp_path, params)
    config = tmp_path / "eio.cfg"
    config.write_text('[inject-error]\nevent = "write_aio"\nerrno = "5"\nonce = "off"\n')
    session = Session.start(emulator, ide, vd, vd_blkdebug=config)
    try:
        session.wait_count(r"^E vd \d+ ", 40)
        session.wait_count(r"^C ide \d+", 40)
        session.command("v")
        session.expect(r"V end (ok|bad)", 60)
        status = session.quit()
    finally:
        session.close()
    log = session.log()
    assert status == STATUS_QUIT
    vd_writes = [w for w in log.writes.values() if w.disk == "vd"]
    assert vd_writes and all(w.failed is not None and w.completed is None for w in vd_writes)
    assert {w.status for w in vd_writes} == {1}                  # VIRTIO_BLK_S_IOERR
    vd_flushes = [f for f in log.flushes if f.disk == "vd"]
    assert vd_flushes and all(f.failed is not None for f in vd_flushes)
    assert log.stats["vd"]["completed"] == 0 and log.stats["vd"]["errors"] == len(vd_writes) + len(vd_flushes)
    verify = log.verify[-1]
    assert verify["ok"] is True and verify["vd"]["unknown"] == 32 and verify["vd"]["match"] == 0
    assert verify["ide"]["match"] == 32
    assert all(w.failed is not None for w in log.expected("vd").values())
    check_disk(log, "ide", to_raw(ide), boot)

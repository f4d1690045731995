"""The diskwriter's ``bench`` command (FORMAT.md "Bench"), on QEMU (SeaBIOS) and on emu.

Multi-sector requests land where FORMAT.md says with the pattern it says (checked in the images by
qemu-img), the writer's region is left alone (``v`` still finds it empty), ``trace`` prints one
``b`` line per completion, and malformed or impossible bench commands are refused with their
``S error bench-*`` line while the guest keeps taking commands.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from diskwriter_runner import EMULATORS, MiB, STATUS_QUIT, Emulator, Session, make_disks, prepare, to_raw
from emu.oracle.records import Params

REGION_START = 2048
REGION_COUNT = 64
AREA = REGION_START + REGION_COUNT      # the bench area's first LBA
B_LINE = (r"B {} {} {} {} sectors={} count={} ok=(\d+) errors=(\d+) ms=(\d+) maxgap_ms=(\d+) "
          r"tsc_k=(\d+) maxgap_tsc_k=(\d+) tsc_back=(\d+)\r*\n")


def pattern(run: int, sectors: int) -> bytes:
    """The bench write buffer: dword k = run XOR k."""
    return struct.pack(f"<{sectors * 128}I", *(run ^ k for k in range(sectors * 128)))


@pytest.mark.parametrize("emulator", [EMULATORS[0], EMULATORS[2]])
def test_diskwriter_bench_commands(emulator: Emulator, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    prepare(emulator, request)
    params = Params(region_start=REGION_START, region_count=REGION_COUNT, rate=0, flush_every=0, flags=1)
    ide, vd, _ = make_disks(tmp_path, params, ide_size=4 * MiB, vd_size=4 * MiB)
    session = Session.start(emulator, ide, vd)
    try:
        run = int(re.search(r"run=([0-9a-f]{8})", session.text).group(1), 16)
        # 16-sector DMA writes then reads, sequential: slots 0..3 of 16 sectors each.
        session.command("bench ide dma write seq 16 4")
        m = re.fullmatch(B_LINE.format("ide", "dma", "write", "seq", 16, 4),
                         session.expect(B_LINE.format("ide", "dma", "write", "seq", 16, 4)))
        assert m.group(1, 2) == ("4", "0")
        session.command("bench ide dma read rand 16 5")
        session.expect(B_LINE.format("ide", "dma", "read", "rand", 16, 5).replace(r"ok=(\d+)", "ok=5"))
        # virtio: two 64-sector writes (one 32 KiB descriptor each), then 1 MiB ones, traced reads.
        session.command("bench vd vq write seq 64 2")
        session.expect(B_LINE.format("vd", "vq", "write", "seq", 64, 2).replace(r"ok=(\d+)", "ok=2"))
        session.command("bench vd vq read seq 2048 2 trace")
        out = session.expect(r"b\r*\nb\r*\n" + B_LINE.format("vd", "vq", "read", "seq", 2048, 2))
        assert "ok=2 errors=0" in out
        session.command("bench ide pio write seq 1 3")
        session.expect(B_LINE.format("ide", "pio", "write", "seq", 1, 3).replace(r"ok=(\d+)", "ok=3"))
        # Refusals, then the guest still answers.
        for line, why in (("bench ide vq write seq 1 1", "method"), ("bench vd dma read seq 1 1", "method"),
                          ("bench ide pio read seq 2 1", "size"), ("bench ide dma read seq 129 1", "size"),
                          ("bench vd vq read seq 2049 1", "size"), ("bench vd vq read seq 1 0", "size"),
                          ("bench vd vq read seq 1", "args"), ("bench vd vq read seq 1 1 x", "args"),
                          ("bench hd vq read seq 1 1", "args"), ("bench vd vq read up 1 1", "args"),
                          ("bench vd vq write seq 4000 1", "size")):
            session.command(line)
            session.expect(rf"S error bench-{why}\r*\n")
        session.command("v")
        session.expect(r"V end ok\r*\n", 60)
        assert f"V vd checked={REGION_COUNT} match=0 empty={REGION_COUNT}" in session.text
        assert session.quit() == STATUS_QUIT
    finally:
        session.close()
    ide_raw, vd_raw = to_raw(ide), to_raw(vd)
    base = AREA * 512
    # IDE: PIO wrote slots 0..2 (one sector each, the buffer's first sector) over DMA's first slot.
    assert ide_raw[base:base + 3 * 512] == pattern(run, 1) * 3
    assert ide_raw[base + 3 * 512:base + 16 * 512] == pattern(run, 16)[3 * 512:]
    assert ide_raw[base + 16 * 512:base + 64 * 512] == pattern(run, 16) * 3
    assert ide_raw[base + 64 * 512:base + 65 * 512] == bytes(512)
    assert vd_raw[base:base + 128 * 512] == pattern(run, 64) * 2
    assert vd_raw[base + 128 * 512:base + 129 * 512] == bytes(512)
    assert ide_raw[REGION_START * 512:AREA * 512] == bytes(REGION_COUNT * 512)
    assert vd_raw[REGION_START * 512:AREA * 512] == bytes(REGION_COUNT * 512)

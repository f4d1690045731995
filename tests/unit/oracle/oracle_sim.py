"""A simulated diskwriter run for the oracle's unit tests: the log text the guest would print
and the images its disks would hold at any cut (built with the reference encoder)."""

from __future__ import annotations

from emu.oracle.records import DISK_IDS, SECTOR_SIZE, XFER_IDS, Record, encode_record

RUN = 0x1234ABCD
START, COUNT = 2048, 8


class Sim:
    """Two disks, one request in flight each; writes alternate ide/vd and wrap the region."""

    def __init__(self, writes_per_disk: int = 12, run: int = RUN) -> None:
        self.run = run
        self.lines = ["SeaBIOS junk", f"S hello diskwriter version=1 run={run:08x} region={START} "
                      f"count={COUNT} rate=0 flush_every=0 ide_mode=0 flags=0"]
        self.writes: list[tuple[str, int, int, int]] = []   # disk, seq, lba, gen in issue order
        #: per write: the log line index (relative to the hello line) after which it completed
        self.completed_at: dict[int, int] = {}
        cursor = {"ide": 0, "vd": 0}
        seq = 0
        for _ in range(writes_per_disk):
            for disk in ("ide", "vd"):
                seq += 1
                c = cursor[disk]
                lba, gen = START + c % COUNT, 1 + c // COUNT
                cursor[disk] += 1
                xfer = "vq" if disk == "vd" else "pio"
                self.lines.append(f"W {disk} {seq} {lba} {gen} {xfer}")
                self.lines.append(f"C {disk} {seq}")
                self.writes.append((disk, seq, lba, gen))
                self.completed_at[seq] = len(self.lines) - 2  # index relative to hello
        self.lines.append("S quit seq=%d" % seq)

    def text(self) -> str:
        return "\r\n".join(self.lines) + "\r\n"

    def record(self, disk: str, seq: int, lba: int, gen: int, run: int | None = None) -> bytes:
        return encode_record(Record(self.run if run is None else run, DISK_IDS[disk], seq, lba, gen,
                                    XFER_IDS["vq" if disk == "vd" else "pio"], START, COUNT, seq))

    def image(self, disk: str, upto_seq: int) -> bytearray:
        """The whole raw image of ``disk`` with every write of seq <= upto_seq applied."""
        img = bytearray((START + COUNT) * SECTOR_SIZE)
        for d, seq, lba, gen in self.writes:
            if d == disk and seq <= upto_seq:
                img[lba * SECTOR_SIZE:(lba + 1) * SECTOR_SIZE] = self.record(d, seq, lba, gen)
        return img

    def count(self, disk: str, upto_seq: int) -> int:
        return sum(1 for d, seq, _, _ in self.writes if d == disk and seq <= upto_seq)

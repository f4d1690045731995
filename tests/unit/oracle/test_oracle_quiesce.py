"""Quiesce proof (issue 5 item 4), in-process: writer threads play the diskwriter guest on two
qcow2 disks through BlockBackend aio (one request in flight per disk, diskwriter records, its
serial log), a real ``Machine.quiesce()`` takes internal snapshots of both disks in one drained
section, the cut comes from the machine's cut report, and the oracle checks every snapshot.
One round holds a guest write in flight at a blkdebug breakpoint while the snapshot starts: the
drain must wait for it, and the snapshot must hold it (it completed before the cut).

(The booted version with the real guest is tests/guests/oracle; it needs virtio-blk wired into
the machine.)
"""

from __future__ import annotations

import subprocess
import threading
import time

from conftest import requires_qemu_img

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2
from emu.machine.config import MachineConfig
from emu.machine.pc import BlockDevice, Machine
from emu.oracle.check import DiskImage, check, disk_for_device
from emu.oracle.records import (DISK_IDS, SECTOR_SIZE, XFER_IDS, Record, encode_record, parse_log)

RUN = 0x0DC0FFEE
START, COUNT = 2048, 64
ROUNDS = 8

class Guest:
    """The diskwriter's writer loop on both disks; the serial log kept as it would print it."""

    def __init__(self, backends: dict[str, BlockBackend]) -> None:
        self.backends = backends
        self.lines = [f"S hello diskwriter version=1 run={RUN:08x} region={START} count={COUNT} "
                      "rate=0 flush_every=0 ide_mode=0 flags=0"]
        self.lock = threading.Lock()
        self.seq = 0
        self.inflight: dict[str, int] = {}   #: disk -> seq of its write in flight
        self.flush_every = 0
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(d,), daemon=True) for d in backends]

    def say(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def _request(self, issue) -> object:
        done = threading.Event()
        box: list = []
        issue(lambda r: (box.append(r), done.set()))
        if not done.wait(30):
            raise TimeoutError("request never completed")
        return box[0]

    def _loop(self, disk: str) -> None:
        blk, cursor, since_flush, newest = self.backends[disk], 0, 0, 0
        try:
            while not self.stop.is_set():
                with self.lock:  # a W line precedes the device seeing the write
                    self.seq += 1
                    seq, lba, gen = self.seq, START + cursor % COUNT, 1 + cursor // COUNT
                    self.lines.append(f"W {disk} {seq} {lba} {gen} {'vq' if disk == 'vd' else 'dma'}")
                    self.inflight[disk] = seq
                rec = encode_record(Record(RUN, DISK_IDS[disk], seq, lba, gen,
                                           XFER_IDS["vq" if disk == "vd" else "dma"], START, COUNT,
                                           int(time.monotonic() * 1000) & 0xFFFFFFFF))
                result = self._request(lambda cb: blk.aio_write(lba * SECTOR_SIZE, rec, cb))
                if isinstance(result, BaseException):
                    raise result
                self.say(f"C {disk} {seq}")
                cursor, since_flush, newest = cursor + 1, since_flush + 1, seq
                # no flushes: the breakpoint below must catch a guest write, not a cache flush
                if since_flush == self.flush_every:
                    self.say(f"F {disk} {newest}")
                    self._request(lambda cb: blk.aio_flush(cb))
                    self.say(f"FC {disk} {newest}")
                    since_flush = 0
                time.sleep(0.0005)
        except BaseException as err:  # reported by the test
            self.errors.append(err)

    def text(self) -> str:
        with self.lock:
            return "\r\n".join(self.lines) + "\r\n"


def snapshot_both(machine: Machine, name: str) -> None:
    """What a transaction of two blockdev-snapshot-internal-sync actions does: the cuts in one
    drained section, the snapshots finished once the guest's writers run again."""
    with machine.quiesce(reason="snapshot-both"):
        tickets = [(dev.node, dev.node.snapshot_create_begin(name, vm_clock_ns=machine.vm_clock_ns()))
                   for dev in machine.block_devices]
        machine.after_quiesce(lambda: [node.snapshot_create_finish(t) for node, t in tickets])


@requires_qemu_img
def test_oracle_quiesce_proof_snapshots_hold_exactly_the_completed_writes(tmp_path) -> None:
    paths = {"ide": tmp_path / "ide.qcow2", "vd": tmp_path / "vd.qcow2"}
    for p in paths.values():
        create_qcow2(str(p), "4M")
    graph = BlockGraph()
    machine = Machine(MachineConfig())
    backends, debug = {}, {}
    for disk, devname in (("ide", "ide0-hd0"), ("vd", "virtio0")):
        node = graph.open_image(f"blkdebug::{paths[disk]}", "qcow2")
        debug[disk] = node.file.impl
        blk = backends[disk] = BlockBackend(node, devname)
        machine.add_block_device(BlockDevice(devname, backend=blk, node=node))
    guest = Guest(backends)
    for t in guest.threads:
        t.start()
    cuts = {}
    try:
        for r in range(ROUNDS):
            time.sleep(0.05)
            if r == ROUNDS // 2:
                # hold vd's next write in flight, then start the snapshot
                debug["vd"].break_on("write_aio", "held")
                assert debug["vd"].wait_break("held", 10)
                held_seq = guest.inflight["vd"]
                assert f"W vd {held_seq} " in guest.text() and f"C vd {held_seq}\r" not in guest.text()
                taker = threading.Thread(target=snapshot_both, args=(machine, f"s{r}"))
                taker.start()
                time.sleep(0.2)
                assert taker.is_alive(), "the snapshot did not wait for the write in flight"
                assert machine.cuts.last() is None or machine.cuts.last().id == r
                assert backends["vd"].in_flight == 1
                debug["vd"].resume("held")
                taker.join(10)
                assert not taker.is_alive()
            else:
                snapshot_both(machine, f"s{r}")
            cut = machine.cuts.last()
            assert cut.id == r + 1 and cut.command == "snapshot-both"
            assert all(d.in_flight == 0 and d.counters is not None for d in cut.devices)
            cuts[f"s{r}"] = {disk_for_device(d): n for d, n in cut.writes().items()}
        time.sleep(0.05)
    finally:
        guest.stop.set()
        for t in guest.threads:
            t.join(10)
        for blk in backends.values():
            blk.close()
        graph.close_all()
    assert not guest.errors
    log = parse_log(guest.text())
    assert len(log.completed_writes()) > ROUNDS * 2
    total = 0
    for name, cut in cuts.items():
        images = {d: DiskImage(str(paths[d]), snapshot=name) for d in paths}
        res = check(log, images, cut)
        assert res.ok, f"{name}: {res.report()}"
        assert not check(log, images).violations
        total += sum(r.match for r in res.disks.values())
        if name == f"s{ROUNDS // 2}":
            # the held write completed before the cut: it is in the snapshot
            w = log.writes[held_seq]
            assert w.disk == "vd" and res.disks["vd"].last_seq == held_seq
    assert total > 0
    # a cut off by one write on one disk is caught
    name, cut = next((n, c) for n, c in cuts.items() if c["vd"] > 0)
    images = {d: DiskImage(str(paths[d]), snapshot=name) for d in paths}
    assert not check(log, images, dict(cut, vd=cut["vd"] - 1)).ok
    for p in paths.values():
        subprocess.run(["qemu-img", "check", "-q", str(p)], check=True)


def copy_both(machine: Machine, paths: dict[str, object], dest) -> None:
    """Copy the image files inside a quiesce, as a paused-VM backup tool would (the bug of
    cloud-hypervisor PR 8607: copies missing completed writes whose metadata was still cached)."""
    import shutil

    with machine.quiesce(reason="copy-both"):
        for disk, p in paths.items():
            shutil.copy(p, dest / f"{disk}.qcow2")


def test_oracle_quiesce_proof_file_copies_hold_the_completed_writes(tmp_path) -> None:
    paths = {"ide": tmp_path / "ide.qcow2", "vd": tmp_path / "vd.qcow2"}
    for p in paths.values():
        create_qcow2(str(p), "4M")
    graph = BlockGraph()
    machine = Machine(MachineConfig())
    backends = {}
    for disk, devname in (("ide", "ide0-hd0"), ("vd", "virtio0")):
        node = graph.open_image(str(paths[disk]), "qcow2")
        backends[disk] = BlockBackend(node, devname)
        machine.add_block_device(BlockDevice(devname, backend=backends[disk], node=node))
    guest = Guest(backends)
    for t in guest.threads:
        t.start()
    rounds, copies = 4, {}
    try:
        for r in range(rounds):
            time.sleep(0.05)
            (tmp_path / f"c{r}").mkdir()
            copy_both(machine, paths, tmp_path / f"c{r}")
            copies[r] = {disk_for_device(d): n for d, n in machine.cuts.last().writes().items()}
            assert machine.cuts.last().command == "copy-both"
        time.sleep(0.05)
    finally:
        guest.stop.set()
        for t in guest.threads:
            t.join(10)
    for blk in backends.values():
        blk.close()
    graph.close_all()
    assert not guest.errors
    log = parse_log(guest.text())
    for r, cut in copies.items():
        res = check(log, {d: DiskImage(str(tmp_path / f"c{r}" / f"{d}.qcow2")) for d in paths}, cut)
        assert res.ok, f"copy {r}: {res.report()}"
        assert sum(x.match for x in res.disks.values()) > 0

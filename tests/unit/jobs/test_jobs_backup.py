"""Backup jobs on real qcow2 images: state machine and events, copy-before-write while the
guest writes, rate limit, error policies with blkdebug, dirty bitmaps."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import requires_qemu_img
from emu.block.api import BlockBackend
from emu.block.bitmaps import add_bitmap, bitmaps_of, remove_bitmap
from emu.block.jobs import JobError, JobRegistry, JobStatus, JobTxn
from emu.block.jobs.backup import BackupJob
from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2

MiB = 1 << 20
SIZE = 4 * MiB
CL = 65536


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict | None]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, data: dict | None) -> None:
        with self.cond:
            self.items.append((name, data))
            self.cond.notify_all()

    def statuses(self, job_id: str) -> list[str]:
        return [d["status"] if n == "JOB_STATUS_CHANGE" else n for n, d in self.items
                if d and (d.get("id") == job_id or d.get("device") == job_id)]

    def wait_for(self, name: str, job_id: str, status: str | None = None, timeout: float = 10) -> None:
        def seen() -> bool:
            return any(n == name and d and (d.get("id") == job_id or d.get("device") == job_id)
                       and (status is None or d.get("status") == status) for n, d in self.items)
        with self.cond:
            assert self.cond.wait_for(seen, timeout), self.items


@pytest.fixture
def env(tmp_path: Path):
    g = BlockGraph()
    src_path = tmp_path / "src.qcow2"
    create_qcow2(str(src_path), SIZE)
    src = g.open_image(str(src_path), "qcow2")
    blk = BlockBackend(src, "disk0")
    for i in range(SIZE // CL):                      # every cluster holds its index
        if i % 3 != 2:
            blk.write(i * CL, bytes([i + 1]) * CL)
    ev = Events()
    reg = JobRegistry(ev)
    yield g, src, blk, reg, ev, tmp_path
    blk.close()
    g.close_all()


def _target(g: BlockGraph, tmp_path: Path, name: str = "tgt.qcow2"):
    p = tmp_path / name
    create_qcow2(str(p), SIZE)
    return g.open_image(str(p), "qcow2"), p


def _wait_gone(reg: JobRegistry, job_id: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while reg.find(job_id) is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert reg.find(job_id) is None


def test_full_backup_events_and_content(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    job = BackupJob.new(reg, "j1", src, tgt, sync="full", target_is_new=True)
    assert job.status is JobStatus.CREATED
    job.start()
    _wait_gone(reg, "j1")
    assert ev.statuses("j1") == ["created", "running", "waiting", "pending",
                                 "BLOCK_JOB_COMPLETED", "concluded", "null"]
    done = [d for n, d in ev.items if n == "BLOCK_JOB_COMPLETED"][0]
    assert done == {"device": "j1", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}
    assert tgt.read(0, SIZE) == src.read(0, SIZE)
    assert src.before_write == [h for h in src.before_write if "copy_before_write" not in repr(h)]


def test_verbs_refused_with_qemu_texts(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    job = BackupJob.new(reg, "j2", src, tgt, sync="full", speed=CL, auto_dismiss=False)
    job.start()
    with pytest.raises(JobError, match="Job 'j2' in state 'running' cannot accept command verb 'dismiss'"):
        job.dismiss()
    with pytest.raises(JobError, match="cannot accept command verb 'finalize'"):
        job.finalize()
    with pytest.raises(JobError, match="cannot accept command verb 'complete'"):
        job.complete()
    with pytest.raises(JobError, match="Parameter 'speed' expects a non-negative value"):
        job.set_speed(-1)
    with pytest.raises(JobError, match="Can't resume a job that was not paused"):
        job.resume()
    job.pause()
    assert job.status is JobStatus.PAUSED and job.block_job_info()["paused"] is True
    with pytest.raises(JobError, match="currently paused"):
        job.cancel(False)
    job.resume()
    job.cancel(True)
    assert job.status is JobStatus.CONCLUDED
    assert ev.statuses("j2")[-4:] == ["running", "aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    with pytest.raises(JobError, match="in state 'concluded' cannot accept command verb 'pause'"):
        job.pause()
    with pytest.raises(JobError, match="Job ID 'j2' already in use"):
        reg.check_new_id("j2")
    job.dismiss()
    assert reg.find("j2") is None and ev.statuses("j2")[-1] == "null"
    with pytest.raises(JobError, match="Invalid job ID '#x'"):
        reg.check_new_id("#x")


def test_negative_speed_creates_then_drops_the_job(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    with pytest.raises(JobError, match="Parameter 'speed' expects a non-negative value"):
        BackupJob.new(reg, "neg", src, tgt, sync="full", speed=-1)
    assert ev.statuses("neg") == ["created", "null"] and reg.find("neg") is None
    assert not src.before_write


def test_copy_before_write_keeps_point_in_time(env) -> None:
    """The guest overwrites every cluster while a rate-limited job copies: the target
    still holds the content the source had when the job was created."""
    g, src, blk, reg, ev, tmp = env
    before = src.read(0, SIZE)
    tgt, tpath = _target(g, tmp)
    job = BackupJob.new(reg, "cbw", src, tgt, sync="full", speed=4 * CL, target_is_new=True)
    job.start()
    writers = []
    for k in range(2):
        def hammer(k: int = k) -> None:
            for i in range(k, SIZE // CL, 2):
                blk.write(i * CL + 512, b"\xee" * 4096)
        writers.append(threading.Thread(target=hammer))
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    after = src.read(0, SIZE)
    assert after != before
    job.set_speed(0)
    _wait_gone(reg, "cbw")
    assert tgt.read(0, SIZE) == before
    assert job.progress_current == SIZE


@requires_qemu_img
def test_target_passes_qemu_img_check_and_compare(env) -> None:
    g, src, blk, reg, ev, tmp = env
    snapshot = tmp / "snap.raw"
    snapshot.write_bytes(src.read(0, SIZE))
    tgt, tpath = _target(g, tmp)
    job = BackupJob.new(reg, "cmp", src, tgt, sync="full", target_is_new=True)
    job.pause()                                      # created + user pause
    job.start()
    assert job.status is JobStatus.PAUSED
    blk.write(0, b"\x55" * (2 * CL))                 # while paused: copy-before-write only
    job.resume()
    _wait_gone(reg, "cmp")
    g.remove(tgt)
    chk = subprocess.run(["qemu-img", "check", str(tpath)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    cmp_ = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tpath),
                           str(snapshot)], capture_output=True, text=True)
    assert cmp_.returncode == 0 and "Images are identical" in cmp_.stdout, cmp_.stdout


def test_sync_none_copies_only_overwritten_clusters(env) -> None:
    g, src, blk, reg, ev, tmp = env
    old = src.read(4 * CL, CL)
    p = tmp / "none.qcow2"
    create_qcow2(str(p), SIZE, backing_file=src.filename, backing_fmt="qcow2")
    tgt = g.open_image(str(p), "qcow2", backing=src)
    job = BackupJob.new(reg, "none", src, tgt, sync="none")
    job.start()
    blk.write(4 * CL, b"\x77" * CL)
    assert tgt.block_status(4 * CL, CL)[0] == "data"
    assert tgt.block_status(6 * CL, CL)[0] != "data"
    assert job.progress_current == CL
    job.cancel(True)
    assert job.status is JobStatus.NULL
    assert ev.statuses("none")[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    tgt.backing = None
    assert tgt.read(4 * CL, CL) == old


def test_grouped_transaction_completes_together_and_cancels_together(env) -> None:
    g, src, blk, reg, ev, tmp = env
    t1, _ = _target(g, tmp, "a.qcow2")
    t2, _ = _target(g, tmp, "b.qcow2")
    txn = JobTxn()
    fast = BackupJob.new(reg, "fast", src, t1, sync="full", txn=txn)
    slow = BackupJob.new(reg, "slow", src, t2, sync="full", txn=txn, speed=CL)
    fast.start()
    slow.start()
    ev.wait_for("JOB_STATUS_CHANGE", "fast", "waiting")
    time.sleep(0.2)
    assert fast.status is JobStatus.WAITING          # waits for its group
    slow.cancel(True)
    _wait_gone(reg, "fast")
    _wait_gone(reg, "slow")
    assert "BLOCK_JOB_CANCELLED" in ev.statuses("fast")
    assert "BLOCK_JOB_CANCELLED" in ev.statuses("slow")
    assert not any(n == "BLOCK_JOB_COMPLETED" for n, _ in ev.items)


def test_unstarted_grouped_jobs_abort_without_cancel_events(env) -> None:
    g, src, blk, reg, ev, tmp = env
    t1, _ = _target(g, tmp, "a.qcow2")
    t2, _ = _target(g, tmp, "b.qcow2")
    txn = JobTxn()
    j1 = BackupJob.new(reg, "j1", src, t1, sync="full", txn=txn)
    j2 = BackupJob.new(reg, "j2", src, t2, sync="full", txn=txn)
    j2.cancel_sync()                                 # transaction abort: reverse order
    j1.cancel_sync()
    seq = [(d["id"], d["status"]) for n, d in ev.items]
    assert seq == [("j1", "created"), ("j2", "created"), ("j2", "aborting"),
                   ("j2", "concluded"), ("j2", "null"), ("j1", "aborting"),
                   ("j1", "concluded"), ("j1", "null")]
    assert ev.statuses("j2") == ["created", "aborting", "concluded", "null"]
    assert ev.statuses("j1") == ["created", "aborting", "concluded", "null"]
    assert not src.before_write


def test_drain_pauses_and_new_jobs_start_paused(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    token = reg.drain_begin([src])
    job = BackupJob.new(reg, "d", src, tgt, sync="full")
    job.start()
    assert job.status is JobStatus.PAUSED
    assert ev.statuses("d") == ["created", "running", "paused"]
    time.sleep(0.05)
    assert job.progress_current == 0                 # nothing copied while drained
    reg.drain_end(token)
    _wait_gone(reg, "d")
    assert ev.statuses("d")[:4] == ["created", "running", "paused", "running"]


@pytest.mark.parametrize("policy,expect", [("report", "report"), ("stop", "stop"),
                                           ("ignore", "ignore")])
def test_source_read_error_policies(tmp_path: Path, policy: str, expect: str) -> None:
    g = BlockGraph()
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\x42" * SIZE)
    cfg = tmp_path / "blkdebug.conf"
    cfg.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "256"\nonce = "on"\n')
    src = g.open_image(f"blkdebug:{cfg}:{raw}", "raw")
    tgt, _ = _target(g, tmp_path)
    ev = Events()
    reg = JobRegistry(ev)
    job = BackupJob.new(reg, "e", src, tgt, sync="full", on_source_error=policy)
    job.start()
    ev.wait_for("BLOCK_JOB_ERROR", "e")
    err = [d for n, d in ev.items if n == "BLOCK_JOB_ERROR"][0]
    assert err == {"device": "e", "operation": "read", "action": expect}
    if policy == "stop":
        ev.wait_for("JOB_STATUS_CHANGE", "e", "paused")
        assert job.block_job_info()["io-status"] == "failed"
        job.resume()
    _wait_gone(reg, "e")
    done = [d for n, d in ev.items if n == "BLOCK_JOB_COMPLETED"][0]
    if policy == "report":
        assert done["error"] == "Input/output error" and done["offset"] < SIZE
    else:
        assert "error" not in done and done["offset"] == SIZE
        assert tgt.read(0, SIZE) == b"\x42" * SIZE
    g.close_all()


def test_incremental_backup_copies_dirty_clusters_and_clears_bitmap(env) -> None:
    g, src, blk, reg, ev, tmp = env
    bm = add_bitmap(src, "bm0")
    blk.write(3 * CL, b"\x99" * 100)
    blk.write(10 * CL + 5, b"\x98" * 10)
    assert bm.count == 2 * CL and bm.info()["recording"] is True
    tgt, _ = _target(g, tmp)
    job = BackupJob.new(reg, "inc", src, tgt, sync="bitmap", bitmap=bm, bitmap_mode="on-success")
    assert bm.busy and job.progress_total == 2 * CL
    job.start()
    _wait_gone(reg, "inc")
    assert not bm.busy and bm.count == 0
    assert tgt.read(3 * CL, CL) == src.read(3 * CL, CL)
    assert tgt.block_status(4 * CL, CL)[0] != "data"
    remove_bitmap(src, bm)
    assert bitmaps_of(src) == [] and not src.before_write


def test_manual_finalize_and_dismiss(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    job = BackupJob.new(reg, "man", src, tgt, sync="full", auto_finalize=False,
                        auto_dismiss=False)
    job.start()
    ev.wait_for("JOB_STATUS_CHANGE", "man", "pending")
    time.sleep(0.05)
    assert job.status is JobStatus.PENDING and "BLOCK_JOB_COMPLETED" not in ev.statuses("man")
    with pytest.raises(JobError, match="in state 'pending' cannot accept command verb 'dismiss'"):
        job.dismiss()
    job.finalize()
    assert job.status is JobStatus.CONCLUDED
    assert reg.query_jobs() == [{"current-progress": SIZE, "status": "concluded",
                                 "total-progress": SIZE, "type": "backup", "id": "man"}]
    job.dismiss()
    # QEMU 7.2 announces a pending job that waits for job-finalize (job_event_pending)
    assert ev.statuses("man") == ["created", "running", "waiting", "pending",
                                  "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "concluded",
                                  "null"]
    assert reg.query_block_jobs() == []


def test_sync_top_copies_only_the_top_layer(env, tmp_path: Path) -> None:
    g, src, blk, reg, ev, tmp = env
    ov_path = tmp / "ov.qcow2"
    create_qcow2(str(ov_path), SIZE, backing_file=src.filename, backing_fmt="qcow2")
    ov = g.open_image(str(ov_path), "qcow2", backing=src)
    ov.write(2 * MiB, b"\x99" * CL)
    p = tmp / "top.qcow2"
    create_qcow2(str(p), SIZE, backing_file=src.filename, backing_fmt="qcow2")
    tgt = g.open_image(str(p), "qcow2", backing=src)
    job = BackupJob.new(reg, "top", ov, tgt, sync="top")
    assert job.progress_total == CL
    job.start()
    _wait_gone(reg, "top")
    assert tgt.block_status(2 * MiB, CL)[0] == "data"
    assert tgt.block_status(0, CL)[0] != "data"
    assert tgt.read(0, SIZE) == ov.read(0, SIZE)


def test_target_write_error_enospc_policy_stops_the_job(tmp_path: Path) -> None:
    g = BlockGraph()
    src_path = tmp_path / "s.qcow2"
    create_qcow2(str(src_path), SIZE)
    src = g.open_image(str(src_path), "qcow2")
    src.write(0, b"\x01" * CL)
    raw = tmp_path / "t.raw"
    raw.write_bytes(bytes(SIZE))
    cfg = tmp_path / "bd.conf"
    cfg.write_text('[inject-error]\nevent = "write_aio"\nerrno = "28"\nonce = "on"\n')
    tgt = g.open_image(f"blkdebug:{cfg}:{raw}", "raw")
    ev = Events()
    reg = JobRegistry(ev)
    job = BackupJob.new(reg, "nos", src, tgt, sync="full", on_target_error="enospc")
    job.start()
    ev.wait_for("JOB_STATUS_CHANGE", "nos", "paused")
    assert [d for n, d in ev.items if n == "BLOCK_JOB_ERROR"] == [
        {"device": "nos", "operation": "write", "action": "stop"}]
    assert job.block_job_info()["io-status"] == "nospace"
    job.resume()
    _wait_gone(reg, "nos")
    assert tgt.read(0, SIZE) == src.read(0, SIZE)
    g.close_all()


def test_cancel_a_pending_job(env) -> None:
    g, src, blk, reg, ev, tmp = env
    tgt, _ = _target(g, tmp)
    job = BackupJob.new(reg, "pend", src, tgt, sync="full", auto_finalize=False)
    job.start()
    ev.wait_for("JOB_STATUS_CHANGE", "pend", "pending")
    job.cancel(True)
    assert reg.find("pend") is None
    assert ev.statuses("pend")[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]

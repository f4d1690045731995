"""Stream and commit jobs on real qcow2 chains: events, guest-visible content, the chain and
the image headers afterwards (qemu-img check / info), a guest writer during the job,
cancelling mid-way, error policies, manual finalize."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import requires_qemu_img
from emu.block.api import BlockBackend
from emu.block.jobs import JobError, JobRegistry, JobStatus
from emu.block.jobs.commit import ActiveCommitJob, CommitJob
from emu.block.jobs.stream import StreamJob
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

    def data(self, name: str) -> list[dict]:
        return [d for n, d in self.items if n == name]

    def wait_for(self, name: str, job_id: str, status: str | None = None,
                 timeout: float = 20) -> None:
        def seen() -> bool:
            return any(n == name and d and (d.get("id") == job_id or d.get("device") == job_id)
                       and (status is None or d.get("status") == status) for n, d in self.items)
        with self.cond:
            assert self.cond.wait_for(seen, timeout), self.items


def _fill(node, offset: int, length: int, seed: int) -> None:
    rnd = random.Random(seed)
    node.write(offset, bytes(rnd.getrandbits(8) for _ in range(256)) * (length // 256))


@pytest.fixture
def chain(tmp_path: Path):
    """base (0-1.5 MiB) <- mid (1-2.5 MiB) <- top (2-3 MiB) <- active (none), all read-write
    so each layer can be filled, then the layers below active made read-only."""
    paths = [tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top", "active")]
    create_qcow2(str(paths[0]), SIZE)
    for lower, upper in zip(paths, paths[1:]):
        create_qcow2(str(upper), SIZE, backing_file=str(lower), backing_fmt="qcow2")
    g = BlockGraph()
    base = g.open_image(str(paths[0]), "qcow2", node_name="base")
    mid = g.open_image(str(paths[1]), "qcow2", node_name="mid", backing=base)
    top = g.open_image(str(paths[2]), "qcow2", node_name="top", backing=mid)
    active = g.open_image(str(paths[3]), "qcow2", node_name="active", backing=top)
    _fill(base, 0, 3 * MiB // 2, 1)
    _fill(mid, MiB, 3 * MiB // 2, 2)
    mid.write_zeroes(3 * MiB // 2, CL)           # a zero cluster over base's data
    _fill(top, 2 * MiB, MiB, 3)
    for n in (base, mid, top):
        n.flush()
        n.set_read_only(True)
    ev = Events()
    reg = JobRegistry(ev)
    yield g, (base, mid, top, active), paths, reg, ev
    g.close_all()


def _wait_gone(reg: JobRegistry, job_id: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while reg.find(job_id) is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert reg.find(job_id) is None


def _info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _check(path: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stream_whole_chain_keeps_content_and_drops_backing(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    job = StreamJob.new(reg, "s1", active, None)
    job.start()
    _wait_gone(reg, "s1")
    assert ev.statuses("s1") == ["created", "running", "waiting", "pending",
                                 "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert ev.data("BLOCK_JOB_COMPLETED") == [
        {"device": "s1", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream"}]
    assert active.backing is None
    assert active.read(0, SIZE) == before
    # the layers that left the chain were closed (nothing keeps them)
    assert [n.node_name for n in g.nodes() if n.drv == "qcow2"] == ["active"]


@requires_qemu_img
def test_stream_to_base_rewrites_header_and_images_check(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    job = StreamJob.new(reg, "s2", active, mid, keep=lambda n: n is top)
    job.start()
    _wait_gone(reg, "s2")
    assert active.backing is mid and active.read(0, SIZE) == before
    assert top in g.nodes() and top.parents == 0       # kept by keep()
    active.flush()
    info = _info(paths[3])
    assert info["backing-filename"] == str(paths[1])
    assert info["backing-filename-format"] == "qcow2"
    _check(paths[3])
    # only what top held was copied into active: mid's own data stays in mid
    assert active.block_status(MiB, CL)[0] in ("unallocated", "zero-unallocated")
    assert active.block_status(2 * MiB, CL)[0] not in ("unallocated", "zero-unallocated")


def test_stream_with_nothing_to_do_completes_with_zero_length(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    job = StreamJob.new(reg, "s3", active, top, backing_file="custom-name.qcow2")
    job.start()
    _wait_gone(reg, "s3")
    assert ev.data("BLOCK_JOB_COMPLETED") == [
        {"device": "s3", "len": 0, "offset": 0, "speed": 0, "type": "stream"}]
    assert active.backing is top and active.backing_file == "custom-name.qcow2"


def test_guest_writes_during_stream_win(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    blk = BlockBackend(active, "disk0")
    model = bytearray(active.read(0, SIZE))
    job = StreamJob.new(reg, "w", active, None, speed=4 * MiB)
    job.start()
    rnd = random.Random(7)
    stop = threading.Event()
    lock = threading.Lock()

    errors: list[BaseException] = []
    during = [0]

    def writer() -> None:
        try:
            while not stop.is_set():
                n = rnd.choice((512, 4096, CL + 512))
                off = rnd.randrange(0, (SIZE - n) // 512) * 512
                data = bytes([rnd.randrange(1, 256)]) * n
                with lock:
                    blk.write(off, data)
                    model[off:off + n] = data
                    if not job.is_completed():
                        during[0] += 1
                time.sleep(0.001)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
    t = threading.Thread(target=writer)
    t.start()
    try:
        ev.wait_for("JOB_STATUS_CHANGE", "w", "null", timeout=60)
    finally:
        stop.set()
        t.join()
    assert not errors and during[0] > 10
    assert active.backing is None
    assert blk.read(0, SIZE) == bytes(model)
    blk.close()


@requires_qemu_img
def test_cancel_stream_midway_leaves_the_chain(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    job = StreamJob.new(reg, "c", active, None, speed=1 * MiB)
    job.start()
    ev.wait_for("JOB_STATUS_CHANGE", "c", "running")
    while job.progress_current == 0:
        time.sleep(0.01)
    job.cancel()
    _wait_gone(reg, "c")
    assert "BLOCK_JOB_CANCELLED" in ev.statuses("c")
    cancelled = ev.data("BLOCK_JOB_CANCELLED")[0]
    assert 0 < cancelled["offset"] < SIZE
    assert active.backing is top and top.backing is mid
    assert active.read(0, SIZE) == before
    active.flush()
    assert _info(paths[3])["backing-filename"] == str(paths[2])
    _check(paths[3])


@requires_qemu_img
def test_commit_intermediate_layers_into_base(chain, tmp_path: Path) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(before)
    job = CommitJob.new(reg, "k", active, top, base)
    assert not base.read_only          # reopened read-write for the job
    job.start()
    _wait_gone(reg, "k")
    assert ev.statuses("k") == ["created", "running", "waiting", "pending",
                                "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert ev.data("BLOCK_JOB_COMPLETED") == [
        {"device": "k", "len": SIZE, "offset": SIZE, "speed": 0, "type": "commit"}]
    assert active.backing is base and base.read_only
    assert active.read(0, SIZE) == before
    assert base.read(0, SIZE) == before        # active holds nothing of its own
    assert mid not in g.nodes() and top not in g.nodes()
    active.flush()
    assert _info(paths[3])["backing-filename"] == str(paths[0])
    for p in (paths[0], paths[3]):
        _check(p)
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(paths[3]),
                        str(ref)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_commit_top_into_mid_keeps_base_below(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    base_before = base.read(0, SIZE)
    job = CommitJob.new(reg, "k2", active, top, mid, backing_file="mid-name.qcow2")
    job.start()
    _wait_gone(reg, "k2")
    assert active.backing is mid and mid.backing is base and mid.read_only
    assert active.read(0, SIZE) == before
    assert base.read(0, SIZE) == base_before
    assert active.backing_file == "mid-name.qcow2"


def test_cancel_commit_midway_leaves_the_chain(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    job = CommitJob.new(reg, "kc", active, top, base, speed=1 * MiB)
    job.start()
    while job.progress_current == 0 and not job.is_completed():
        time.sleep(0.01)
    job.cancel()
    _wait_gone(reg, "kc")
    assert "BLOCK_JOB_CANCELLED" in ev.statuses("kc")
    assert active.backing is top and top.backing is mid and mid.backing is base
    assert base.read_only
    assert active.read(0, SIZE) == before


def test_commit_creation_checks(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    with pytest.raises(JobError, match="cannot commit an image into itself"):
        CommitJob.new(reg, "x", active, top, top)
    with pytest.raises(JobError, match="Invalid job ID ''"):
        CommitJob.new(reg, "", active, top, base)
    with pytest.raises(JobError, match="is not in this backing file chain"):
        CommitJob.new(reg, "x", top, mid, active)
    assert base.read_only and reg.jobs() == []


def test_read_only_base_that_cannot_be_reopened(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    base.force_share = True             # force-share nodes never become writable
    with pytest.raises(JobError, match="^Cannot change the option 'force-share'$"):
        CommitJob.new(reg, "ro", active, top, base)
    assert reg.jobs() == [] and ev.statuses("ro") == ["created", "null"]
    assert base.read_only


def test_manual_finalize_emits_pending_event(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    job = StreamJob.new(reg, "m", active, mid, auto_finalize=False, auto_dismiss=False)
    job.start()
    ev.wait_for("BLOCK_JOB_PENDING", "m")
    assert ev.data("BLOCK_JOB_PENDING") == [{"type": "stream", "id": "m"}]
    assert active.backing is top        # nothing changes before job-finalize
    job.finalize()
    assert job.status is JobStatus.CONCLUDED and active.backing is mid
    job.dismiss()
    assert reg.jobs() == []


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_stream_read_error_policies(tmp_path: Path, policy: str) -> None:
    g = BlockGraph()
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x42" * SIZE)
    cfg = tmp_path / "blkdebug.conf"
    cfg.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "2048"\n'
                   'once = "on"\n')
    base = g.open_image(f"blkdebug:{cfg}:{raw}", "raw")
    top_path = tmp_path / "top.qcow2"
    create_qcow2(str(top_path), SIZE, backing_file=str(raw), backing_fmt="raw")
    top = g.open_image(str(top_path), "qcow2", backing=base)
    ev = Events()
    reg = JobRegistry(ev)
    job = StreamJob.new(reg, "e", top, None, on_error=policy)
    job.start()
    ev.wait_for("BLOCK_JOB_ERROR", "e")
    assert ev.data("BLOCK_JOB_ERROR")[0] == {"device": "e", "operation": "read",
                                            "action": policy}
    if policy == "stop":
        ev.wait_for("JOB_STATUS_CHANGE", "e", "paused")
        assert job.block_job_info()["io-status"] == "failed"
        job.resume()
    _wait_gone(reg, "e")
    done = ev.data("BLOCK_JOB_COMPLETED")[0]
    if policy == "report":
        assert done["error"] == "Input/output error" and top.backing is base
    else:
        assert "error" not in done and top.backing is None
    if policy == "stop":
        assert top.read(0, SIZE) == b"\x42" * SIZE
    g.close_all()


# ----------------------------------------------------------------- active commit

def _switch(blk: BlockBackend):
    """What the QMP layer does at the switch: devices drained, last writes copied, new root."""
    def switch(old, new, final_sync) -> None:
        with blk.drained_section(timeout=10):
            final_sync()
            blk.set_root(new)
    return switch


@requires_qemu_img
def test_active_commit_with_guest_writes_switches_to_base(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    blk = BlockBackend(active, "disk0")
    model = bytearray(blk.read(0, SIZE))
    job = ActiveCommitJob.new(reg, "a", active, base, switch_root=_switch(blk), speed=4 * MiB)
    job.start()
    rnd = random.Random(11)
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    counts = {"running": 0, "ready": 0}

    def writer() -> None:
        try:
            while not stop.is_set():
                n = rnd.choice((512, 4096, CL + 512))
                off = rnd.randrange(0, (SIZE - n) // 512) * 512
                data = bytes([rnd.randrange(1, 256)]) * n
                with lock:
                    blk.write(off, data)
                    model[off:off + n] = data
                    st = job.status.value
                    if st in counts:
                        counts[st] += 1
                time.sleep(0.03)     # dirtying slower than the copy: it converges
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
    t = threading.Thread(target=writer)
    t.start()
    try:
        ev.wait_for("BLOCK_JOB_READY", "a", timeout=60)
        while counts["ready"] < 10 and not errors:
            time.sleep(0.01)
        job.complete()
        ev.wait_for("JOB_STATUS_CHANGE", "a", "null", timeout=60)
        time.sleep(0.05)                # the writer keeps going on base
    finally:
        stop.set()
        t.join()
    assert not errors and counts["running"] > 0 and counts["ready"] >= 10
    assert ev.statuses("a")[:4] == ["created", "running", "ready", "BLOCK_JOB_READY"]
    assert ev.statuses("a")[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded",
                                     "null"]
    assert blk.read(0, SIZE) == bytes(model)
    assert base.read(0, SIZE) == bytes(model) and not base.read_only
    assert [n.node_name for n in g.nodes() if n.drv == "qcow2"] == ["base"]
    blk.close()
    _check(paths[0])


def test_complete_before_ready_is_refused(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    job = ActiveCommitJob.new(reg, "r", active, base, speed=64 * 1024)
    job.start()
    ev.wait_for("JOB_STATUS_CHANGE", "r", "running")
    with pytest.raises(JobError, match="^Job 'r' in state 'running' cannot accept command "
                                       "verb 'complete'$"):
        job.complete()
    job.cancel()
    _wait_gone(reg, "r")
    assert "BLOCK_JOB_CANCELLED" in ev.statuses("r")
    assert active.backing is top and base.read_only and not active.before_write


def test_cancel_of_a_ready_active_commit_completes_without_switch(chain) -> None:
    g, (base, mid, top, active), paths, reg, ev = chain
    before = active.read(0, SIZE)
    job = ActiveCommitJob.new(reg, "sc", active, base)
    job.start()
    ev.wait_for("BLOCK_JOB_READY", "sc")
    # what mid and top hold above base: 1-2.5 MiB and 2-3 MiB
    assert ev.data("BLOCK_JOB_READY") == [{"device": "sc", "len": 2 * MiB, "offset": 2 * MiB,
                                          "speed": 0, "type": "commit"}]
    job.pause()
    assert job.status is JobStatus.STANDBY
    job.resume()
    job.cancel()
    _wait_gone(reg, "sc")
    assert ev.statuses("sc")[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded",
                                      "null"]
    assert not job.pivoted and active.backing is top and base.read_only
    assert active.read(0, SIZE) == before and not active.before_write

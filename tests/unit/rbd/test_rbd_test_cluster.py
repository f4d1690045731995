"""scripts/ceph-test-cluster: starts a usable cluster, stops exactly its own daemons by pid."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import rbd_ceph_cluster

SCRIPT = str(rbd_ceph_cluster.SCRIPT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep").write_text("x")
    r = subprocess.run([SCRIPT, "start", str(tmp_path)], capture_output=True, text=True, timeout=30)
    if rbd_ceph_cluster.missing_reason():
        assert r.returncode != 0
        return
    assert r.returncode == 1 and "exists and is not empty" in r.stderr
    assert (tmp_path / "keep").read_text() == "x"


def test_stop_never_kills_a_foreign_pid(tmp_path):
    d = tmp_path / "c"
    (d / "pids").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        (d / "pids" / "mon.a.pid").write_text(str(other.pid))
        (d / "pids" / "osd.0.pid").write_text("not-a-pid")
        r = subprocess.run([SCRIPT, "stop", str(d)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0
        assert other.poll() is None, "stop killed a process that is not this cluster's"
        assert not d.exists()
    finally:
        other.kill()
        other.wait()


def test_start_stop_cycle(tmp_path):
    reason = rbd_ceph_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path / "cluster"
    t0 = time.monotonic()
    r = subprocess.run([SCRIPT, "start", str(d)], capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        conf = r.stdout.strip()
        assert conf == str(d / "ceph.conf")
        text = open(conf).read()
        assert "paxos propose interval = 0.1" in text and "127.0.0.1" in text
        pids = {f: int((d / "pids" / f).read_text()) for f in os.listdir(d / "pids")}
        assert set(pids) == {"mon.a.pid", "osd.0.pid"}
        for pid in pids.values():
            assert _alive(pid) and conf in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        # The pool is usable.
        subprocess.run(["rbd", "-c", conf, "create", "--size", "1M", "rbd/cycle"], check=True, timeout=60)
    finally:
        s = subprocess.run([SCRIPT, "stop", str(d)], capture_output=True, text=True, timeout=60)
    assert s.returncode == 0
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values())
    assert not d.exists()
    assert time.monotonic() - t0 < 60


def test_failed_start_stops_what_it_started(tmp_path):
    reason = rbd_ceph_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    # An `rbd` that fails makes the last step (pool init) fail after both daemons started.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "rbd").write_text("#!/bin/sh\nexit 3\n")
    (fake / "rbd").chmod(0o755)
    d = tmp_path / "cluster"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    r = subprocess.run([SCRIPT, "start", str(d)], capture_output=True, text=True, timeout=180, env=env)
    pids = [int((d / "pids" / f).read_text()) for f in os.listdir(d / "pids")]
    try:
        assert r.returncode != 0 and "start failed" in r.stderr
        assert len(pids) == 2
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
        assert (d / "log").is_dir()      # logs kept for the post-mortem
    finally:
        subprocess.run([SCRIPT, "stop", str(d)], capture_output=True, timeout=60)

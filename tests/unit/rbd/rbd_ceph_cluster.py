"""A throw-away Ceph cluster for the RBD tests, started once per pytest session.

Test modules (unit and golden) declare ``ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()``;
every such fixture shares one cluster (reference counted), started in a temporary directory
with ``scripts/ceph-test-cluster start`` and stopped with ``... stop`` when the last user is
finished -- at interpreter exit if a finalizer never ran, and by a detached watchdog
shell if the pytest process is killed outright.  Tests skip with the reason
when ceph-mon or librbd.so.1 is missing.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "ceph-test-cluster"

_lock = threading.Lock()
_state: dict = {"users": 0, "dir": None, "conf": None, "error": None}


def missing_reason() -> str | None:
    """Why the RBD tests cannot run here, or ``None``."""
    for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install ceph-mon ceph-osd ceph-common)"
    for lib in ("librbd.so.1", "librados.so.2"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return f"{lib} is not installed (apt-get install librbd1 librados2)"
    return None


def _watchdog(d: str) -> subprocess.Popen:
    """A detached shell that stops the cluster if this pytest process dies without running
    its finalizers (SIGKILL from a CI timeout): the daemons are in their own sessions and
    would otherwise outlive it."""
    code = ('while kill -0 "$0" 2>/dev/null; do sleep 1; done; '
            '"$1" stop "$2" >/dev/null 2>&1; rmdir "$3" 2>/dev/null')
    return subprocess.Popen(["sh", "-c", code, str(os.getpid()), str(SCRIPT), d, str(Path(d).parent)],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop() -> None:
    w = _state.get("watchdog")
    if w is not None:
        _state["watchdog"] = None
        w.kill()       # our own child, by its pid
        w.wait()
    d = _state["dir"]
    if d is not None:
        _state["dir"] = _state["conf"] = None
        subprocess.run([str(SCRIPT), "stop", d], timeout=60, check=False)
        shutil.rmtree(Path(d).parent, ignore_errors=True)


atexit.register(_stop)


def acquire() -> str:
    """Start the cluster if needed; return its conf path."""
    with _lock:
        if _state["error"]:
            raise RuntimeError(_state["error"])
        if _state["conf"] is None:
            base = tempfile.mkdtemp(prefix="emu-ceph-")
            d = str(Path(base) / "cluster")
            _state["dir"] = d
            _state["watchdog"] = _watchdog(d)
            r = subprocess.run([str(SCRIPT), "start", d], capture_output=True, text=True, timeout=180)
            if r.returncode != 0:
                _stop()
                _state["error"] = f"ceph-test-cluster start failed: {r.stderr[-2000:]}"
                raise RuntimeError(_state["error"])
            _state["conf"] = r.stdout.strip().splitlines()[-1]
        _state["users"] += 1
        return _state["conf"]


def release() -> None:
    """Drop one user; stop the cluster when none is left."""
    with _lock:
        _state["users"] -= 1
        if _state["users"] <= 0:
            _state["users"] = 0
            _stop()


def ceph_conf_fixture():
    """A session-scoped fixture yielding the cluster's ceph.conf path (skips without Ceph)."""
    @pytest.fixture(scope="session")
    def ceph_conf():
        reason = missing_reason()
        if reason:
            pytest.skip(reason)
        conf = acquire()
        try:
            yield conf
        finally:
            release()
    return ceph_conf

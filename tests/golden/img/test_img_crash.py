"""Crash consistency: kill -9 an emu-img writer at random points; `qemu-img check` must never
report corruption (leaked clusters are allowed, as in QEMU).

Writers: cluster allocation (``emu-img bench -w`` over a fresh qcow2, every request allocating)
and internal snapshot create/delete (``emu-img snapshot -c/-d``).  A few runs by default; the
full 50 runs: ``EMU_CRASH_RUNS=50 python -m pytest tests/golden/img/test_img_crash.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import requires_qemu_img

pytestmark = requires_qemu_img

EMU_IMG = [sys.executable, "-m", "emu.img"]
RUNS = int(os.environ.get("EMU_CRASH_RUNS", "2"))


def _kill_after(cmd: list[str], delay: float) -> bool:
    """Run ``cmd`` and SIGKILL it after ``delay`` seconds; True when it was killed mid-run."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.wait(timeout=delay)
        err = p.stderr.read().decode(errors="replace")
        assert p.returncode == 0, f"writer failed (rc={p.returncode}): {err}"
        return False
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
        return True


def _duration(cmd: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t


def _qemu_check(path: Path) -> dict:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode in (0, 3), f"qemu-img check rc={r.returncode}: {r.stdout}{r.stderr}"
    res = json.loads(r.stdout)
    assert res.get("corruptions", 0) == 0 and res["check-errors"] == 0
    return res


@pytest.mark.parametrize("run", range(RUNS))
def test_kill_during_cluster_allocation(tmp_path: Path, run: int) -> None:
    rnd = random.Random(run)
    img = tmp_path / "alloc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "256M"],
                   check=True)
    # Every 4 KiB request lands in a new cluster (step 12 KiB), so each one allocates.
    killed = _kill_after(EMU_IMG + ["bench", "-w", "-f", "qcow2", "-s", "4k", "-S", "12k", "-c", "60000",
                                    "--pattern=0x5a", str(img)], 0.4 + rnd.random() * 1.2)
    assert killed, "the writer finished before it was killed"
    _qemu_check(img)


@pytest.mark.parametrize("run", range(RUNS))
def test_kill_during_snapshot_create_delete(tmp_path: Path, run: int) -> None:
    rnd = random.Random(1000 + run)
    img = tmp_path / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "64M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 0 48M", str(img)], check=True, capture_output=True)
    # Measure one create and one delete, then kill later ones at a random point inside that span
    # (the first ~0.15 s is interpreter start-up).
    t_create = _duration(EMU_IMG + ["snapshot", "-c", "base", str(img)])
    t_delete = _duration(EMU_IMG + ["snapshot", "-d", "base", str(img)])
    subprocess.run(EMU_IMG + ["snapshot", "-c", "base", str(img)], check=True)
    for step in range(2):
        _kill_after(EMU_IMG + ["snapshot", "-c", f"s{step}", str(img)], 0.12 + rnd.random() * t_create)
        _qemu_check(img)
        if "base" not in _snapshot_names(img):
            subprocess.run(EMU_IMG + ["snapshot", "-c", "base", str(img)], check=True)
        _kill_after(EMU_IMG + ["snapshot", "-d", "base", str(img)], 0.12 + rnd.random() * t_delete)
        _qemu_check(img)


def _snapshot_names(img: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True, text=True,
                         check=True).stdout.splitlines()[2:]
    return [line.split()[1] for line in out if line.split()]

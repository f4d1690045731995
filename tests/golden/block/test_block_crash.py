"""Crash consistency: kill -9 a writer at random points during cluster allocation and
snapshot create/delete/goto; ``qemu-img check`` must never report corruption (leaks are fine).

CI runs a seeded subset through ``scripts/crash-loop-img`` (the full 50 runs: run the script
without arguments)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, requires_qemu_img

RUNS = 12


@requires_qemu_img
def test_kill9_never_corrupts():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "crash-loop-img"), "--runs", str(RUNS),
                        "--seed", "2024"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("verdict: PASS"), r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("run ")]
    assert len(lines) == RUNS and all(ln.endswith("ok") for ln in lines)
    m = re.search(r"^(\d+) runs: (\d+) passed", r.stdout, re.M)
    assert m and m.group(1) == m.group(2) == str(RUNS)
    # The seeded kills land inside snapshot operations as well as plain writes.
    assert "snapshot-" in r.stdout.split("killed during:")[1]

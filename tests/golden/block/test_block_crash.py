"""Crash consistency: kill -9 a writer at random points during cluster allocation and
snapshot create/delete/goto; ``qemu-img check`` must never report corruption (leaks are fine).
Not even the instant where refcounts and QCOW_OFLAG_COPIED disagree, which QEMU 7.2's in-place
snapshot metadata burst has: emu commits each snapshot operation with one header write.

CI runs a seeded subset through ``scripts/crash-loop-img`` (the full 50 runs: run the script
without arguments) and a deterministic "crash" after every single write of a few snapshot
operations."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys

from conftest import REPO, requires_qemu_img

from emu.block.node import BlockGraph
from emu.block.qcow2.create import create_qcow2

RUNS = 12
SCRIPT = REPO / "scripts" / "crash-loop-img"


@requires_qemu_img
def test_kill9_never_corrupts():
    r = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(RUNS), "--seed", "2024"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("verdict: PASS"), r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("run ")]
    assert len(lines) == RUNS and all(" ok" in ln for ln in lines)
    m = re.search(r"^(\d+) runs: (\d+) passed", r.stdout, re.M)
    assert m and m.group(1) == m.group(2) == str(RUNS)
    assert " 0 in the OFLAG_COPIED window" in r.stdout, r.stdout
    # The seeded kills land inside snapshot operations as well as plain writes.
    assert "snapshot-" in r.stdout.split("killed during:")[1]


@requires_qemu_img
def test_crash_after_every_write_of_snapshot_operations(tmp_path):
    loader = importlib.machinery.SourceFileLoader("crash_loop_img", str(SCRIPT))
    crash_loop = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(crash_loop)
    p = str(tmp_path / "w.qcow2")
    cp = str(tmp_path / "cp.qcow2")
    create_qcow2(p, 4 << 20, cluster_size=4096)
    g = BlockGraph()
    bs = g.open_image(p, cache="unsafe")
    rnd = random.Random(11)
    for _ in range(8):
        bs.write(rnd.randrange(0, bs.size - 70000), rnd.randbytes(rnd.randrange(1, 70000)))
    fimpl = bs.file.impl
    orig = fimpl.write
    seen: list[tuple[str, int, str]] = []
    state = {"op": None}

    def write(off: int, data: bytes) -> None:
        orig(off, data)
        if state["op"] is None:
            return
        shutil.copyfile(p, cp)  # the file as a kill -9 right after this write leaves it
        r = subprocess.run(["qemu-img", "check", "--output=json", cp], capture_output=True, text=True)
        res = json.loads(r.stdout)
        if res.get("corruptions") or res.get("check-errors"):
            kind = "window" if crash_loop.copied_window_only(cp, r.stderr, res) else "CORRUPT"
            seen.append((state["op"], off, kind))
    fimpl.write = write
    for op, fn in (("create a", lambda: bs.snapshot_create("a")),
                   ("write", lambda: bs.write(8192, b"z" * 20000)),
                   ("create b", lambda: bs.snapshot_create("b")),
                   ("goto a", lambda: bs.snapshot_goto("a")),
                   ("delete b", lambda: bs.snapshot_delete(name="b"))):
        state["op"] = op
        fn()
    state["op"] = None
    fimpl.write = orig
    g.close_all()
    assert seen == [], seen             # neither corruption nor the OFLAG_COPIED window

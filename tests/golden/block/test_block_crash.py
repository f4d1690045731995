"""Crash consistency: kill -9 a writer at random points during cluster allocation and
snapshot create/delete/goto; ``qemu-img check`` must never report corruption (leaks are fine)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

from conftest import REPO, requires_qemu_img

from emu.block.qcow2.create import create_qcow2

RUNS = 30

WRITER = r"""
import random, sys
from emu.block.node import BlockGraph
path, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
g = BlockGraph()
bs = g.open_image(path, cache="unsafe")
sys.stdout.write("ready\n"); sys.stdout.flush()
n = 0
while True:
    n += 1
    op = rnd.randrange(10)
    if op < 6:
        off = rnd.randrange(0, bs.size - 70000)
        bs.write(off, rnd.randbytes(rnd.randrange(1, 70000)))
    elif op == 6:
        bs.snapshot_create(f"s{n}")
    elif op == 7 and bs.snapshot_list():
        bs.snapshot_delete(snapshot_id=rnd.choice(bs.snapshot_list())["id"])
    elif op == 8 and bs.snapshot_list():
        bs.snapshot_goto(rnd.choice(bs.snapshot_list())["id"])
    else:
        bs.flush()
"""


@requires_qemu_img
def test_kill9_never_corrupts(tmp_path):
    rnd = random.Random(2024)
    bad = []
    for run in range(RUNS):
        p = str(tmp_path / f"c{run}.qcow2")
        create_qcow2(p, 8 << 20, cluster_size=rnd.choice([4096, 65536]),
                     compat=rnd.choice(["0.10", "1.1"]))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, p, str(run)], cwd=str(REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rnd.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err  # it was still running: no traceback
        r = subprocess.run(["qemu-img", "check", "--output=json", p], capture_output=True, text=True)
        res = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"error": r.stderr}
        if res.get("corruptions") or res.get("error") or res.get("check-errors"):
            bad.append((run, res, r.stderr[-500:]))
    assert not bad, bad

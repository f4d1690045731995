"""``snapshot -c/-d/-a`` with repeated names and names that look like ids, emu-img against
qemu-img 7.2 on twin images: same exit codes, same messages, same resulting tables.

qemu-img lets a name repeat (only ids are unique), ``-d`` finds the first snapshot with the
*name* (an id never matches), ``-a`` takes an id first, then a name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import requires_qemu_img, requires_qemu_io

pytestmark = [requires_qemu_img, requires_qemu_io]

TOOLS = {"qemu": ["qemu-img"], "emu": [sys.executable, "-m", "emu.img"]}


def run(tool: str, *args: str, cwd: Path) -> tuple[int, str, str]:
    r = subprocess.run(TOOLS[tool] + list(args), capture_output=True, text=True, cwd=cwd, timeout=60)
    err = r.stderr if tool == "qemu" else re.sub(r"^emu-img:", "qemu-img:", r.stderr, flags=re.M)
    return r.returncode, r.stdout, err


def table(path: str, cwd: Path) -> list[tuple[str, str, str]]:
    """(id, tag, icount) rows as qemu-img lists them (dates differ between the twins)."""
    out = subprocess.run(["qemu-img", "snapshot", "-l", path], capture_output=True, text=True,
                         cwd=cwd, check=True).stdout
    return [(ln.split()[0], ln[10:28].strip(), ln.split()[-1]) for ln in out.splitlines()[2:]]


def pattern_at(path: str, cwd: Path) -> int:
    """Which of the patterns written below the image holds at offset 0."""
    for p in range(1, 6):
        r = subprocess.run(["qemu-io", "-c", f"read -P {p} 0 4k", path], capture_output=True,
                           text=True, cwd=cwd)
        if "verification failed" not in r.stdout:
            return p
    return 0


def test_repeated_and_numeric_names(tmp_path: Path) -> None:
    steps = [("-c", "s1"), ("-c", "2"), ("-c", "s1"), ("-c", "1"), ("-c", "s1"),
             ("-d", "3"), ("-d", "2"), ("-d", "s1"), ("-a", "1"), ("-a", "s1"), ("-d", "nope"),
             ("-a", "nope"), ("-c", "")]
    results: dict[str, list] = {}
    for tool in TOOLS:
        img = f"{tool}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], cwd=tmp_path, check=True)
        log = []
        pat = 0
        for op, name in steps:
            if op == "-c":
                pat += 1
                subprocess.run(["qemu-io", "-c", f"write -P {pat} 0 4k", img], cwd=tmp_path,
                               check=True, capture_output=True)
            rc, out, err = run(tool, "snapshot", op, name, img, cwd=tmp_path)
            log.append((op, name, rc, out, err, table(img, tmp_path),
                        pattern_at(img, tmp_path) if op == "-a" else None))
        results[tool] = log
    for q, e in zip(results["qemu"], results["emu"]):
        assert q == e
    final = results["qemu"][-1][5]
    assert [r[1] for r in final] == ["s1", "1", "s1", ""]    # repeats kept, "" allowed
    assert all(r[2] == "0" for r in final)                   # qemu-img stores icount 0
    assert re.search("snapshot not found", results["emu"][-3][4])

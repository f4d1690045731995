"""A short seeded run of scripts/qmp-fuzz (the full 100 000 lines run from the script)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import sys

from conftest import REPO, requires_qemu_img, requires_qemu_system

_loader = importlib.machinery.SourceFileLoader("qmp_fuzz", str(REPO / "scripts" / "qmp-fuzz"))
_spec = importlib.util.spec_from_loader("qmp_fuzz", _loader)
fuzz = importlib.util.module_from_spec(_spec)
_loader.exec_module(fuzz)


def test_generator_is_deterministic_and_covers_every_kind() -> None:
    a = [fuzz.generate(random.Random(7)) for _ in range(1)]
    r1, r2 = random.Random(3), random.Random(3)
    s1 = [fuzz.generate(r1) for _ in range(500)]
    assert s1 == [fuzz.generate(r2) for _ in range(500)] and a
    assert any(not x.endswith(b"\n") for x in s1)                 # half lines
    assert any(len(x) > 1 << 20 for x in s1)                      # 1 MiB strings
    assert any(x.count(b"[") > 1024 or x.count(b"{") > 1024 for x in s1)   # deep nesting
    assert any(b"'" in x for x in s1)                             # single quotes


def test_seeded_fuzz_run(tmp_path) -> None:
    stats = fuzz.run(3000, 20261202, [sys.executable, "-m", "emu"], str(tmp_path))
    assert stats["lines"] >= 2900
    assert stats["errors"] > 1000 and stats["vanished"] >= 20
    assert stats["second_client"] > 10 and stats["max_second_latency"] < 5.0


@requires_qemu_system
def test_differential_against_qemu(tmp_path) -> None:
    """The same mutated lines to emu and qemu-system-x86_64 get identical replies."""
    st = fuzz.differential(300, 424242, [sys.executable, "-m", "emu"], ["qemu-system-x86_64"],
                           str(tmp_path))
    assert st["lines"] > 200
    assert st["diffs"] == []


@requires_qemu_system
@requires_qemu_img
def test_differential_block_commands_against_qemu(tmp_path) -> None:
    """Mutated block commands on real drives: the same replies as qemu-system-x86_64."""
    st = fuzz.differential(200, 777, [sys.executable, "-m", "emu"], ["qemu-system-x86_64"],
                           str(tmp_path), drives=True)
    assert st["lines"] > 150
    assert st["diffs"] == []

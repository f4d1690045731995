"""scripts/bench-disk without booting anything: argument checks and the figures it derives from a
guest ``B`` line (the booted path is exercised by running the script; see its docstring)."""

from __future__ import annotations

import math
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader

from conftest import REPO

SCRIPT = REPO / "scripts" / "bench-disk"
_loader = SourceFileLoader("bench_disk", str(SCRIPT))
bench = module_from_spec(spec_from_loader("bench_disk", _loader))
sys.modules["bench_disk"] = bench      # dataclasses look their module up there
_loader.exec_module(bench)


def test_diskwriter_bench_script_refuses_bad_arguments() -> None:
    for args in (["--runs", "0"], ["--seconds", "-1"], ["--runs", "x"]):
        p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert "usage: bench-disk" in p.stderr and "Traceback" not in p.stderr


def test_diskwriter_bench_script_figures_from_a_b_line() -> None:
    line = ("B vd vq write seq sectors=2048 count=300 ok=300 errors=0 ms=400 maxgap_ms=3 "
            "tsc_k=390625 maxgap_tsc_k=2930 tsc_back=0\r\n")
    m = bench.B_LINE.search(line)
    r = bench.Result(*(int(m.group(i)) for i in range(5, 14)), host_s=0.41, tsc_hz=1e9)
    assert r.seconds == 390625 * 1024 / 1e9 == 0.4
    assert math.isclose(r.mb_s, 300 * 2048 * 512 / 0.4 / 1e6)       # 1572.864 MB/s
    assert math.isclose(r.req_s, 750.0)
    assert math.isclose(r.tsc_gap_ms, 2930 * 1024 / 1e6)
    r.tsc_back = 1                   # a TSC that stepped back makes its gap unusable, not huge
    assert math.isnan(r.tsc_gap_ms)

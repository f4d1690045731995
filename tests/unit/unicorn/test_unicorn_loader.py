"""emu.cpu.uclib picks the library as documented; scripts/build-unicorn's cheap paths.

The library is chosen once per process, so each case runs a fresh interpreter.  Cases that
need the patched build skip cleanly when it is not built (scripts/build-unicorn).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from emu.cpu import uclib

BUILD = REPO / "scripts" / "build-unicorn"
needs_patched_build = pytest.mark.skipif(
    not uclib.patched_build_available(), reason="patched libunicorn not built (scripts/build-unicorn)")

REPORT = ("import json, os, sys; from emu.cpu import uclib; i = uclib.library_info(); "
          "print(json.dumps({'patched': uclib.PATCHED, 'path': i.path, 'reason': i.reason, "
          "'leaked': os.environ.get('LIBUNICORN_PATH'), 'line': uclib.which_library()}))")


def run_py(code: str, **env: str | None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    for k in ("EMU_UNICORN", "EMU_UNICORN_DIR", "LIBUNICORN_PATH"):
        e.pop(k, None)
    for k, v in env.items():
        if v is not None:
            e[k] = v
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=60)


def report(**env: str | None) -> tuple[dict, str]:
    import json

    p = run_py(REPORT, **env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def test_unicorn_loader_forced_stock_is_silent() -> None:
    got, err = report(EMU_UNICORN="stock", LIBUNICORN_PATH=str(uclib.patched_dir()))
    assert got["patched"] is False
    assert got["reason"] == "EMU_UNICORN=stock"
    assert "site-packages" in got["path"] or "dist-packages" in got["path"]
    assert got["leaked"] == str(uclib.patched_dir())  # the caller's variable is restored
    assert "Warning" not in err


def test_unicorn_loader_falls_back_with_one_warning(tmp_path: Path) -> None:
    got, err = report(EMU_UNICORN_DIR=str(tmp_path / "none"))
    assert got["patched"] is False
    assert got["leaked"] is None
    assert err.count("SlowUnicornWarning") == 1
    assert "~10x slower" in err and "scripts/build-unicorn" in err


def test_unicorn_loader_patched_required_but_missing(tmp_path: Path) -> None:
    p = run_py("from emu.cpu import uclib", EMU_UNICORN="patched", EMU_UNICORN_DIR=str(tmp_path))
    assert p.returncode != 0
    assert "CpuError: EMU_UNICORN=patched but there is no patched libunicorn" in p.stderr


def test_unicorn_loader_reports_an_earlier_import() -> None:
    p = run_py("import unicorn\n" + REPORT, EMU_UNICORN="stock")
    assert p.returncode == 0, p.stderr
    assert '"reason": "unicorn was imported before emu.cpu.uclib"' in p.stdout
    assert '"patched": false' in p.stdout


def test_unicorn_loader_bad_mode_warns_and_uses_auto(tmp_path: Path) -> None:
    got, err = report(EMU_UNICORN="fast please", EMU_UNICORN_DIR=str(tmp_path))
    assert got["patched"] is False
    assert "is not one of auto, stock, patched" in err


@needs_patched_build
def test_unicorn_loader_picks_patched_build() -> None:
    got, err = report()
    assert got["patched"] is True
    assert got["path"] == str(uclib.patched_dir() / uclib.LIB_NAME)
    assert got["leaked"] is None  # LIBUNICORN_PATH is not left in the environment
    assert "Warning" not in err
    assert got["line"].startswith("libunicorn 2.1.4 patched (notdirty-code-pages invalidate-phys native-irq native-halt "
                                   "insn-hooks-kick inline-exit-check)")


@needs_patched_build
def test_unicorn_loader_ignores_a_build_for_other_patches(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(uclib.patched_dir() / uclib.LIB_NAME, stale / uclib.LIB_NAME)
    (stale / "build-id").write_text("000000000000\n")
    got, _ = report(EMU_UNICORN_DIR=str(stale))
    assert got["patched"] is False
    (stale / "build-id").write_text(uclib.patch_hash() + "\n")
    got, _ = report(EMU_UNICORN_DIR=str(stale))
    assert got["patched"] is True and got["path"] == str(stale / uclib.LIB_NAME)


@needs_patched_build
def test_unicorn_loader_user_libunicorn_path_wins() -> None:
    site = Path(sys.modules["unicorn"].__file__).parent / "lib"
    got, _ = report(LIBUNICORN_PATH=str(site))
    assert got["patched"] is False and got["reason"] == "LIBUNICORN_PATH set by the user"


@pytest.mark.parametrize("other", ["stock", "patched"])
def test_unicorn_loader_smc_and_dma_on_each_library(other: str) -> None:
    """Run the SMC (fixed and random) and DMA tests under each library in this one pytest run."""
    if other == "patched" and not uclib.patched_build_available():
        pytest.skip("patched libunicorn not built (scripts/build-unicorn)")
    here = Path(__file__).parent
    env = dict(os.environ, EMU_UNICORN=other)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(here / "test_unicorn_smc.py"), str(here / "test_unicorn_smc_random.py"),
                        str(here / "test_unicorn_dma.py")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout


def test_unicorn_build_script_hash_matches_loader() -> None:
    p = subprocess.run([str(BUILD), "--print-hash"], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == uclib.patch_hash()
    p = subprocess.run([str(BUILD), "--print-dir"], capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if k != "EMU_UNICORN_DIR"}
                       | {"PYTHON": sys.executable})
    assert p.stdout.strip().endswith(f"/emu/unicorn-2.1.4-{uclib.patch_hash()}")


def test_unicorn_build_script_refuses_without_tools(tmp_path: Path) -> None:
    """No cmake/gcc on PATH: exit 2 with a message naming what is missing, nothing installed."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "cat", "sed", "mkdir", "sha256sum", "cut", "ls"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    (bindir / "python3").symlink_to(sys.executable)
    dest = tmp_path / "dest"
    p = subprocess.run(["bash", str(BUILD), "--prefix", str(dest)], capture_output=True, text=True,
                       timeout=60, env={"PATH": str(bindir), "HOME": str(tmp_path)})
    assert p.returncode == 2, p.stderr
    assert "missing cmake gcc" in p.stderr and "stock library" in p.stderr
    assert not (dest / uclib.LIB_NAME).exists()


def test_unicorn_build_script_rejects_bad_arguments() -> None:
    p = subprocess.run([str(BUILD), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument: --frobnicate" in p.stderr


@needs_patched_build
def test_unicorn_build_script_is_idempotent() -> None:
    p = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("build-unicorn: up to date: ")


def test_unicorn_loader_survives_a_broken_build(tmp_path: Path) -> None:
    """A build-id that matches but a library that cannot load: stock, and the warning says so."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / uclib.LIB_NAME).write_bytes(b"\x7fELF but not really")
    (broken / "build-id").write_text(f"{uclib.patch_hash()}\n")
    got, err = report(EMU_UNICORN_DIR=str(broken))
    assert got["patched"] is False
    assert got["reason"] == f"the patched build {broken / uclib.LIB_NAME} failed to load"
    assert err.count("SlowUnicornWarning") == 1 and "failed to load" in err
    p = run_py("from emu.cpu import uclib", EMU_UNICORN="patched", EMU_UNICORN_DIR=str(broken))
    assert p.returncode != 0 and "failed to load" in p.stderr

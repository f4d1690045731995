"""Run emu-img in-process (much faster than a new interpreter per case) for golden comparisons."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from emu.img.main import main


def run_emu(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """``emu-img ARGS`` in ``cwd``: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()

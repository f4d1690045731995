"""The one place the product imports Unicorn from.

Other modules do ``from emu.cpu.uclib import unicorn`` (and ``unicorn.x86_const``).
This first version loads the stock library; the patched build is picked up later.
"""

from __future__ import annotations

import unicorn

from emu.errors import CpuError

#: The pinned Unicorn release; interrupt delivery depends on its context layout.
UNICORN_VERSION = "2.1.4"

if unicorn.__version__ != UNICORN_VERSION:
    raise CpuError(f"emu needs unicorn=={UNICORN_VERSION}, found {unicorn.__version__}")

#: True when the patched (fast guest store) libunicorn is loaded.
PATCHED = False

__all__ = ["unicorn", "PATCHED", "UNICORN_VERSION"]

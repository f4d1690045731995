"""Helpers shared by the emu-img subcommands: sizes, formats, quiet printing."""

from __future__ import annotations

import os
import re
import sys

from emu.img.main import ImgError

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("qcow2", "raw")

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?|\.\d+)\s*([bBkKmMgGtTpPeE]?)$")


class SizeRangeError(ValueError):
    """A well-formed size that does not fit in QEMU's int64."""


def parse_size(text: str) -> int:
    """Parse a size as QEMU's ``qemu_strtosz``: bytes with optional k/M/G/T/P/E suffix (1024-based).

    :raises SizeRangeError: a valid size of 2^63 bytes or more.
    :raises ValueError: the text is not a size.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    num, suffix = m.groups()
    mult = _SUFFIXES[suffix.lower()]
    if num.lower().startswith("0x"):
        if suffix and suffix.lower() != "b":
            raise ValueError(text)  # QEMU refuses hex with a suffix
        val = int(num, 16)
    elif "." in num:
        if not suffix or mult == 1:
            raise ValueError(text)  # fractions need a unit > bytes
        val = int(float(num) * mult)
    else:
        val = int(num) * mult
    if val >= 1 << 63:
        raise SizeRangeError(text)
    return val


def output_format(name: str) -> str:
    """Validate ``--output``; qemu-img's text otherwise."""
    if name not in ("human", "json"):
        raise ImgError("--output must be used with human or json as argument.")
    return name


def qprint(quiet: bool, text: str) -> None:
    """qemu-img's ``qprintf``: stdout unless ``-q``."""
    if not quiet:
        sys.stdout.write(text)


def probe_format(filename: str, fmt: str | None) -> str:
    """The image format: ``fmt`` when given (checked), else probed from the magic.

    :raises ImgError: with qemu-img's "Could not open" texts.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ImgError(f"Could not open '{filename}': Unknown driver '{fmt}'")
    try:
        with open(filename, "rb") as f:
            magic = f.read(8)
    except OSError as err:
        raise ImgError(f"Could not open '{filename}': Could not open '{filename}': "
                       f"{os.strerror(err.errno) if err.errno else err}") from None
    if fmt is not None:
        if fmt == "qcow2" and magic[:4] != QCOW2_MAGIC:
            raise ImgError(f"Could not open '{filename}': Image is not in qcow2 format")
        return fmt
    return "qcow2" if _probe_qcow2(magic) else "raw"


def _probe_qcow2(head: bytes) -> bool:
    """QEMU's qcow2_probe: the magic and a version of at least 2 (zeroes past the end)."""
    head = head.ljust(8, b"\0")
    return head[:4] == QCOW2_MAGIC and int.from_bytes(head[4:8], "big") >= 2

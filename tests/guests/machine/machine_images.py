"""Boot sectors for the machine tests, assembled from the .asm files beside this module."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parents[2] / "guest-images" / "cpu"
#: the machine every test boots (the brief's reference command line, without -drive)
MACHINE = ("-m", "64", "-device", "isa-debug-exit,iobase=0x501,iosize=2")


def boot_image(name: str, directory: Path) -> Path:
    """Assemble ``<name>.asm`` into a 1 MiB raw disk in ``directory``; return its path."""
    img = directory / f"{name}.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(img), str(HERE / f"{name}.asm")], check=True)
    with open(img, "r+b") as f:
        f.truncate(1 << 20)
    return img


def cpu_guest(name: str, directory: Path) -> Path:
    """A private copy of ``guest-images/cpu/<name>.img`` (each run locks its own image)."""
    img = directory / f"{name}.img"
    img.write_bytes((GUESTS / f"{name}.img").read_bytes())
    return img


def ide(img: Path, fmt: str = "raw") -> tuple[str, str]:
    """``-drive`` options for ``img`` on the first IDE channel."""
    return ("-drive", f"file={img},format={fmt},if=ide")

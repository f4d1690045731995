"""Opening images for emu-img: one :class:`BlockGraph` per run, qemu-img's error texts."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from emu.errors import EmuError
from emu.img.main import ImgError

PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write operations "
    "on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


class Session:
    """The block graph of one emu-img run; closes (flushes) every node at the end."""

    def __init__(self) -> None:
        from emu.block.node import BlockGraph
        self.graph = BlockGraph()

    def open(self, filename: str, fmt: str | None = None, *, read_only: bool = True,
             force_share: bool = False, cache: str | None = None, backing=None, no_backing: bool = False):
        """Open ``filename`` as a format node.

        :param no_backing: do not open the backing chain (``rebase -u``, ``create -u``).
        :raises ImgError: ``Could not open '<file>': <reason>`` as qemu-img prints it.
        """
        if filename.startswith("rbd:"):
            return self._open_rbd(filename, fmt, read_only)
        kw = {}
        if no_backing:
            kw["backing"] = None
        elif backing is not None:
            kw["backing"] = backing
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise ImgError(f"Could not open '{filename}': Unknown driver '{fmt}'")
        try:
            bs = self.graph.open_image(filename, fmt, read_only=read_only, force_share=force_share,
                                       cache=cache, **kw)
        except EmuError as err:
            if not no_backing and backing is None and self._opens_alone(filename, fmt, read_only, force_share):
                # The image itself is fine: its backing chain failed (QEMU says so).
                raise ImgError(f"Could not open '{filename}': Could not open backing file: {err}") from None
            raise ImgError(f"Could not open '{filename}': {err}") from None
        if fmt is None and bs.drv == "raw" and not read_only:
            sys.stderr.write(PROBE_WARNING.format(filename))
        return bs

    def _open_rbd(self, filename: str, fmt: str | None, read_only: bool):
        """QEMU's ``rbd:pool/image[@snap][:opts]``: a raw node on an rbd node."""
        from emu.block.drivers import rbd
        if fmt not in (None, "raw", "rbd"):
            raise ImgError(f"Could not open '{filename}': Unknown driver '{fmt}'")
        try:
            if fmt == "rbd":   # -f rbd: the protocol node is the image (QEMU allows it)
                return rbd.open_protocol_node(self.graph, filename, read_only=read_only)
            bs = rbd.open_image(self.graph, filename, read_only=read_only, auto_read_only=False)
        except EmuError as err:
            raise ImgError(f"Could not open '{filename}': {err}") from None
        if fmt is None and not bs.read_only:
            sys.stderr.write(PROBE_WARNING.format(bs.file.filename))
        return bs

    def _opens_alone(self, filename: str, fmt: str | None, read_only: bool, force_share: bool) -> bool:
        try:
            bs = self.graph.open_image(filename, fmt, read_only=True, force_share=True, backing=None)
        except EmuError:
            return False
        has_backing = bool(bs.backing_file)
        self.graph.remove(bs)
        return has_backing

    def chain(self, filename: str, fmt: str | None, force_share: bool) -> list:
        """Open every image of a backing chain on its own (``info --backing-chain``), top first.

        :raises ImgError: qemu-img's texts for a missing member or a loop.
        """
        from emu.block.node import resolve_backing_path
        nodes = []
        seen: set[str] = set()
        name, f = filename, fmt
        while True:
            key = os.path.realpath(name)
            if key in seen:
                raise ImgError(f"Backing file '{name}' creates an infinite loop.")
            seen.add(key)
            bs = self.open(name, f, read_only=True, force_share=force_share, no_backing=True)
            nodes.append(bs)
            if not bs.backing_file:
                return nodes
            name, f = resolve_backing_path(bs.filename, bs.backing_file), bs.backing_format

    def close(self) -> None:
        """Flush and close every node; errors become qemu-img style errors."""
        try:
            self.graph.close_all()
        except EmuError as err:
            raise ImgError(str(err)) from None


@contextmanager
def session() -> Iterator[Session]:
    """``with session() as s: bs = s.open(...)``; everything is closed on exit."""
    s = Session()
    try:
        yield s
    finally:
        try:
            s.close()
        except ImgError:
            if sys.exc_info()[0] is None:
                raise

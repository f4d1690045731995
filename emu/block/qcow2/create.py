"""qcow2 image creation with qemu-img's options and QEMU's layout.

Like QEMU: cluster 0 holds the header, cluster 1 the refcount table, cluster 2 the first
refcount block (counting clusters 0-2); the image is then opened and grown to its size,
which places the L1 table at cluster 3; the backing file name and format are written into
the header last.  ``qemu-img create`` makes the same bytes for the default options.

When that result is known in advance (no preallocation, and the header, refcount table and
block and the L1 table are all counted by the first refcount block: any size up to 2^63
with 64 KiB clusters) the finished image is written in one ``pwrite`` instead (the same
bytes; ``tests/unit/block/test_block_qcow2_create_direct.py`` compares both ways), which
an external snapshot's overlay creation waits on.
"""

from __future__ import annotations

import os
import struct

from emu.block.qcow2 import format as f
from emu.errors import BlockError, ImageFormatError, ImageOpenError

PREALLOC_MODES = ("off", "metadata")


def _parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
    num = s.rstrip("bBkKmMgGtTpPeE")
    unit = s[len(num):].lower()
    if unit not in units or not num:
        raise BlockError(f"Invalid size '{value}'")
    try:
        return int(float(num) * units[unit]) if "." in num else int(num) * units[unit]
    except ValueError as err:
        raise BlockError(f"Invalid size '{value}'") from err


def create_qcow2(filename: str, size: int | str | None, *, cluster_size: int | str = 65536,
                 compat: str = "1.1", lazy_refcounts: bool = False, preallocation: str = "off",
                 backing_file: str | None = None, backing_fmt: str | None = None,
                 refcount_bits: int = 16, durable: bool = True) -> None:
    """Create a qcow2 image as ``qemu-img create -f qcow2`` does.

    :param size: virtual size in bytes (suffixes allowed); ``None`` takes the backing file's size.
    :param compat: ``"0.10"`` (version 2) or ``"1.1"`` (version 3; also ``"v2"``/``"v3"``).
    :param preallocation: ``off`` or ``metadata``.
    :param backing_file: stored as given; relative names are relative to the new image.
    :param durable: end with an fdatasync of the file.  ``False``: the caller must make the
        file durable (:func:`sync_file`) before anything refers to it (QMP overlays sync it
        while they open it).
    :raises BlockError: an invalid option combination, with QEMU's message.
    """
    from emu.block.node import BlockGraph, resolve_backing_path

    cluster_size = _parse_size(cluster_size)
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise BlockError("Cluster size must be a power of two between 512 and 2048k")
    cluster_bits = cluster_size.bit_length() - 1
    versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise BlockError(f"Invalid parameter value for 'compat': '{compat}'")
    version = versions[compat]
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise BlockError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise BlockError("Different refcount widths than 16 bits require compatibility level 1.1 "
                         "or above (use compat=1.1 or greater)")
    if version < 3 and lazy_refcounts:
        raise BlockError("Lazy refcounts only supported with compatibility level 1.1 and above "
                         "(use compat=1.1 or greater)")
    if preallocation not in PREALLOC_MODES:
        raise BlockError(f"Invalid parameter value for 'preallocation': '{preallocation}'")
    if backing_fmt and not backing_file:
        raise BlockError("Backing format cannot be used without backing file")
    if backing_file and preallocation != "off":
        raise BlockError("Backing file and preallocation can only be used at the same time if "
                         "extended_l2 is on")
    if backing_file and (size is None or backing_fmt is None):
        g = BlockGraph()
        try:
            b = g.open_image(resolve_backing_path(filename, backing_file), backing_fmt,
                             read_only=True, force_share=True, backing=None)
            if size is None:
                size = b.size
            backing_fmt = backing_fmt or b.drv
        finally:
            g.close_all()
    if size is None:
        raise BlockError("Image creation needs a size parameter")
    size = _parse_size(size)
    if size < 0 or size >= f.QCOW2_MAX_SIZE:
        raise BlockError("Image size too large" if size > 0 else "Image size must be positive")
    if size % 512:
        raise BlockError("Image size must be a multiple of 512 bytes")
    order = refcount_bits.bit_length() - 1

    h = initial_header(version, cluster_bits, order, lazy_refcounts)
    per_l1 = 1 << (2 * cluster_bits - 3)
    l1_entries = (size + per_l1 - 1) // per_l1
    l1_clusters = (l1_entries * 8 + cluster_size - 1) // cluster_size
    if (preallocation == "off" and l1_entries * 8 <= f.QCOW_MAX_L1_SIZE
            and 3 + l1_clusters <= (cluster_size * 8) >> order):
        # What opening and growing the image would write, at once: the L1 table at
        # cluster 3 and every cluster so far counted in the first refcount block.
        final = initial_header(version, cluster_bits, order, lazy_refcounts)
        final.size = size
        if l1_entries:
            final.l1_size, final.l1_table_offset = l1_entries, 3 * cluster_size
        if backing_file:
            final.backing_file, final.backing_format = backing_file, backing_fmt
        try:
            header = f.serialize_header(final, cluster_size)
        except ImageFormatError:
            pass    # a backing name too long for the header: fails as QEMU's does, below
        else:
            _write_image(filename, header, final, 3 + l1_clusters, l1_entries * 8, durable)
            return
    create_by_growing(filename, h, size, backing_file, backing_fmt, preallocation, durable)


def initial_header(version: int, cluster_bits: int, refcount_order: int,
                   lazy_refcounts: bool) -> f.QCowHeader:
    """The header of a new image of size 0: refcount table at cluster 1, no L1 table."""
    return f.QCowHeader(version=version, cluster_bits=cluster_bits, size=0,
                        refcount_table_offset=1 << cluster_bits, refcount_table_clusters=1,
                        refcount_order=refcount_order,
                        compatible_features=f.QCOW2_COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0)


def create_by_growing(filename: str, h: f.QCowHeader, size: int, backing_file: str | None,
                      backing_fmt: str | None, preallocation: str, durable: bool) -> None:
    """QEMU's way: write an empty image (header ``h`` of size 0), open it, grow it to
    ``size``, record the backing file, preallocate; any layout (checked arguments)."""
    from emu.block.node import BlockGraph

    _write_image(filename, f.serialize_header(h, h.cluster_size), h, 3, 0, False)
    g = BlockGraph()
    try:
        # Nothing refers to the new file yet, so the ordering barriers inside truncate and
        # set_backing protect nothing (a crash leaves a half-made file either way): skip
        # them (cache=unsafe) and make the finished image durable with one fdatasync.
        bs = g.open_image(filename, "qcow2", backing=None, cache="unsafe")
        drv = bs.impl
        drv.truncate(size)
        if backing_file:
            drv.set_backing(backing_file, backing_fmt)
        if preallocation == "metadata":
            drv.preallocate_metadata()
        bs.flush()
    finally:
        g.close_all()
    if durable:
        sync_file(filename)


def _write_image(filename: str, header: bytes, h: f.QCowHeader, counted: int, tail: int,
                 durable: bool) -> None:
    """Write the header cluster (``header``, serialized ``h``), the refcount table (cluster
    1) and block (cluster 2, ``counted`` clusters in use) and ``tail`` zero bytes after
    them, in one ``pwrite``."""
    cluster_size = h.cluster_size
    reftable = struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8)
    refblock = bytearray(cluster_size)
    for c in range(counted):
        f.write_refcount(refblock, c, h.refcount_order, 1)
    try:
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ImageOpenError(f"Could not create '{filename}': {os.strerror(err.errno)}") from err
    try:
        data = b"".join((header, bytes(cluster_size - len(header)), reftable, refblock,
                         bytes(tail)))
        done = 0
        while done < len(data):
            done += os.pwrite(fd, memoryview(data)[done:], done)
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def sync_file(filename: str) -> None:
    """fdatasync ``filename`` (a file this process wrote through another descriptor)."""
    fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)

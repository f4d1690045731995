"""Block nodes (QEMU's BlockDriverState), the node graph, the driver table and image locking.

A :class:`BlockDriverState` is one node: a format (``qcow2``, ``raw``), a protocol (``file``)
or a filter (``blkdebug``).  Format nodes have a ``file`` child (the protocol node holding
their bytes) and optionally a ``backing`` node.  The :class:`BlockGraph` owns every node,
names them (``#block<N>`` when unnamed, as QEMU does) and opens images with format probing.

Drivers register in one table with :func:`register_driver`; a driver class implements the
:class:`BlockDriver` interface and is instantiated once per node.

Locking follows QEMU's file-posix: open file description (OFD) read locks on byte
``100 + perm_bit`` for each permission a node holds and ``200 + perm_bit`` for each it
does not share, so emu and QEMU see each other's locks.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import struct
import threading
from typing import Any, Callable, ClassVar, Iterable

from emu.errors import BlockError, ImageFormatError, ImageOpenError

# --- permissions and locks (QEMU include/block/block-common.h, file-posix.c) ---------
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

#: Probe buffer size (QEMU's BLOCK_PROBE_BUF_SIZE).
BLOCK_PROBE_BUF_SIZE = 512
#: Deepest backing chain emu follows before calling it hostile.
MAX_BACKING_DEPTH = 256

_FLOCK = struct.Struct("hhxxxxqqi4x")  # struct flock on Linux x86-64


def _ofd_lock(fd: int, ltype: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0))


def _ofd_conflict(fd: int, ltype: int, start: int) -> bool:
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def apply_perm_locks(fd: int, path: str, perm: int, shared: int) -> None:
    """Take QEMU-compatible permission locks on ``fd`` and check nobody conflicts.

    :param perm: ``BLK_PERM_*`` bits this opener needs.
    :param shared: ``BLK_PERM_*`` bits this opener lets others have.
    :raises ImageOpenError: with QEMU's text, e.g. ``Failed to get "write" lock``.
    """
    hint = f"Is another process using the image [{path}]?"
    try:
        for i in range(len(PERM_NAMES)):
            bit = 1 << i
            if perm & bit:
                _ofd_lock(fd, fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + i)
            else:
                _ofd_lock(fd, fcntl.F_UNLCK, RAW_LOCK_PERM_BASE + i)
            if not shared & bit:
                _ofd_lock(fd, fcntl.F_RDLCK, RAW_LOCK_SHARED_BASE + i)
            else:
                _ofd_lock(fd, fcntl.F_UNLCK, RAW_LOCK_SHARED_BASE + i)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOTSUP):
            return  # file system without OFD locks: QEMU's locking=auto skips too
        raise ImageOpenError(f"Failed to lock byte: {os.strerror(err.errno)}") from err
    for i, name in enumerate(PERM_NAMES):
        bit = 1 << i
        # Someone who does not share what we want holds the "shared" byte.
        if perm & bit and _ofd_conflict(fd, fcntl.F_WRLCK, RAW_LOCK_SHARED_BASE + i):
            raise ImageOpenError(f'Failed to get "{name}" lock\n{hint}')
        # Someone holds a permission we refuse to share.
        if not shared & bit and _ofd_conflict(fd, fcntl.F_WRLCK, RAW_LOCK_PERM_BASE + i):
            raise ImageOpenError(f'Failed to get shared "{name}" lock\n{hint}')


def release_locks(fd: int) -> None:
    """Drop every permission lock byte held through ``fd``."""
    try:
        _ofd_lock(fd, fcntl.F_UNLCK, RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE + 100 - RAW_LOCK_PERM_BASE)
    except OSError:
        pass


# --- driver table -----------------------------------------------------------------------
class BlockDriver:
    """Interface of a driver instance bound to one node.

    Subclasses set :attr:`format_name`, :attr:`is_protocol` / :attr:`is_filter`, and
    implement what they support; unsupported operations raise :class:`BlockError`.
    """

    format_name: ClassVar[str] = ""
    is_protocol: ClassVar[bool] = False
    #: Requests past the end are allowed (protocols grow; formats never do).
    can_grow: bool = False
    is_filter: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    supports_snapshots: ClassVar[bool] = False
    #: ``write`` accepts any bytes-like object (a ``memoryview`` slice of the caller's buffer)
    #: and is done with it on return; other drivers get ``bytes`` (a copy when needed).
    takes_buffers: ClassVar[bool] = False

    def __init__(self, bs: "BlockDriverState") -> None:
        self.bs = bs

    def open(self, options: dict[str, Any]) -> None:
        """Open with driver options (after ``bs.file`` was set up for format drivers)."""

    @property
    def size(self) -> int:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (drivers that can fill a
        caller's buffer without an intermediate copy override this)."""
        buf[:] = self.read(offset, len(buf))

    def write(self, offset: int, data: bytes) -> None:
        raise BlockError(f"Driver '{self.format_name}' does not support writing")

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        """Discard is advisory: drivers that cannot do it ignore it, as QEMU does."""

    def flush(self) -> None:
        if self.bs.file is not None:
            self.bs.file.flush()

    def drain_metadata(self) -> None:
        """Write back cached metadata so other processes see every completed write."""
        self.flush()

    def truncate(self, size: int) -> None:
        raise BlockError(f"Image format '{self.format_name}' does not support resizing")

    def close(self) -> None:
        pass

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        """Return ``(kind, length, host_offset)`` for the extent at ``offset``.

        ``kind`` is ``"data"``, ``"zero"`` (reads as zeroes here), ``"unallocated"``
        (defer to backing) or ``"zero-unallocated"`` (not allocated, no backing: zeroes).
        """
        return "data", length, offset

    def actual_size(self) -> int:
        return self.bs.file.impl.actual_size() if self.bs.file is not None else 0

    @property
    def cluster_size(self) -> int | None:
        """QEMU's BlockDriverInfo.cluster_size, ``None`` when the driver has none.  ``raw``
        answers with its file child's (QEMU's raw_co_get_info), e.g. an RBD object size."""
        own = self.__dict__.get("_cluster_size")
        if own is not None:
            return own
        if self.format_name == "raw" and self.bs.file is not None:
            return getattr(self.bs.file.impl, "cluster_size", None)
        return None

    @cluster_size.setter
    def cluster_size(self, value: int | None) -> None:
        # Drivers that learn their cluster size at open time assign it.
        self.__dict__["_cluster_size"] = value

    def info_specific(self) -> dict | None:
        return None

    def dirty_flag(self) -> bool:
        return False

    def stats(self) -> dict[str, Any]:
        """Driver-specific counters for :attr:`BlockDriverState.stats` (none by default)."""
        return {}


class DriverEntry:
    """One row of the driver table."""

    def __init__(self, name: str, cls: type[BlockDriver], probe: Callable[[bytes, str], int] | None):
        self.name, self.cls, self.probe = name, cls, probe


DRIVERS: dict[str, DriverEntry] = {}


def register_driver(name: str, probe: Callable[[bytes, str], int] | None = None):
    """Class decorator: add a :class:`BlockDriver` to the table under ``name``.

    :param probe: ``probe(first_bytes, filename) -> score`` for format probing (higher wins).
    """
    def deco(cls: type[BlockDriver]) -> type[BlockDriver]:
        cls.format_name = name
        DRIVERS[name] = DriverEntry(name, cls, probe)
        return cls
    return deco


#: Drivers imported only when asked for by name or when the whole table is wanted: their
#: modules (configparser, logging) would cost every emu-img command's start-up.
_OPTIONAL_DRIVERS = {"blkdebug": "emu.block.drivers.blkdebug", "rbd": "emu.block.drivers.rbd"}


def _load_drivers(name: str | None = None) -> None:
    """Import (so register) the drivers: the core ones always, the optional ones all when
    ``name`` is ``None``, else only ``name`` if it is one."""
    # Done lazily to keep import order simple.  rbd is cheap to import: librbd/librados
    # load only when an rbd node opens.
    from emu.block.drivers import file, raw  # noqa: F401
    from emu.block.qcow2 import driver  # noqa: F401
    if name is None:
        for mod in _OPTIONAL_DRIVERS.values():
            importlib.import_module(mod)
    elif name in _OPTIONAL_DRIVERS and name not in DRIVERS:
        importlib.import_module(_OPTIONAL_DRIVERS[name])


def probe_format(buf: bytes, filename: str) -> str:
    """The best format for ``buf`` (QEMU's bdrv_probe_all): ``raw`` if nothing else claims it."""
    _load_drivers("")  # the optional drivers do not probe
    best, score = "raw", 0
    for entry in DRIVERS.values():
        if entry.probe is not None:
            s = entry.probe(buf, filename)
            if s > score:
                best, score = entry.name, s
    return best


# --- nodes --------------------------------------------------------------------------------
class SnapshotTicket:
    """A snapshot between :meth:`BlockDriverState.snapshot_create_begin` and its finish.
    (A plain class: importing dataclasses would cost every emu-img start-up ~15 ms.)"""

    def __init__(self, node: "BlockDriverState", pending: Any, info: dict | None) -> None:
        self.node = node            #: the node whose driver holds the snapshot
        self.pending = pending      #: the driver's pending snapshot (``None``: made at begin)
        self.info = info            #: SnapshotInfo once made


class BlockDriverState:
    """One node of the block graph.

    :ivar node_name: unique name in the graph (``#block<N>`` when auto-assigned).
    :ivar drv: driver (format or protocol) name.
    :ivar filename: the file name as given (protocol filename for format nodes).
    :ivar file: protocol child or ``None``.
    :ivar backing: backing node or ``None``.
    :ivar read_only: whether writes are refused.
    """

    def __init__(self, graph: "BlockGraph", drv: str, node_name: str, *, filename: str = "",
                 read_only: bool = False, force_share: bool = False,
                 cache_direct: bool = False, cache_no_flush: bool = False) -> None:
        self.graph = graph
        self.drv = drv
        self.node_name = node_name
        self.filename = filename
        self.file: BlockDriverState | None = None
        self.backing: BlockDriverState | None = None
        self.read_only = read_only
        self.force_share = force_share
        self.cache_direct = cache_direct
        self.cache_no_flush = cache_no_flush
        #: QEMU's write cache flag; off (writethrough/directsync) flushes after every write.
        self.cache_writeback = True
        #: ``fn(offset, length)`` called (under the node lock) before any write, zero-write or
        #: discard changes the node's content: copy-before-write for backup jobs.
        self.before_write: list[Callable[[int, int], None]] = []
        #: What the image header named as backing (may differ from backing.filename).
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.options: dict[str, Any] = {}
        self.impl: BlockDriver = DRIVERS[drv].cls(self)
        #: Serialises requests on this node; drivers keep shared state (caches).
        self.lock = threading.RLock()
        self.parents = 0
        self.closed = False
        #: Set once the driver's open() succeeded; a half-opened node is closed without flushing.
        self.opened = False
        #: Opened implicitly as a child (protocol, backing named in the header, inline dict):
        #: it goes away with its last parent.  Nodes the user opened stay until removed.
        self.auto = False
        #: Highest byte offset + 1 any write or zero-write on this node reached (QEMU's
        #: bs->wr_highest_offset: guest offsets on format nodes, host offsets on protocol
        #: nodes, including metadata writes).
        self.wr_highest_offset = 0

    @property
    def stats(self) -> dict[str, Any]:
        """Node-level statistics, as QEMU keeps them per node (a fresh dict per call):
        ``wr_highest_offset``, plus the driver's own counters (``file``: ``discard-nb-ok``,
        ``discard-nb-failed``, ``discard-bytes-ok``, QEMU's BlockStatsSpecificFile).
        Request counts and times live in :attr:`emu.block.api.BlockBackend.stats`."""
        d: dict[str, Any] = {"wr_highest_offset": self.wr_highest_offset}
        d.update(self.impl.stats())
        return d

    # --- I/O ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.impl.size

    def _check_request(self, offset: int, length: int, write: bool) -> None:
        if self.closed:
            raise BlockError(f"Node '{self.node_name}' is closed")
        if offset < 0 or length < 0:
            raise BlockError(f"Invalid request: offset {offset} length {length}")
        if not self.impl.can_grow and offset + length > self.size:
            raise BlockError(f"Request out of range: offset {offset} length {length} "
                             f"beyond the end of '{self.node_name}' ({self.size} bytes)")
        if write and self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at guest ``offset``."""
        self._check_request(offset, length, False)
        if length == 0:
            return b""
        with self.lock:
            return self.impl.read(offset, length)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes at guest ``offset`` into the writable buffer ``buf``
        (bulk copies reuse one buffer instead of allocating each request's bytes)."""
        length = len(buf)
        self._check_request(offset, length, False)
        if length:
            with self.lock:
                self.impl.read_into(offset, buf)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` (any bytes-like object; not kept after return) at guest ``offset``."""
        self._check_request(offset, len(data), True)
        if data:
            if not (self.impl.takes_buffers or type(data) is bytes):
                data = bytes(data)
            self._write_locked(offset, len(data), lambda: self.impl.write(offset, data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes (cheaply when the format can)."""
        self._check_request(offset, length, True)
        if length:
            self._write_locked(offset, length, lambda: self.impl.write_zeroes(offset, length))

    def _write_locked(self, offset: int, length: int, op: Callable[[], None]) -> None:
        """The one write path: copy-before-write hooks, the write, the highest offset, and
        write-through (QEMU gives every write, zero writes included, FUA when the cache is off)."""
        with self.lock:
            for fn in list(self.before_write):
                fn(offset, length)
            try:
                op()
            finally:
                self._note_write(offset + length)
            if not self.cache_writeback:
                self.impl.flush()

    def _note_write(self, end: int) -> None:
        if end > self.wr_highest_offset:
            self.wr_highest_offset = end

    def discard(self, offset: int, length: int) -> None:
        """Advisory discard; the range then reads as zeroes or as the backing file."""
        self._check_request(offset, length, True)
        if length:
            with self.lock:
                for fn in list(self.before_write):
                    fn(offset, length)
                self.impl.discard(offset, length)

    def flush(self) -> None:
        """Write back caches and ask the host to make everything durable."""
        if self.closed:
            return
        with self.lock:
            self.impl.flush()

    def drain_metadata(self) -> None:
        """Write back cached metadata of this node and its children (used by drain)."""
        with self.lock:
            self.impl.drain_metadata()
        if self.backing is not None and not self.backing.read_only:
            self.backing.drain_metadata()

    def reopen(self, read_only: bool) -> None:
        """Switch this node and its protocol child between read-only and read-write
        (QEMU's bdrv_reopen, e.g. for commit into a backing file).

        :raises ImageOpenError: another process holds a conflicting lock.
        """
        if read_only == self.read_only:
            return
        if read_only and self.force_share is False and not self.read_only:
            self.flush()
        if not read_only and self.force_share:
            raise BlockError("force-share=on can only be used with read-only images")
        with self.lock:
            if self.file is not None:
                self.file.reopen(read_only)
            if hasattr(self.impl, "reopen"):
                self.impl.reopen(read_only)
            self.read_only = read_only
            if self.impl.is_protocol or self.impl.is_filter:
                return
            # Format drivers re-read their metadata in the new mode.
            try:
                self.impl.open(dict(self.options))
            except BaseException:
                self.read_only = not read_only
                if self.file is not None:
                    self.file.reopen(not read_only)
                raise

    def set_read_only(self, read_only: bool) -> None:
        """Make this node (and its protocol child) read-only or read-write: the public way
        to flip ``read_only`` (QEMU's bdrv_reopen_set_read_only, which blockdev-snapshot-sync
        applies to the old active layer).  Do not assign ``read_only`` directly: this also
        writes back cached metadata, re-opens the file descriptor with QEMU's permission
        locks for the new mode (so ``qemu-img`` can open a now read-only image), and has the
        format driver re-read its metadata.  A no-op when the mode is already right.

        :raises ImageOpenError: another process holds a conflicting lock (nothing changes).
        :raises BlockError: ``force-share=on`` nodes cannot become read-write.
        """
        self.reopen(read_only)

    def truncate(self, size: int) -> None:
        """Resize (grow) the node."""
        if self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")
        with self.lock:
            self.impl.truncate(size)

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        """See :meth:`BlockDriver.block_status`."""
        with self.lock:
            return self.impl.block_status(offset, min(length, self.size - offset))

    def read_backing(self, offset: int, length: int) -> bytes:
        """Read from the backing node, zero-filled past its end (used by format drivers)."""
        if self.backing is None:
            return bytes(length)
        bsize = self.backing.size
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = self.backing.read(offset, n)
        return data + bytes(length - n)

    def actual_size(self) -> int:
        """Bytes the image occupies on the host (QEMU's actual-size)."""
        return self.impl.actual_size()

    # --- snapshots ---------------------------------------------------------------------
    def snapshot_target(self) -> "BlockDriverState | None":
        """The node whose driver takes this node's snapshot calls, or ``None``.

        QEMU's bdrv_snapshot_fallback: a driver without snapshots hands them to its only
        child (``file``), so ``raw`` on ``rbd`` snapshots the RBD image.  A node that also
        has a backing child does not fall back (QEMU refuses when there are other children).
        """
        n: BlockDriverState | None = self
        while n is not None:
            if n.impl.supports_snapshots:
                return n
            if n.backing is not None:
                return None
            n = n.file
        return None

    @property
    def supports_snapshots(self) -> bool:
        """Whether internal snapshots work here, directly or through the fallback child
        (QEMU's bdrv_can_snapshot)."""
        return self.snapshot_target() is not None

    def _snap_impl(self):
        target = self.snapshot_target()
        if target is None:
            raise BlockError(f"Block format '{self.drv}' used by device '{self.node_name}' "
                             "does not support internal snapshots")
        return target

    def snapshot_list(self) -> list[dict]:
        """Snapshots as QEMU's SnapshotInfo dicts (id, name, vm-state-size, date-*, vm-clock-*)."""
        target = self.snapshot_target()
        if target is None:
            return []
        with target.lock:
            return target.impl.snapshot_list()

    def snapshot_create(self, name: str, vm_clock_ns: int = 0, date: float | None = None,
                        vm_state_size: int = 0, snapshot_id: str | None = None,
                        icount: int | None = None) -> dict:
        """Create an internal snapshot; returns its SnapshotInfo.

        :param snapshot_id: explicit id; default: the highest numeric id + 1, as QEMU.
        :param icount: ``None`` (QMP: no icount) or a value (``qemu-img snapshot -c`` stores 0).
        """
        target = self._snap_impl()
        if self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")
        with target.lock:
            return target.impl.snapshot_create(name, vm_clock_ns=vm_clock_ns, date=date,
                                        vm_state_size=vm_state_size, snapshot_id=snapshot_id,
                                        icount=icount)

    def snapshot_create_begin(self, name: str, vm_clock_ns: int = 0) -> "SnapshotTicket":
        """First half of :meth:`snapshot_create` for a drained node: the cut, no waiting on
        the disk (qcow2: O(L1), see :mod:`emu.block.qcow2.snapshot`).  Follow with
        :meth:`snapshot_create_finish` (guest requests may run in between) or, before any
        request ran, :meth:`snapshot_create_cancel`.  Drivers without the split create the
        whole snapshot here."""
        target = self._snap_impl()
        if self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")
        with target.lock:
            begin = getattr(target.impl, "snapshot_create_begin", None)
            if begin is None:
                return SnapshotTicket(target, None, target.impl.snapshot_create(
                    name, vm_clock_ns=vm_clock_ns))
            return SnapshotTicket(target, begin(name, vm_clock_ns=vm_clock_ns), None)

    def snapshot_create_finish(self, ticket: "SnapshotTicket") -> dict:
        """Make a begun snapshot durable; returns its SnapshotInfo.  Takes the node lock
        only between waits on the disk."""
        if ticket.info is None:
            ticket.info = ticket.node.impl.snapshot_create_finish(ticket.pending, ticket.node.lock)
        return ticket.info

    def snapshot_create_cancel(self, ticket: "SnapshotTicket") -> None:
        """Undo a begun snapshot (drained, nothing ran since begin); a driver without the
        split deletes the snapshot it made."""
        with ticket.node.lock:
            if ticket.pending is not None:
                ticket.node.impl.snapshot_create_cancel(ticket.pending)
            elif ticket.info is not None:
                ticket.node.impl.snapshot_delete(ticket.info["id"], ticket.info["name"])

    def snapshot_delete(self, snapshot_id: str | None = None, name: str | None = None) -> dict:
        """Delete the snapshot matching id and/or name; returns the deleted SnapshotInfo."""
        target = self._snap_impl()
        if self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")
        with target.lock:
            return target.impl.snapshot_delete(snapshot_id, name)

    def snapshot_goto(self, id_or_name: str) -> dict:
        """Revert the active image to a snapshot (by id first, then name)."""
        target = self._snap_impl()
        if self.read_only:
            raise BlockError(f"Block node '{self.node_name}' is read-only")
        if target is not self:
            self.flush()   # nothing of ours may land on top of the rolled-back image
        with target.lock:
            return target.impl.snapshot_goto(id_or_name)

    # --- info ----------------------------------------------------------------------------
    def full_backing_filename(self) -> str | None:
        if not self.backing_file:
            return None
        return resolve_backing_path(self.filename, self.backing_file)

    def image_info(self, backing_chain: bool = False) -> dict:
        """QEMU's ImageInfo for this node (member names and order as ``qemu-img info --output=json``).

        :param backing_chain: add ``backing-image`` recursively (QMP query-block style).
        """
        with self.lock:
            info: dict[str, Any] = {}
            snaps = self.snapshot_list()
            if snaps:
                info["snapshots"] = snaps
            info["virtual-size"] = self.size
            info["filename"] = self.filename
            cs = self.impl.cluster_size
            if cs:
                info["cluster-size"] = cs
            info["format"] = self.drv
            leaf = self
            while leaf.file is not None:
                leaf = leaf.file
            # rbd has no allocated-size query: QEMU gets -ENOTSUP and leaves actual-size out.
            if leaf.drv != "rbd":
                info["actual-size"] = self.impl.actual_size()
            specific = self.impl.info_specific()
            if specific is not None:
                info["format-specific"] = specific
            if self.backing_file:
                info["full-backing-filename"] = self.full_backing_filename()
                info["backing-filename"] = self.backing_file
                if self.backing_format:
                    info["backing-filename-format"] = self.backing_format
            info["dirty-flag"] = self.impl.dirty_flag()
        if backing_chain and self.backing is not None:
            info["backing-image"] = self.backing.image_info(True)
        return info

    def backing_chain(self) -> list["BlockDriverState"]:
        """This node followed by its backing nodes, top first."""
        chain, n = [], self
        while n is not None:
            chain.append(n)
            n = n.backing
        return chain

    def close(self) -> None:
        """Flush and close this node only (children are closed by :meth:`BlockGraph.remove`)."""
        if self.closed:
            return
        try:
            if not self.read_only and self.opened:
                self.flush()
        finally:
            self.closed = True
            if self.opened:
                self.impl.close()
            elif hasattr(self.impl, "fd") and getattr(self.impl, "fd", -1) >= 0:
                self.impl.close()

    def __repr__(self) -> str:
        return f"<BlockDriverState {self.node_name} {self.drv} {self.filename!r}>"


def resolve_backing_path(overlay_filename: str, backing: str) -> str:
    """QEMU's path_combine: a relative backing name is relative to the overlay's directory."""
    if os.path.isabs(backing) or ":" in backing.split("/", 1)[0] or not overlay_filename:
        return backing
    d = os.path.dirname(overlay_filename)
    return os.path.join(d, backing) if d else backing


_UNSET: Any = object()

#: Size of QEMU's BlockDriverState.node_name buffer (names must be shorter).
NODE_NAME_SIZE = 32


class InvalidNodeNameError(BlockError):
    """A node name QEMU would refuse (bad characters, too long)."""


class NodeNameInUseError(BlockError):
    """A node name that already names a node or a device."""


def is_wellformed_id(name: str) -> bool:
    """QEMU's id_wellformed(): an ASCII letter, then ASCII letters, digits, ``-``, ``.``, ``_``."""
    if not name or not ("a" <= name[0].lower() <= "z"):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in name[1:])


class BlockGraph:
    """All nodes of one emulator (or one emu-img run), by node name."""

    def __init__(self) -> None:
        self._nodes: list[BlockDriverState] = []
        self._counter = 0
        self._lock = threading.RLock()

    # --- names ---------------------------------------------------------------------------
    def _auto_name(self) -> str:
        # QEMU's id_generate(): "#block" + counter (from 0) + two random digits.
        while True:
            # (os.urandom, not the random module: importing that costs every emu-img ~3 ms)
            name = f"#block{self._counter}{int.from_bytes(os.urandom(2), 'little') % 100:02d}"
            self._counter += 1
            if self.lookup(name) is None:
                return name

    def check_node_name(self, name: str, device_names: Iterable[str] = ()) -> None:
        """Check a user-chosen node name as QEMU's bdrv_assign_node_name does, in its order,
        without creating anything (QMP calls it before creating an overlay file).

        :param device_names: BlockBackend/device names the node name must not equal.
        :raises InvalidNodeNameError: ``Invalid node-name: '<name>'`` (not ASCII letter first,
            then letters, digits, ``-``, ``.``, ``_``).
        :raises NodeNameInUseError: ``node-name=<name> is conflicting with a device id`` or
            ``Duplicate nodes with node-name='<name>'``.
        :raises InvalidNodeNameError: ``Node name too long`` (32 bytes or more).
        """
        if not is_wellformed_id(name):
            raise InvalidNodeNameError("Invalid node-name: '%s'" % name)
        if name in set(device_names):
            raise NodeNameInUseError(f"node-name={name} is conflicting with a device id")
        if self.lookup(name) is not None:
            raise NodeNameInUseError(f"Duplicate nodes with node-name='{name}'")
        if len(name.encode()) >= NODE_NAME_SIZE:
            raise InvalidNodeNameError("Node name too long")

    def node_name_in_use(self, name: str) -> bool:
        """Whether a node called ``name`` exists (QMP's "New overlay node-name already in use")."""
        return self.lookup(name) is not None

    def _check_name(self, name: str) -> None:
        self.check_node_name(name)

    def lookup(self, node_name: str) -> BlockDriverState | None:
        """The node named ``node_name`` or ``None``."""
        for n in self._nodes:
            if n.node_name == node_name:
                return n
        return None

    def nodes(self) -> list[BlockDriverState]:
        """Every node, newest first (QEMU's query-named-block-nodes order)."""
        return list(reversed(self._nodes))

    def _new_node(self, drv: str, node_name: str | None, **kw: Any) -> BlockDriverState:
        _load_drivers(drv)
        if drv not in DRIVERS:
            raise BlockError(f"Unknown driver '{drv}'")
        with self._lock:
            if node_name is None:
                node_name = self._auto_name()
            else:
                self._check_name(node_name)
            bs = BlockDriverState(self, drv, node_name, **kw)
            self._nodes.append(bs)
        return bs

    def _drop(self, bs: BlockDriverState) -> None:
        with self._lock:
            if bs in self._nodes:
                self._nodes.remove(bs)

    # --- opening -------------------------------------------------------------------------
    def open_protocol(self, filename: str, *, read_only: bool = False, force_share: bool = False,
                      node_name: str | None = None, cache: str | None = None,
                      driver: str = "file", extra: dict | None = None) -> BlockDriverState:
        """Open a protocol node (``file``, or a ``blkdebug:`` / ``rbd:`` filename).

        An ``rbd`` node's filename becomes QEMU's ``json:`` form of its options.
        """
        direct, no_flush = parse_cache_mode(cache)
        if filename.startswith("blkdebug:"):
            driver = "blkdebug"
        elif filename.startswith("rbd:"):
            driver = "rbd"
        bs = self._new_node(driver, node_name, filename=filename, read_only=read_only,
                            force_share=force_share, cache_direct=direct, cache_no_flush=no_flush)
        opts = {"filename": filename}
        opts.update(extra or {})
        try:
            bs.impl.open(opts)
            bs.opened = True
        except BaseException:
            self._drop(bs)
            raise
        _json_filename(bs)
        return bs

    def open_image(self, filename: str, fmt: str | None = None, *, read_only: bool = False,
                   force_share: bool = False, node_name: str | None = None, cache: str | None = None,
                   backing: Any = _UNSET, options: dict | None = None,
                   _seen: frozenset[str] = frozenset()) -> BlockDriverState:
        """Open ``filename`` as a format node on a protocol node (QEMU's bdrv_open).

        :param fmt: format name; probed (qcow2 or raw) when ``None``.
        :param force_share: ``-U``: take no locks that refuse other writers (read-only only).
        :param cache: QEMU cache mode (``writeback``, ``none``, ``directsync``, ``writethrough``, ``unsafe``).
        :param backing: by default the backing file named in the image is opened (read-only);
            ``None`` opens no backing; a node uses that node.
        :param options: extra driver options (e.g. raw ``offset``/``size``).
        :raises ImageOpenError: file cannot be opened or locked.
        :raises ImageFormatError: the image is corrupt or unsupported.
        """
        if force_share and not read_only:
            raise BlockError("force-share=on can only be used with read-only images")
        if fmt is not None:
            _load_drivers(fmt)
            if fmt not in DRIVERS or DRIVERS[fmt].cls.is_protocol:
                raise BlockError(f"Unknown driver '{fmt}'")
        # Pseudo-protocol names (blkdebug:, rbd:) are not paths: compare them as given.
        key = filename if filename.startswith(("blkdebug:", "rbd:")) else os.path.realpath(filename)
        if key in _seen:
            raise ImageFormatError(f"Backing file chain has a loop: '{filename}' is its own backing file")
        if len(_seen) >= MAX_BACKING_DEPTH:
            raise ImageFormatError(f"Backing chain of '{filename}' is too deep")
        proto_extra = None
        if options and "auto-read-only" in options:
            # QEMU's auto-read-only (-drive sets it): an rbd @snap then opens read-only.
            options = dict(options)
            proto_extra = {"auto-read-only": options.pop("auto-read-only")}
        proto = self.open_protocol(filename, read_only=read_only, force_share=force_share, cache=cache,
                                   extra=proto_extra)
        read_only = read_only or proto.read_only
        try:
            if fmt is None:
                head = proto.read(0, min(BLOCK_PROBE_BUF_SIZE, proto.size))
                fmt = probe_format(head, filename)
            bs = self._new_node(fmt, node_name, filename=_format_filename(fmt, proto, filename),
                                read_only=read_only, force_share=force_share,
                                cache_direct=proto.cache_direct, cache_no_flush=proto.cache_no_flush)
            bs.cache_writeback = cache_writeback(cache)
        except BaseException:
            self.remove(proto)
            raise
        bs.file = proto
        proto.auto = True
        proto.parents += 1
        try:
            bs.options = dict(options or {})
            bs.impl.open(dict(options or {}))
            bs.opened = True
            if bs.impl.supports_backing and bs.backing_file and backing is _UNSET:
                bpath = bs.full_backing_filename()
                bs.backing = self.open_image(bpath, bs.backing_format, read_only=True,
                                             force_share=force_share, cache=cache,
                                             _seen=_seen | {key})
                bs.backing.auto = True
                bs.backing.parents += 1
            elif isinstance(backing, BlockDriverState):
                bs.backing = backing
                backing.parents += 1
        except BaseException:
            self.remove(bs)
            raise
        return bs

    def blockdev_add(self, options: dict[str, Any]) -> BlockDriverState:
        """Create a node from QMP blockdev-add's options dict.

        Understood: ``driver``, ``node-name``, ``read-only``, ``force-share``,
        ``cache`` ({``direct``, ``no-flush``}), ``file`` (dict or node name), ``backing``
        (dict, node name or ``None``), ``filename`` (file), ``offset``/``size`` (raw),
        blkdebug's ``image``/``config``/``inject-error``/``set-state``.
        """
        opts = dict(options)
        drv = opts.pop("driver", None)
        if drv is None:
            raise BlockError("Parameter 'driver' is missing")
        _load_drivers(drv)
        if drv not in DRIVERS:
            raise BlockError(f"Parameter 'driver' does not accept value '{drv}'")
        node_name = opts.pop("node-name", None)
        read_only = bool(opts.pop("read-only", False))
        force_share = bool(opts.pop("force-share", False))
        cache = opts.pop("cache", {}) or {}
        direct, no_flush = bool(cache.get("direct", False)), bool(cache.get("no-flush", False))
        entry = DRIVERS[drv]
        if entry.cls.is_protocol:
            if drv == "rbd":
                opts = rbd_connect_options(opts)
            # rbd names its image by pool/image/... options; the driver checks them.
            if "filename" not in opts and drv != "rbd":
                raise BlockError("Parameter 'filename' is missing")
            bs = self._new_node(drv, node_name, filename=opts.get("filename", ""), read_only=read_only,
                                force_share=force_share, cache_direct=direct, cache_no_flush=no_flush)
            try:
                bs.impl.open(opts)
                bs.opened = True
            except BaseException:
                self._drop(bs)
                raise
            _json_filename(bs, set(opts))
            return bs
        child = opts.pop("file", None) if drv != "blkdebug" else opts.pop("image", opts.pop("file", None))
        if child is None:
            raise BlockError("Parameter 'file' is missing" if drv != "blkdebug" else
                             "Parameter 'image' is missing")
        if isinstance(child, str):
            fnode = self.lookup(child)
            if fnode is None:
                raise BlockError(f"Cannot find device='' nor node-name='{child}'")
        else:
            copts = dict(child)
            copts.setdefault("read-only", read_only)
            copts.setdefault("cache", cache)
            if force_share:
                copts.setdefault("force-share", True)
            fnode = self.blockdev_add(copts)
            fnode.auto = True
        bs = self._new_node(drv, node_name, filename=_format_filename(drv, fnode, fnode.filename),
                            read_only=read_only,
                            force_share=force_share, cache_direct=direct, cache_no_flush=no_flush)
        bs.file = fnode
        fnode.parents += 1
        backing = opts.pop("backing", _UNSET)
        bs.options = dict(opts)
        try:
            bs.impl.open(opts)
            bs.opened = True
            if bs.impl.supports_backing:
                if backing is _UNSET and bs.backing_file:
                    bs.backing = self.open_image(bs.full_backing_filename(), bs.backing_format,
                                                 read_only=True, force_share=force_share)
                    bs.backing.auto = True
                elif isinstance(backing, str):
                    b = self.lookup(backing)
                    if b is None:
                        raise BlockError(f"Cannot find device='' nor node-name='{backing}'")
                    bs.backing = b
                elif isinstance(backing, dict):
                    bs.backing = self.blockdev_add(dict(backing, **{"read-only": True}))
                    bs.backing.auto = True
                if bs.backing is not None:
                    bs.backing.parents += 1
        except BaseException:
            self.remove(bs)
            raise
        return bs

    def remove(self, node: BlockDriverState) -> None:
        """Close ``node`` and drop it from the graph, with children nobody else uses."""
        try:
            node.close()
        finally:
            # The node is gone even if its last flush failed (the error still propagates).
            self._drop(node)
            for child in (node.file, node.backing):
                if child is not None:
                    child.parents -= 1
                    if child.parents <= 0 and child.auto and child in self._nodes:
                        self.remove(child)

    def close_all(self) -> None:
        """Close every node (top nodes first)."""
        first: BaseException | None = None
        for n in self.nodes():
            if n.parents <= 0 and n in self._nodes:  # top nodes; their children follow
                try:
                    self.remove(n)
                except BlockError as err:
                    first = first or err
        if first is not None:
            raise first


def rbd_connect_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Turn blockdev-add's ``rbd`` members that are RADOS settings into the driver's
    ``key-value-pairs``, as QEMU's qemu_rbd_connect does: ``server`` -> ``mon_host``
    (``host:port`` joined by ``;``, IPv6 hosts in brackets), ``auth-client-required`` ->
    ``auth_client_required`` (modes joined by ``;``).

    :raises ImageOpenError: ``key-secret`` / ``encrypt`` name a secret object; emu has no
        ``secret`` objects, so QEMU's lookup failure ``No secret with id '<id>'`` is the answer.
    """
    opts = dict(opts)
    secret = opts.pop("key-secret", None)
    if secret is not None:
        raise ImageOpenError(f"No secret with id '{secret}'")
    enc = opts.pop("encrypt", None)
    if enc is not None:
        raise ImageOpenError(f"No secret with id '{(enc or {}).get('key-secret', '')}'")
    pairs = list(opts.pop("key-value-pairs", ()))
    servers = opts.pop("server", None)
    if servers:
        hosts = []
        for srv in servers:
            host, port = str(srv["host"]), str(srv["port"])
            hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        pairs.append(("mon_host", ";".join(hosts)))
    modes = opts.pop("auth-client-required", None)
    if modes:
        pairs.append(("auth_client_required", ";".join(modes)))
    if pairs:
        opts["key-value-pairs"] = pairs
    return opts


def _json_filename(bs: BlockDriverState, given: set[str] | None = None) -> None:
    # A protocol node without a plain filename (rbd) shows QEMU's json: form of its options.
    spec = getattr(bs.impl, "json_filename", None)
    if spec is not None:
        import json  # only rbd nodes get here: json costs every emu-img start-up ~5 ms
        bs.filename = "json:" + json.dumps(_given_spec(spec(), given))


def _given_spec(spec: dict[str, Any], given: set[str] | None) -> dict[str, Any]:
    # QEMU's json: filename holds the options the node was opened with: a legacy rbd:
    # name always sets namespace, blockdev-add only when the client gave one.
    if given is not None and "namespace" not in given and not spec.get("namespace"):
        spec = {k: v for k, v in spec.items() if k != "namespace"}
    return spec


def _format_filename(fmt: str, child: BlockDriverState, filename: str) -> str:
    """A format node's filename: its child's, wrapped as QEMU's ``json:{"driver": fmt, "file": ...}``
    when the child's own filename is a ``json:`` one (QEMU's bdrv_refresh_filename)."""
    if getattr(child.impl, "json_filename", None) is None or not child.filename.startswith("json:"):
        return filename
    import json
    return "json:" + json.dumps({"driver": fmt, "file": json.loads(child.filename[5:])})


def parse_cache_mode(cache: str | None) -> tuple[bool, bool]:
    """QEMU's cache modes -> ``(direct, no_flush)``; ``None`` is writeback."""
    modes = {None: (False, False), "writeback": (False, False), "writethrough": (False, False),
             "none": (True, False), "directsync": (True, False), "unsafe": (False, True)}
    if cache not in modes:
        raise BlockError(f"Invalid cache mode '{cache}'")
    return modes[cache]


def cache_writeback(cache: str | None) -> bool:
    """QEMU's write-cache flag: ``False`` for writethrough/directsync (flush after each write)."""
    return cache not in ("writethrough", "directsync")

"""Block commands: queries (query-block, query-named-block-nodes, query-blockstats),
internal snapshots, external snapshots, blockdev-add/-del — on the machine's block graph
(``emu.block.node.BlockGraph``).  Texts are QEMU 7.2's (qmp-golden/error-index.md).

The QAPI types of the backup and transaction arguments are declared here; the commands
that take them are registered once, in :mod:`.jobs` (drive-backup, blockdev-backup) and
:mod:`.transaction`.  The job verbs (block-job-*, job-*) are here.
"""

from __future__ import annotations

import _thread
import json
import os
from typing import Any

from emu.block.bitmaps import bitmap_info_list
from emu.block.qcow2.create import create_qcow2, sync_file
from emu.errors import BlockError, EmuError, QmpError
from emu.img.output import qdict_order
from emu.qmp.commands import CommandContext, command
from emu.qmp.errors import DEVICE_NOT_ACTIVE, desc_of
from emu.qmp.schema import (ANY, BOOL, INT, NULL, STR, Alternate, Enum, List, Struct, Union)

# ------------------------------------------------------------------------ types

SYNC_MODE = Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
BITMAP_SYNC_MODE = Enum("BitmapSyncMode", ["on-success", "never", "always"])
ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])
NEW_IMAGE_MODE = Enum("NewImageMode", ["existing", "absolute-paths"])
PERF = Struct("BackupPerf", [("?use-copy-range", BOOL), ("?max-workers", INT),
                             ("?max-chunk", INT)])
_BACKUP_COMMON = [("?job-id", STR), ("device", STR), ("sync", SYNC_MODE), ("?speed", INT),
                  ("?bitmap", STR), ("?bitmap-mode", BITMAP_SYNC_MODE), ("?compress", BOOL),
                  ("?on-source-error", ON_ERROR), ("?on-target-error", ON_ERROR),
                  ("?auto-finalize", BOOL), ("?auto-dismiss", BOOL),
                  ("?filter-node-name", STR), ("?x-perf", PERF)]
BACKUP_COMMON = Struct("BackupCommon", _BACKUP_COMMON)
DRIVE_BACKUP = Struct("DriveBackup", [("target", STR), ("?format", STR),
                                      ("?mode", NEW_IMAGE_MODE)], base=BACKUP_COMMON)
BLOCKDEV_BACKUP = Struct("BlockdevBackup", [("target", STR)], base=BACKUP_COMMON)
SNAPSHOT_SYNC = Struct("BlockdevSnapshotSync", [
    ("?device", STR), ("?node-name", STR), ("snapshot-file", STR),
    ("?snapshot-node-name", STR), ("?format", STR), ("?mode", NEW_IMAGE_MODE)])
SNAPSHOT = Struct("BlockdevSnapshot", [("node", STR), ("overlay", STR)])
SNAPSHOT_INTERNAL = Struct("BlockdevSnapshotInternal", [("device", STR), ("name", STR)])
BITMAP_ADD = Struct("BlockDirtyBitmapAdd", [("node", STR), ("name", STR),
                                            ("?granularity", INT), ("?persistent", BOOL),
                                            ("?disabled", BOOL)])
BITMAP = Struct("BlockDirtyBitmap", [("node", STR), ("name", STR)])
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", [STR, BITMAP])
BITMAP_MERGE = Struct("BlockDirtyBitmapMerge", [("node", STR), ("target", STR),
                                                ("bitmaps", List(BITMAP_OR_STR))])
ABORT = Struct("Abort")
ACTION_KIND = Enum("TransactionActionKind", [
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge", "blockdev-backup", "blockdev-snapshot",
    "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync", "drive-backup"])
_ACTION_DATA = {"abort": ABORT, "block-dirty-bitmap-add": BITMAP_ADD,
                "block-dirty-bitmap-remove": BITMAP, "block-dirty-bitmap-clear": BITMAP,
                "block-dirty-bitmap-enable": BITMAP, "block-dirty-bitmap-disable": BITMAP,
                "block-dirty-bitmap-merge": BITMAP_MERGE, "blockdev-backup": BLOCKDEV_BACKUP,
                "blockdev-snapshot": SNAPSHOT, "blockdev-snapshot-internal-sync":
                SNAPSHOT_INTERNAL, "blockdev-snapshot-sync": SNAPSHOT_SYNC,
                "drive-backup": DRIVE_BACKUP}
TRANSACTION_ACTION = Union(
    "TransactionAction", Struct("q_obj_TransactionAction-base", [("type", ACTION_KIND)]),
    "type", {k: Struct(f"{v.name}Wrapper", [("data", v)]) for k, v in _ACTION_DATA.items()})
COMPLETION_MODE = Enum("ActionCompletionMode", ["individual", "grouped"])
TRANSACTION_PROPS = Struct("TransactionProperties", [("?completion-mode", COMPLETION_MODE)])

SNAPSHOT_INFO = Struct("SnapshotInfo", [
    ("id", STR), ("name", STR), ("vm-state-size", INT), ("date-sec", INT),
    ("date-nsec", INT), ("vm-clock-sec", INT), ("vm-clock-nsec", INT), ("?icount", INT)])
BLOCK_INFO = Struct("BlockInfo", [("device", STR), ("?qdev", STR), ("type", STR),
                                  ("removable", BOOL), ("locked", BOOL)])
BLOCK_DEVICE_INFO = Struct("BlockDeviceInfo", [("file", STR), ("?node-name", STR),
                                               ("ro", BOOL), ("drv", STR)])
BLOCK_STATS = Struct("BlockStats", [("?device", STR), ("?qdev", STR), ("?node-name", STR)])

# BlockdevOptions: a flat union on ``driver``; the members of each branch are what
# emu's block layer understands for that driver.
BLOCKDEV_DRIVER = Enum("BlockdevDriver", [
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster",
    "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
    "vhdx", "vmdk", "vpc", "vvfat"])
DETECT_ZEROES = Enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])
DISCARD = Enum("BlockdevDiscardOptions", ["ignore", "unmap"])
CACHE_OPTS = Struct("BlockdevCacheOptions", [("?direct", BOOL), ("?no-flush", BOOL)])
BLOCKDEV_BASE = Struct("q_obj_BlockdevOptions-base", [
    ("driver", BLOCKDEV_DRIVER), ("?node-name", STR), ("?discard", DISCARD),
    ("?cache", CACHE_OPTS), ("?read-only", BOOL), ("?auto-read-only", BOOL),
    ("?force-share", BOOL), ("?detect-zeroes", DETECT_ZEROES)])
_BLOCKDEV_REF_PLACEHOLDER: list = []


class _BlockdevRef(Alternate):
    """``BlockdevRef``: an inline BlockdevOptions object or a node name (recursive)."""

    def __init__(self, name: str, with_null: bool = False) -> None:
        super().__init__(name, [])
        self.with_null = with_null

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return BLOCKDEV_OPTIONS.check(value, full, name)
        if value is None and self.with_null:
            return None
        raise QmpError(f"Invalid parameter type for '{full}', expected: "
                       f"{self.name}")


BLOCKDEV_REF = _BlockdevRef("BlockdevRef")
BLOCKDEV_REF_OR_NULL = _BlockdevRef("BlockdevRefOrNull", True)
_GENERIC_FORMAT = Struct("BlockdevOptionsGenericFormat", [("file", BLOCKDEV_REF)])
_BRANCHES = {
    "file": Struct("BlockdevOptionsFile", [
        ("filename", STR), ("?pr-manager", STR), ("?locking", Enum("OnOffAuto", ["auto", "on", "off"])),
        ("?aio", Enum("BlockdevAioOptions", ["threads", "native", "io_uring"])),
        ("?aio-max-batch", INT), ("?drop-cache", BOOL), ("?x-check-cache-dropped", BOOL)]),
    "raw": Struct("BlockdevOptionsRaw", [("?offset", INT), ("?size", INT)], base=_GENERIC_FORMAT),
    "qcow2": Struct("BlockdevOptionsQcow2", [
        ("?backing", BLOCKDEV_REF_OR_NULL), ("?lazy-refcounts", BOOL),
        ("?pass-discard-request", BOOL), ("?pass-discard-snapshot", BOOL),
        ("?pass-discard-other", BOOL), ("?cache-size", INT), ("?l2-cache-size", INT),
        ("?l2-cache-entry-size", INT), ("?refcount-cache-size", INT),
        ("?cache-clean-interval", INT), ("?data-file", BLOCKDEV_REF)], base=_GENERIC_FORMAT),
    "blkdebug": Struct("BlockdevOptionsBlkdebug", [
        ("image", BLOCKDEV_REF), ("?config", STR), ("?align", INT), ("?max-transfer", INT),
        ("?opt-write-zero", INT), ("?max-write-zero", INT), ("?opt-discard", INT),
        ("?max-discard", INT), ("?inject-error", List(ANY)), ("?set-state", List(ANY)),
        ("?take-child-perms", List(STR)), ("?unshare-child-perms", List(STR))]),
}
# QEMU 7.2's qapi/block-core.json BlockdevOptionsRbd (no "luks-any" and no "parent" in
# the encryption options yet: those came in 8.0).
_RBD_LUKS = Struct("RbdEncryptionOptionsLUKSBase", [("key-secret", STR)])
RBD_ENCRYPTION_OPTIONS = Union(
    "RbdEncryptionOptions",
    Struct("q_obj_RbdEncryptionOptions-base",
           [("format", Enum("RbdImageEncryptionFormat", ["luks", "luks2"]))]),
    "format", {"luks": _RBD_LUKS, "luks2": _RBD_LUKS})
INET_SOCKET_ADDRESS_BASE = Struct("InetSocketAddressBase", [("host", STR), ("port", STR)])
_BRANCHES["rbd"] = Struct("BlockdevOptionsRbd", [
    ("pool", STR), ("?namespace", STR), ("image", STR), ("?conf", STR), ("?snapshot", STR),
    ("?encrypt", RBD_ENCRYPTION_OPTIONS), ("?user", STR),
    ("?auth-client-required", List(Enum("RbdAuthMode", ["cephx", "none"]))),
    ("?key-secret", STR), ("?server", List(INET_SOCKET_ADDRESS_BASE))])
BLOCKDEV_OPTIONS = Union("BlockdevOptions", BLOCKDEV_BASE, "driver", _BRANCHES)
BLOCKDEV_REF.choices = (BLOCKDEV_OPTIONS, STR)
BLOCKDEV_REF_OR_NULL.choices = (BLOCKDEV_OPTIONS, STR, NULL)


# ----------------------------------------------------------------- lookups

def _graph(ctx: CommandContext) -> Any:
    g = ctx.machine.block_graph
    if g is None:
        raise QmpError("the block layer is not available in this build")
    return g


def _lookup_bs(ctx: CommandContext, device: str | None, node_name: str | None) -> Any:
    """QEMU's bdrv_lookup_bs: a BlockBackend name first, then a node name."""
    if device is not None:
        dev = ctx.machine.find_block_device(device)
        if dev is not None:
            if dev.node is None:
                raise QmpError(f"Device '{device}' has no medium")
            return dev.node
    if node_name is not None and ctx.machine.block_graph is not None:
        bs = ctx.machine.block_graph.lookup(node_name)
        if bs is not None:
            return bs
    raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def _device_name_of(ctx: CommandContext, bs: Any) -> str:
    """The BlockBackend name attached to ``bs`` (QEMU's bdrv_get_device_or_node_name)."""
    for d in ctx.machine.block_devices:
        if d.node is bs:
            return d.name
    return bs.node_name


def _backup_source(ctx: CommandContext, bs: Any) -> bool:
    """``bs`` is the source of an unfinished backup job (QEMU has put its copy-before-write
    filter above it)."""
    jobs = getattr(ctx.machine, "jobs", None)
    if jobs is None:
        return False
    from emu.block.jobs.backup import busy_error

    return busy_error(jobs, bs, "") is not None


def _active_layer(ctx: CommandContext, name: str) -> tuple[Any, str]:
    dev = ctx.machine.find_block_device(name)
    if dev is not None:
        if dev.node is None:
            raise QmpError(f"Device '{name}' has no medium")
        if _backup_source(ctx, dev.node):
            # QEMU's qmp_get_root_bs: the device's root is the backup's filter now
            raise QmpError("Need a root block node")
        return dev.node, dev.name
    bs = _graph(ctx).lookup(name) if ctx.machine.block_graph is not None else None
    if bs is None:
        raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
    return bs, name         # QEMU's messages name the device as the client spelled it


# ----------------------------------------------------------------- queries

def _cache_info(bs: Any, writeback: bool = True) -> dict:
    return {"writeback": writeback, "direct": bool(bs.cache_direct),
            "no-flush": bool(bs.cache_no_flush)}


BDRV_SECTOR_SIZE = 512


def _image_info(bs: Any) -> dict:
    info = bs.image_info(backing_chain=True)
    level, node = info, bs
    while node is not None and level is not None:
        _fix_image_level(level, node)
        node, level = node.backing, level.get("backing-image")
    return info


def _fix_image_level(info: dict, bs: Any) -> None:
    """One ImageInfo level as QEMU shows node ``bs``: sector-rounded protocol sizes, and
    a ``json:`` filename without backing-filename members when its backing was attached
    at run time (blockdev-snapshot onto a header without that backing file)."""
    if getattr(bs.impl, "is_protocol", False):     # protocol nodes have no clusters
        if bs.drv != "rbd":      # ... but rbd's object size (QEMU's qemu_rbd_getinfo)
            info.pop("cluster-size", None)
        # QEMU's bdrv_getlength() counts whole sectors: a file's length is rounded up
        size = info["virtual-size"]
        info["virtual-size"] = -(-size // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
    if backing_overridden(bs):
        info["filename"] = node_filename(bs)
        for key in ("full-backing-filename", "backing-filename", "backing-filename-format"):
            info.pop(key, None)


def backing_overridden(bs: Any) -> bool:
    """QEMU's bdrv_backing_overridden: the backing node is not the one the image header
    names (e.g. a ``backing: null`` node that became an overlay)."""
    if bs.backing is None:
        return False
    return not bs.backing_file or bs.full_backing_filename() != bs.backing.filename


def _node_options(bs: Any) -> dict:
    """The options QEMU's bdrv_refresh_filename puts in a ``json:`` filename."""
    if bs.file is None:
        return {"driver": bs.drv, "filename": bs.filename}
    opts: dict[str, Any] = {"driver": bs.drv, "file": _node_options(bs.file)}
    if backing_overridden(bs):
        opts["backing"] = _node_options(bs.backing)
    return opts


def _qdict_json(obj: Any) -> str:
    # QEMU's qobject_to_json: members in QDict (hash bucket) order
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_qdict_json(obj[k])}"
                               for k in qdict_order(obj)) + "}"
    return json.dumps(obj)


def node_filename(bs: Any) -> str:
    """The node's ``filename`` as QEMU reports it: the plain file name, or ``json:{…}`` when
    the node cannot be reopened from it (its backing is overridden)."""
    if not backing_overridden(bs):
        return bs.filename
    return "json:" + _qdict_json(_node_options(bs))


def block_device_info(bs: Any, depth_from_chain: bool = True, writeback: bool = True) -> dict:
    """QEMU's BlockDeviceInfo for node ``bs``, members in schema order."""
    chain_depth = len(bs.backing_chain()) - 1 if depth_from_chain else 0
    d: dict[str, Any] = {"file": node_filename(bs), "node-name": bs.node_name,
                         "ro": bool(bs.read_only), "drv": bs.drv}
    backing_file = bs.backing_file
    if bs.backing is not None and backing_overridden(bs):
        backing_file = bs.backing.filename
    if backing_file:
        d["backing_file"] = backing_file
    d["backing_file_depth"] = chain_depth
    d["encrypted"] = False
    d["detect_zeroes"] = "off"
    d["bps"] = d["bps_rd"] = d["bps_wr"] = 0
    d["iops"] = d["iops_rd"] = d["iops_wr"] = 0
    d["image"] = _image_info(bs)
    d["cache"] = _cache_info(bs, writeback)
    d["write_threshold"] = 0
    # QEMU's bdrv_query_dirty_bitmaps: present only when the node has bitmaps
    bitmaps = bitmap_info_list(bs)
    if bitmaps:
        d["dirty-bitmaps"] = bitmaps
    return d


@command("query-block", returns=List(BLOCK_INFO))
def query_block(ctx: CommandContext) -> list:
    out = []
    for dev in ctx.machine.block_devices:
        e: dict[str, Any] = {"device": dev.name}
        if dev.qdev:
            e["qdev"] = dev.qdev
        e["type"] = dev.type
        e["removable"] = dev.removable
        e["locked"] = dev.locked
        if dev.node is not None:
            e["inserted"] = block_device_info(dev.node, writeback=dev.writeback)
            # -drive detect-zeroes= (kept on the BlockBackend, which applies it)
            e["inserted"]["detect_zeroes"] = getattr(dev.backend, "detect_zeroes", "off")
        if dev.removable and dev.qdev:
            e["tray_open"] = False
        if dev.qdev:            # I/O status is tracked once a device is attached
            e["io-status"] = dev.io_status
        out.append(e)
    return out


@command("query-named-block-nodes", args=[("?flat", BOOL)], returns=List(BLOCK_DEVICE_INFO))
def query_named_block_nodes(ctx: CommandContext, flat: bool = False) -> list:
    g = ctx.machine.block_graph
    if g is None:
        return []
    out = []
    for bs in g.nodes():
        # QEMU's bdrv_block_device_info(flat): neither the depth nor the backing images
        info = block_device_info(bs, depth_from_chain=not flat)
        if flat:
            info["image"].pop("backing-image", None)
        out.append(info)
    return out


_STAT_KEYS = ("rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
              "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
              "flush_total_time_ns", "unmap_total_time_ns", "wr_highest_offset", "rd_merged",
              "wr_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
              "failed_flush_operations", "failed_unmap_operations", "invalid_rd_operations",
              "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations")


def _stats(source: Any, accounted: bool) -> dict:
    """BlockDeviceStats from a backend's/node's ``stats`` counters (0 when it keeps none)."""
    counters = getattr(source, "stats", None) or {}
    if not isinstance(counters, dict):
        counters = dict(getattr(counters, "__dict__", {}))
    s: dict[str, Any] = {k: int(counters.get(k, 0)) for k in _STAT_KEYS}
    s["idle_time_ns"] = counters.get("idle_time_ns")
    if s["idle_time_ns"] is None:
        del s["idle_time_ns"]
    s["account_invalid"] = accounted
    s["account_failed"] = accounted
    s["timed_stats"] = []
    return s


def _driver_specific(bs: Any) -> dict | None:
    if bs.drv != "file":
        return None
    c = getattr(bs, "stats", None) or {}
    c = c if isinstance(c, dict) else dict(getattr(c, "__dict__", {}))
    return {"driver": "file", "discard-nb-ok": int(c.get("discard-nb-ok", 0)),
            "discard-nb-failed": int(c.get("discard-nb-failed", 0)),
            "discard-bytes-ok": int(c.get("discard-bytes-ok", 0))}


def _node_stats(bs: Any, blk_level: bool, root_stats: dict | None = None,
                head: dict | None = None) -> dict:
    """QEMU's bdrv_query_bds_stats: the node, its data child as ``parent`` and, at
    BlockBackend level, its backing node as ``backing`` (recursively)."""
    e: dict[str, Any] = dict(head or {})
    e["node-name"] = bs.node_name
    e["stats"] = root_stats if root_stats is not None else _stats(bs, False)
    ds = _driver_specific(bs)
    if ds is not None:
        e["driver-specific"] = ds
    if bs.file is not None:
        e["parent"] = _node_stats(bs.file, blk_level)
    if blk_level and bs.backing is not None:
        e["backing"] = _node_stats(bs.backing, blk_level)
    return e


@command("query-blockstats", args=[("?query-nodes", BOOL)], returns=List(BLOCK_STATS))
def query_blockstats(ctx: CommandContext, query_nodes: bool = False) -> list:
    out = []
    if query_nodes:
        g = ctx.machine.block_graph
        for bs in reversed(g.nodes()) if g is not None else []:
            out.append(_node_stats(bs, False))
        return out
    for dev in ctx.machine.block_devices:
        head: dict[str, Any] = {"device": dev.name}
        if dev.qdev:
            head["qdev"] = dev.qdev
        stats = _stats(dev.backend, True)
        if dev.node is None:
            out.append(dict(head, stats=stats))
        else:
            out.append(_node_stats(dev.node, True, stats, head))
    return out


# ------------------------------------------------------- internal snapshots

def _as_transaction(ctx: CommandContext, action: str, data: dict) -> dict:
    """QEMU's blockdev_do_action: a standalone snapshot command is a one-action
    transaction (every job drains around it: ``paused``/``running`` before the reply)."""
    from emu.qmp.commands.jobs import run_actions     # jobs imports this module

    run_actions(ctx, [(action, data)], reason=action)
    return {}


@command("blockdev-snapshot-internal-sync", args=SNAPSHOT_INTERNAL)
def blockdev_snapshot_internal_sync(ctx: CommandContext, device: str, name: str) -> dict:
    return _as_transaction(ctx, "blockdev-snapshot-internal-sync",
                           {"device": device, "name": name})


def internal_snapshot_create(ctx: CommandContext, bs: Any, devname: str, name: str) -> dict:
    """Create snapshot ``name`` on ``bs`` with QEMU's checks and texts."""
    return internal_snapshot_finish(bs, internal_snapshot_begin(ctx, bs, devname, name))


def internal_snapshot_begin(ctx: CommandContext, bs: Any, devname: str, name: str) -> Any:
    """The cut of snapshot ``name`` on drained ``bs`` (QEMU's checks and texts); returns the
    ticket for :func:`internal_snapshot_finish`, which may run once the guest runs again."""
    if not bs.supports_snapshots:
        raise QmpError(f"Block format '{bs.drv}' used by device '{devname}' does not "
                       "support internal snapshots")
    if not name:
        raise QmpError("Name is empty")
    for s in bs.snapshot_list():
        if s["name"] == name:
            raise QmpError(f"Snapshot with name '{name}' already exists on device '{devname}'")
    vm_clock = ctx.machine.vm_clock_ns()
    # QEMU keeps at most 255 bytes of the name (QEMUSnapshotInfo.name is char[256])
    stored = name.encode()[:255].decode("utf-8", "ignore")
    try:
        return bs.snapshot_create_begin(stored, vm_clock_ns=vm_clock)
    except BlockError as e:
        raise QmpError(desc_of(e)) from e


def internal_snapshot_finish(bs: Any, ticket: Any) -> dict:
    """Make a begun snapshot durable; returns its SnapshotInfo."""
    try:
        return bs.snapshot_create_finish(ticket)
    except BlockError as e:
        raise QmpError(desc_of(e)) from e
    except OSError as e:
        raise QmpError(os.strerror(e.errno or 5)) from e


@command("blockdev-snapshot-delete-internal-sync",
         args=[("device", STR), ("?id", STR), ("?name", STR)], returns=SNAPSHOT_INFO)
def blockdev_snapshot_delete_internal_sync(ctx: CommandContext, device: str,
                                           id: str | None = None,
                                           name: str | None = None) -> dict:
    bs, devname = _active_layer(ctx, device)
    if id is None and name is None:
        raise QmpError("Name or id must be provided")
    if not bs.supports_snapshots:
        raise QmpError("Failed to get a snapshot list: Operation not supported")
    match = None
    for s in bs.snapshot_list():
        if (id is None or s["id"] == id) and (name is None or s["name"] == name):
            match = s
            break
    if match is None:
        raise QmpError(f"Snapshot with id '{id if id is not None else 'null'}' and name "
                       f"'{name if name is not None else 'null'}' does not exist on device "
                       f"'{devname}'")
    with ctx.machine.quiesce(reason="blockdev-snapshot-delete-internal-sync"):
        try:
            return bs.snapshot_delete(match["id"], match["name"])
        except BlockError as e:
            raise QmpError(desc_of(e)) from e


# ------------------------------------------------------- external snapshots

_FORMATS_WITH_BACKING = ("qcow2",)


def _known_format(fmt: str) -> bool:
    try:
        from emu.block.node import DRIVERS, _load_drivers

        _load_drivers(fmt)      # only that one: importing every driver costs 15-60 ms
        return fmt in DRIVERS and not DRIVERS[fmt].cls.is_protocol
    except ImportError:
        return fmt in ("qcow2", "raw")


class _Background:
    """``fn(*args)`` on a thread of its own; :meth:`join` waits for it and re-raises its
    exception.  (A bare ``_thread``: ``threading.Thread.start`` would wait until the new
    thread got the GIL and said it runs, a scheduler round trip on a busy host.)"""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._error: BaseException | None = None
        self._done = _thread.allocate_lock()
        self._done.acquire()

        def run() -> None:
            try:
                fn(*args)
            except BaseException as err:    # noqa: BLE001 - re-raised by join
                self._error = err
            finally:
                self._done.release()

        _thread.start_new_thread(run, ())

    def join(self) -> None:
        self._done.acquire()
        self._done.release()
        if self._error is not None:
            raise self._error


def _backing_parent(ctx: CommandContext, bs: Any) -> Any:
    g = ctx.machine.block_graph
    for n in g.nodes() if g is not None else []:
        if n.backing is bs:
            return n
    return None


def _print_formatting(filename: str, size: int, backing: str, backing_fmt: str) -> None:
    import sys

    print(f"Formatting '{filename}', fmt=qcow2 cluster_size=65536 extended_l2=off "
          f"compression_type=zlib size={size} backing_file={backing} backing_fmt={backing_fmt} "
          "lazy_refcounts=off refcount_bits=16", flush=True, file=sys.stdout)


def external_snapshot_prepare(ctx: CommandContext, device: str | None, node_name: str | None,
                              snapshot_file: str, snapshot_node_name: str | None,
                              fmt: str, mode: str) -> tuple[Any, Any]:
    """Create (or open) the overlay and put it on top of the device's active layer.

    QEMU's external_snapshot_prepare order of checks; returns ``(old, new)`` nodes.  The
    overlay file stays on disk if a later step fails (as QEMU leaves it).
    """
    old = _lookup_bs(ctx, device, node_name)
    parent = _backing_parent(ctx, old)
    if parent is not None:
        raise QmpError(f"Node '{old.node_name}' is busy: node is used as backing hd of "
                       f"'{parent.node_name}'")
    if _backup_source(ctx, old):
        # QEMU's BLOCK_OP_TYPE_EXTERNAL_SNAPSHOT blocker of the backup job, checked inside
        # prepare's drained section of the old node (the job shows paused/running first)
        jobs = ctx.machine.jobs
        jobs.drain_end(jobs.drain_begin([old]))
        raise QmpError(f"Node '{_device_name_of(ctx, old)}' is busy: block device is in use "
                       "by block job: backup")
    if node_name is not None and snapshot_node_name is None:
        raise QmpError("New overlay node-name missing")
    g = _graph(ctx)
    if snapshot_node_name is not None and (
            g.lookup(snapshot_node_name) is not None
            or ctx.machine.find_block_device(snapshot_node_name) is not None):
        raise QmpError("New overlay node-name already in use")
    if not old.read_only:
        old.flush()
    if mode != "existing":
        if not _known_format(fmt):
            raise QmpError(f"Unknown file format '{fmt}'")
        if fmt not in _FORMATS_WITH_BACKING:
            raise QmpError(f"Backing file not supported for file format '{fmt}'")
        if snapshot_file == old.filename:
            raise QmpError("Error: Trying to create an image with the same filename as the "
                           "backing file")
        try:
            create_qcow2(snapshot_file, old.size, backing_file=old.filename,
                         backing_fmt=old.drv, durable=False)
        except EmuError as e:
            raise QmpError(desc_of(e)) from e
        _print_formatting(snapshot_file, old.size, old.filename, old.drv)
        # The new file's fdatasync runs while it is opened (the open reads what this
        # process wrote; the overlay is attached only once the sync returned).
        syncing = _Background(sync_file, snapshot_file)
    elif not _known_format(fmt):
        raise QmpError(f"Unknown file format '{fmt}'")
    else:
        syncing = None
    try:
        new = g.open_image(snapshot_file, fmt, node_name=snapshot_node_name, backing=None)
    except EmuError as e:
        if syncing is not None:
            syncing.join()
        raise QmpError(desc_of(e)) from e
    except OSError as e:
        if syncing is not None:
            syncing.join()
        raise QmpError(f"Could not open '{snapshot_file}': {e.strerror}") from e
    if syncing is not None:
        try:
            syncing.join()
        except BaseException:
            g.remove(new)
            raise
    if new.backing is not None:
        g.remove(new)
        raise QmpError("The overlay already has a backing image")
    if not new.impl.supports_backing:
        g.remove(new)
        raise QmpError("The overlay does not support backing images")
    return old, new


def external_snapshot_commit(ctx: CommandContext, old: Any, new: Any) -> None:
    """Attach ``new`` above ``old``: backing link, device root switch, old layer read-only."""
    new.backing = old
    old.parents += 1
    # the header keeps what it named (QEMU writes nothing): a differing backing shows as
    # an overridden one (json: filename, see backing_overridden)
    for dev in ctx.machine.block_devices:
        if dev.node is old:
            dev.node = new
            if dev.backend is not None and hasattr(dev.backend, "set_root"):
                dev.backend.set_root(new)
    old.read_only = True
    if old.file is not None:
        old.file.read_only = True


def external_snapshot_abort(ctx: CommandContext, old: Any, new: Any, *, remove_new: bool = True) -> None:
    """Undo :func:`external_snapshot_commit`: device back on ``old``, writable again.

    :param remove_new: drop the overlay node from the graph (``blockdev-snapshot-sync`` created it);
        ``blockdev-snapshot`` keeps it, because the client added it with ``blockdev-add``.
    """
    for dev in ctx.machine.block_devices:
        if dev.node is new:
            dev.node = old
            if dev.backend is not None and hasattr(dev.backend, "set_root"):
                dev.backend.set_root(old)
    if new.backing is old:
        new.backing = None
        old.parents -= 1
    old.read_only = False
    if old.file is not None:
        old.file.read_only = False
    if remove_new:
        ctx.machine.block_graph.remove(new)


def _backend_of(ctx: CommandContext, bs: Any) -> list[Any]:
    return [d.backend for d in ctx.machine.block_devices
            if d.backend is not None and d.node is bs]


@command("blockdev-snapshot-sync", args=SNAPSHOT_SYNC, boxed=True)
def blockdev_snapshot_sync(ctx: CommandContext, args: dict) -> dict:
    return _as_transaction(ctx, "blockdev-snapshot-sync", dict(args))


@command("blockdev-snapshot", args=SNAPSHOT)
def qmp_blockdev_snapshot(ctx: CommandContext, node: str, overlay: str) -> dict:
    return _as_transaction(ctx, "blockdev-snapshot", {"node": node, "overlay": overlay})


def blockdev_snapshot(ctx: CommandContext, node: str, overlay: str) -> dict:
    """Put node ``overlay`` on top of ``node`` (the blockdev-snapshot action's work, run in
    a transaction's drained section): QEMU's checks and texts, jobs on ``node`` drained."""
    old = _lookup_bs(ctx, node, node)
    g = _graph(ctx)
    new = g.lookup(overlay)
    if new is None:
        raise QmpError(f"Cannot find device='{overlay}' nor node-name='{overlay}'")
    parent = _backing_parent(ctx, old)
    if parent is not None:
        raise QmpError(f"Node '{old.node_name}' is busy: node is used as backing hd of "
                       f"'{parent.node_name}'")
    if any(d.node is new for d in ctx.machine.block_devices):
        raise QmpError("The overlay is already in use")
    if new.backing is not None:
        raise QmpError("The overlay already has a backing image")
    if not new.impl.supports_backing:
        raise QmpError("The overlay does not support backing images")
    jobs = getattr(ctx.machine, "jobs", None)
    token = jobs.drain_begin([old]) if jobs is not None else None
    try:
        with ctx.machine.quiesce(_backend_of(ctx, old), reason="blockdev-snapshot"):
            if not old.read_only:
                old.flush()
            external_snapshot_commit(ctx, old, new)
    finally:
        if token is not None:
            jobs.drain_end(token)
    return {}


# ------------------------------------------------------- blockdev-add / -del

_CHILD_KEYS = ("file", "backing", "image", "data-file")


def _check_references(ctx: CommandContext, opts: dict) -> None:
    """A child given by name must exist: QEMU looks it up as device *and* node name."""
    g = _graph(ctx)
    for key in _CHILD_KEYS:
        if key == "image" and opts.get("driver") == "rbd":
            continue   # rbd's "image" is the RBD image's name, not a child node
        ref = opts.get(key)
        if isinstance(ref, str):
            if g.lookup(ref) is None and ctx.machine.find_block_device(ref) is None:
                raise QmpError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        elif isinstance(ref, dict):
            _check_references(ctx, ref)


@command("blockdev-add", args=BLOCKDEV_OPTIONS, boxed=True)
def blockdev_add(ctx: CommandContext, args: dict) -> dict:
    if "node-name" not in args:
        raise QmpError("'node-name' must be specified for the root node")
    g = _graph(ctx)
    if g.lookup(args["node-name"]) is not None or ctx.machine.find_block_device(
            args["node-name"]) is not None:
        raise QmpError(f"Duplicate nodes with node-name='{args['node-name']}'")
    _check_references(ctx, args)
    try:
        bs = g.blockdev_add(args)
    except EmuError as e:
        raise QmpError(desc_of(e)) from e
    except OSError as e:
        raise QmpError(f"Could not open '{args.get('filename', '')}': {e.strerror}") from e
    owned = ctx.machine.__dict__.setdefault("monitor_owned_nodes", set())
    owned.add(bs.node_name)
    return {}


@command("blockdev-del", args=[("node-name", STR)])
def blockdev_del(ctx: CommandContext, node_name: str) -> dict:
    g = _graph(ctx)
    bs = g.lookup(node_name)
    if bs is None:
        raise QmpError(f"Failed to find node with node-name='{node_name}'")
    if any(d.node is bs for d in ctx.machine.block_devices):
        raise QmpError(f"Node {node_name} is in use")
    owned = ctx.machine.__dict__.setdefault("monitor_owned_nodes", set())
    if node_name not in owned:
        raise QmpError(f"Node {node_name} is not owned by the monitor")
    if bs.parents > 0:
        raise QmpError(f"Block device {node_name} is in use")
    g.remove(bs)
    owned.discard(node_name)
    return {}


# ------------------------------------------------------- job queries

@command("query-block-jobs", returns=List(Struct("BlockJobInfo", [("type", STR)])))
def query_block_jobs(ctx: CommandContext) -> list:
    """The machine's block jobs (``emu.block.jobs``); none while no job layer exists."""
    jobs = getattr(ctx.machine, "jobs", None)
    return list(jobs.query_block_jobs()) if jobs is not None else []


@command("query-jobs", returns=List(Struct("JobInfo", [("id", STR)])))
def query_jobs(ctx: CommandContext) -> list:
    jobs = getattr(ctx.machine, "jobs", None)
    return list(jobs.query_jobs()) if jobs is not None else []


# ------------------------------------------------------- job verbs
#
# The job layer (``emu.block.jobs``) attaches a registry as ``machine.jobs`` with
# ``find(id) -> job | None``; a job offers ``cancel(force)``, ``pause()``, ``resume()``,
# ``complete()``, ``dismiss()``, ``finalize()``, ``set_speed(speed)`` and raises with QEMU's
# texts for verbs its state refuses.  Without a registry there is no job to find.

def _find_block_job(ctx: CommandContext, job_id: str) -> Any:
    jobs = getattr(ctx.machine, "jobs", None)
    job = jobs.find(job_id) if jobs is not None else None
    if job is None:
        raise QmpError(f"Block job '{job_id}' not found", DEVICE_NOT_ACTIVE)
    return job


def _find_job(ctx: CommandContext, job_id: str) -> Any:
    jobs = getattr(ctx.machine, "jobs", None)
    job = jobs.find(job_id) if jobs is not None else None
    if job is None:
        raise QmpError("Job not found")
    return job


@command("block-job-set-speed", args=[("device", STR), ("speed", INT)])
def block_job_set_speed(ctx: CommandContext, device: str, speed: int) -> dict:
    job = _find_block_job(ctx, device)
    if speed < 0:
        raise QmpError("Parameter 'speed' expects a non-negative value")
    job.set_speed(speed)
    return {}


@command("block-job-cancel", args=[("device", STR), ("?force", BOOL)])
def block_job_cancel(ctx: CommandContext, device: str, force: bool = False) -> dict:
    _find_block_job(ctx, device).cancel(force)
    return {}


def _verb_commands() -> None:
    for verb in ("pause", "resume", "complete"):
        def block_fn(ctx: CommandContext, device: str, _v: str = verb) -> dict:
            getattr(_find_block_job(ctx, device), _v)()
            return {}
        command(f"block-job-{verb}", args=[("device", STR)])(block_fn)
    for verb in ("dismiss", "finalize"):
        def block_id_fn(ctx: CommandContext, id: str, _v: str = verb) -> dict:
            getattr(_find_block_job(ctx, id), _v)()
            return {}
        command(f"block-job-{verb}", args=[("id", STR)])(block_id_fn)
    for verb in ("pause", "resume", "complete", "dismiss", "finalize"):
        def job_fn(ctx: CommandContext, id: str, _v: str = verb) -> dict:
            getattr(_find_job(ctx, id), _v)()
            return {}
        command(f"job-{verb}", args=[("id", STR)])(job_fn)

    def job_cancel(ctx: CommandContext, id: str) -> dict:
        _find_job(ctx, id).cancel(True)
        return {}
    command("job-cancel", args=[("id", STR)])(job_cancel)


_verb_commands()

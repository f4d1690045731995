"""Backup and dirty-bitmap commands, and the machine's job registry.

``drive-backup`` and ``blockdev-backup`` run as one-action transactions, as QEMU 7.2's
do (blockdev_do_action): the job is created in prepare inside a drained section and
started at commit, which is why a standalone backup shows ``created``, ``running``,
``paused``, ``running`` before its reply.  The backup actions register in the
transaction table (``@action``) here; the job itself is :mod:`emu.block.jobs.backup`.

The job verbs (``block-job-*``, ``job-*``, ``query-*jobs``) live in
:mod:`emu.qmp.commands.block` and use the registry this module attaches to the machine
as ``machine.jobs`` (:func:`job_registry`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from emu.block import bitmaps as bmlib
from emu.block.jobs import SYNC_TIMEOUT, JobRegistry, JobTxn
from emu.block.jobs.backup import BackupJob, busy_error
from emu.block.transaction import ActionState, action
from emu.errors import EmuError, QmpError
from emu.qmp.commands import CommandContext, command, qemu_command
from emu.qmp.commands.block import (BITMAP, BITMAP_ADD, BITMAP_MERGE, BLOCKDEV_BACKUP,
                                    DRIVE_BACKUP, _lookup_bs)
from emu.qmp.errors import DEVICE_NOT_FOUND, desc_of, unsupported

__all__ = ["job_registry", "run_actions", "bitmap_node", "lookup_bitmap"]


# ----------------------------------------------------------------- registry

def job_registry(machine: Any) -> JobRegistry:
    """The machine's job registry (``machine.jobs``), attached on first use."""
    reg = getattr(machine, "jobs", None)
    if reg is None:
        reg = JobRegistry(machine.emit)
        machine.jobs = reg
    return reg


def run_actions(ctx: CommandContext, actions: list[tuple[str, dict]], grouped: bool = False,
                reason: str = "transaction") -> None:
    """Run transaction actions inside one quiesce of the machine (QEMU's qmp_transaction:
    drain everything first, then prepare / commit or abort / clean).

    :param reason: the QMP command, for the cut report (``drive-backup`` for a standalone
        backup, which QEMU runs as a one-action transaction).
    """
    from emu.block.transaction import run_transaction

    reg = job_registry(ctx.machine)
    with ctx.machine.quiesce(reason=reason):
        reg.drain_all()
        try:
            run_transaction(actions, ctx, grouped=grouped)
        except QmpError:
            raise
        except EmuError as e:
            raise QmpError(desc_of(e)) from e
        except OSError as e:
            raise QmpError(os.strerror(e.errno or 5)) from e


def _device_of(ctx: CommandContext, bs: Any) -> str | None:
    for d in ctx.machine.block_devices:
        if d.node is bs:
            return d.name
    return None


# ----------------------------------------------------------------- image creation

def _known_format(fmt: str) -> bool:
    from emu.block.node import DRIVERS, _load_drivers

    _load_drivers()
    return fmt in DRIVERS and not DRIVERS[fmt].cls.is_protocol


def _say(line: str) -> None:
    # stdout may be closed or a dead pipe: the image is made all the same, as QEMU's is
    try:
        print(line, file=sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def create_target(path: str, fmt: str, size: int, backing: Any | None) -> None:
    """Create a backup target as QEMU's bdrv_img_create does, with its ``Formatting``
    line on stdout (printed before the file is made, as QEMU prints it)."""
    if not _known_format(fmt):
        raise QmpError(f"Unknown file format '{fmt}'")
    if fmt == "qcow2":
        extra = ""
        if backing is not None:
            extra = f" backing_file={backing.filename} backing_fmt={backing.drv}"
        _say(f"Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off "
             f"compression_type=zlib size={size}{extra} lazy_refcounts=off refcount_bits=16")
        from emu.block.qcow2.create import create_qcow2

        try:
            create_qcow2(path, size, backing_file=backing.filename if backing else None,
                         backing_fmt=backing.drv if backing else None)
        except EmuError as e:
            raise QmpError(desc_of(e)) from e
        return
    if fmt == "raw":
        if backing is not None:
            raise QmpError("Backing file not supported for file format 'raw'")
        _say(f"Formatting '{path}', fmt=raw size={size}")
        try:
            with open(path, "wb") as fh:
                fh.truncate(size)
        except OSError as e:
            raise QmpError(f"Could not create '{path}': {os.strerror(e.errno)}") from e
        return
    raise QmpError(f"Format driver '{fmt}' does not support image creation")


def _open_target(ctx: CommandContext, path: str, fmt: str | None, backing: Any | None) -> Any:
    g = ctx.machine.block_graph
    if not os.path.exists(path):
        raise QmpError(f"Could not open '{path}': No such file or directory")
    try:
        return g.open_image(path, fmt, backing=backing)
    except EmuError as e:
        raise QmpError(desc_of(e)) from e
    except OSError as e:
        raise QmpError(f"Could not open '{path}': {os.strerror(e.errno)}") from e


# ----------------------------------------------------------------- backup actions

def _backup_common(st: ActionState, bs: Any, target: Any, own_target: bool) -> None:
    """QEMU's do_backup_common: bitmap checks, then the job (created, not started)."""
    ctx: CommandContext = st.env
    d = st.data
    g = ctx.machine.block_graph
    holder: dict[str, Any] = {"job": None}

    def drop_target() -> None:
        if own_target and target in g.nodes():
            try:
                g.remove(target)
            except EmuError:
                pass

    st.on_clean(lambda: holder["job"] is None and drop_target())
    sync = d["sync"]
    bitmap_mode = d.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and "bitmap" not in d:
        raise QmpError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if bitmap_mode is not None and bitmap_mode != "on-success":
            raise QmpError("Bitmap sync mode must be 'on-success' when using sync mode "
                           "'incremental'")
        sync, bitmap_mode = "bitmap", "on-success"
    bitmap = None
    if "bitmap" in d:
        bitmap = bmlib.find_bitmap(bs, d["bitmap"])
        if bitmap is None:
            raise QmpError(f"Bitmap '{d['bitmap']}' could not be found")
        if bitmap_mode is None:
            raise QmpError("Bitmap sync mode must be given when providing a bitmap")
        try:
            bitmap.check_usable(allow_ro=True)
        except EmuError as e:
            raise QmpError(desc_of(e)) from e
        if sync == "none":
            raise QmpError("sync mode 'none' does not produce meaningful bitmap outputs")
        if bitmap_mode == "never" and sync != "bitmap":
            raise QmpError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                           f"with sync mode '{sync}'")
    elif bitmap_mode is not None:
        raise QmpError("Cannot specify bitmap sync mode without a bitmap")
    job_id = d.get("job-id")
    if job_id is None:
        # QEMU takes the BlockBackend name; a node without one gives ''
        job_id = _device_of(ctx, bs) or ""
    reg = job_registry(ctx.machine)
    txn = None
    if st.grouped:
        txn = st.txn.setdefault("jobs", JobTxn())
    try:
        job = BackupJob.new(
            reg, job_id, bs, target, sync=sync, bitmap=bitmap, bitmap_mode=bitmap_mode,
            compress=bool(d.get("compress", False)),
            on_source_error=d.get("on-source-error", "report"),
            on_target_error=d.get("on-target-error", "report"),
            speed=d.get("speed", 0), auto_finalize=d.get("auto-finalize", True),
            auto_dismiss=d.get("auto-dismiss", True), txn=txn,
            target_is_new=own_target and d.get("mode", "absolute-paths") != "existing",
            on_clean=drop_target)
    except EmuError as e:
        raise QmpError(desc_of(e)) from e
    holder["job"] = job
    st.on_commit(job.start)
    st.on_abort(job.cancel_sync)


def _drain_for(st: ActionState, nodes: list[Any]) -> None:
    """QEMU's bdrv_drained_begin in prepare, paired with its clean."""
    reg = job_registry(st.env.machine)
    jobs = reg.drain_begin(nodes)
    st.on_clean(lambda: reg.drain_end(jobs))


@action("drive-backup", grouped=True)
def drive_backup_prepare(st: ActionState) -> None:
    """QEMU 7.2's drive_backup_prepare: create (or open) the target, then the job."""
    ctx: CommandContext = st.env
    d = st.data
    device = d["device"]
    bs = _lookup_bs(ctx, device, device)
    _drain_for(st, [bs])
    mode = d.get("mode", "absolute-paths")
    fmt = d.get("format") or (None if mode == "existing" else bs.drv)
    label = _device_of(ctx, bs) or bs.node_name
    err = busy_error(job_registry(ctx.machine), bs, label)
    if err:
        raise QmpError(err)
    sync = d["sync"]
    source = None
    if sync == "top":
        source = bs.backing
        if source is None:
            st.data = d = dict(d, sync="full")
    elif sync == "none":
        source = bs
    if mode != "existing":
        create_target(d["target"], fmt, bs.size, source)
    target = _open_target(ctx, d["target"], fmt, source)
    _backup_common(st, bs, target, own_target=True)


@action("blockdev-backup", grouped=True)
def blockdev_backup_prepare(st: ActionState) -> None:
    """QEMU 7.2's blockdev_backup_prepare: both nodes exist already."""
    ctx: CommandContext = st.env
    d = st.data
    bs = _lookup_bs(ctx, d["device"], d["device"])
    target = _lookup_bs(ctx, d["target"], d["target"])
    _drain_for(st, [bs, target])
    label = _device_of(ctx, bs) or bs.node_name
    err = busy_error(job_registry(ctx.machine), bs, label)
    if err:
        raise QmpError(err)
    _backup_common(st, bs, target, own_target=False)


@command("drive-backup", args=DRIVE_BACKUP, features=("deprecated",), boxed=True)
def drive_backup(ctx: CommandContext, args: dict) -> dict:
    run_actions(ctx, [("drive-backup", dict(args))], reason="drive-backup")
    return {}


@command("blockdev-backup", args=BLOCKDEV_BACKUP, boxed=True)
def blockdev_backup(ctx: CommandContext, args: dict) -> dict:
    run_actions(ctx, [("blockdev-backup", dict(args))], reason="blockdev-backup")
    return {}


# ----------------------------------------------------------------- dirty bitmaps

def bitmap_node(ctx: CommandContext, node: str) -> Any:
    """QEMU's block_dirty_bitmap_lookup node step: device or node name."""
    dev = ctx.machine.find_block_device(node)
    if dev is not None and dev.node is not None:
        return dev.node
    g = ctx.machine.block_graph
    bs = g.lookup(node) if g is not None else None
    if bs is None:
        raise QmpError(f"Node '{node}' not found")
    return bs


def lookup_bitmap(ctx: CommandContext, node: str, name: str) -> tuple[Any, bmlib.DirtyBitmap]:
    """``(node, bitmap)`` or QEMU's ``Node '…' not found`` / ``Dirty bitmap '…' not found``."""
    bs = bitmap_node(ctx, node)
    bm = bmlib.find_bitmap(bs, name)
    if bm is None:
        raise QmpError(f"Dirty bitmap '{name}' not found")
    return bs, bm


def _check(bm: bmlib.DirtyBitmap) -> None:
    try:
        bm.check_usable()
    except EmuError as e:
        raise QmpError(desc_of(e)) from e


def bitmap_add(ctx: CommandContext, node: str, name: str, granularity: int | None = None,
               persistent: bool = False, disabled: bool = False) -> tuple[Any, Any]:
    bs = _lookup_bs(ctx, node, node)
    try:
        return bs, bmlib.add_bitmap(bs, name, granularity, persistent, disabled, node)
    except EmuError as e:
        raise QmpError(desc_of(e)) from e


def merge_sources(ctx: CommandContext, bs: Any, sources: list[Any]) -> list[bmlib.DirtyBitmap]:
    out = []
    for src in sources:
        if isinstance(src, str):
            bm = bmlib.find_bitmap(bs, src)
            if bm is None:
                raise QmpError(f"Dirty bitmap '{src}' not found")
        else:
            _, bm = lookup_bitmap(ctx, src["node"], src["name"])
        out.append(bm)
    return out


@command("block-dirty-bitmap-add", args=BITMAP_ADD)
def block_dirty_bitmap_add(ctx: CommandContext, node: str, name: str,
                           granularity: int | None = None, persistent: bool = False,
                           disabled: bool = False) -> dict:
    bitmap_add(ctx, node, name, granularity, persistent, disabled)
    return {}


@command("block-dirty-bitmap-remove", args=BITMAP)
def block_dirty_bitmap_remove(ctx: CommandContext, node: str, name: str) -> dict:
    bs, bm = lookup_bitmap(ctx, node, name)
    _check(bm)
    bmlib.remove_bitmap(bs, bm)
    return {}


@command("block-dirty-bitmap-clear", args=BITMAP)
def block_dirty_bitmap_clear(ctx: CommandContext, node: str, name: str) -> dict:
    _, bm = lookup_bitmap(ctx, node, name)
    _check(bm)
    bm.clear()
    return {}


@command("block-dirty-bitmap-enable", args=BITMAP)
def block_dirty_bitmap_enable(ctx: CommandContext, node: str, name: str) -> dict:
    _, bm = lookup_bitmap(ctx, node, name)
    _check(bm)
    bm.recording = True
    return {}


@command("block-dirty-bitmap-disable", args=BITMAP)
def block_dirty_bitmap_disable(ctx: CommandContext, node: str, name: str) -> dict:
    _, bm = lookup_bitmap(ctx, node, name)
    _check(bm)
    bm.recording = False
    return {}


@command("block-dirty-bitmap-merge", args=BITMAP_MERGE)
def block_dirty_bitmap_merge(ctx: CommandContext, node: str, target: str,
                             bitmaps: list[Any]) -> dict:
    bs, dst = lookup_bitmap(ctx, node, target)
    _check(dst)
    for src in merge_sources(ctx, bs, bitmaps):
        dst.merge_from(src)
    return {}


# ----------------------------------------------------------------- stream and commit

def _keep_fn(ctx: CommandContext) -> Any:
    """Nodes a finished stream/commit must not close: blockdev-add'ed or on a device."""
    owned = ctx.machine.__dict__.setdefault("monitor_owned_nodes", set())

    def keep(node: Any) -> bool:
        return node.node_name in owned or any(d.node is node for d in ctx.machine.block_devices)
    return keep


def _find_backing_image(bs: Any, name: str) -> Any | None:
    """QEMU's bdrv_find_backing_image: a node below ``bs`` by file name (as recorded in its
    overlay's header, as opened, or resolved against the overlay's directory)."""
    from emu.block.node import resolve_backing_path

    parent, node = bs, bs.backing
    while node is not None:
        if name in (node.filename, parent.backing_file):
            return node
        try:
            want = os.path.realpath(resolve_backing_path(parent.filename, name))
            if want == os.path.realpath(node.filename):
                return node
        except (OSError, ValueError, TypeError):
            pass
        parent, node = node, node.backing
    return None


def _job_busy(ctx: CommandContext, nodes: list[Any]) -> None:
    """QEMU's op blockers: a node already used by a stream/commit/backup job."""
    reg = job_registry(ctx.machine)
    for n in nodes:
        for j in reg.jobs_on([n]):
            if not j.is_completed():
                label = _device_of(ctx, n) or n.node_name
                raise QmpError(f"Node '{label}' is busy: block device is in use by block "
                               f"job: {j.job_type}")


def _start_and_wait(job: Any) -> None:
    """Start ``job`` and wait for its first I/O or its end: a job with nothing to copy
    reports all its events before the reply, as QEMU's does."""
    job.start()
    job.yielded.wait(SYNC_TIMEOUT)


def _job_kwargs(args: dict) -> dict:
    return {"speed": args.get("speed", 0), "on_error": args.get("on-error", "report"),
            "auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True)}


def _create(ctx: CommandContext, make: Any, speed: int) -> Any:
    try:
        job = make()
    except EmuError as e:
        raise QmpError(desc_of(e)) from e
    if speed < 0:
        job.early_fail()
        job.clean()
        raise QmpError("Parameter 'speed' expects a non-negative value")
    return job


@qemu_command("block-stream", boxed=True)
def block_stream(ctx: CommandContext, args: dict) -> dict:
    """QEMU 7.2's qmp_block_stream: checks and texts in QEMU's order, then the job."""
    from emu.block.jobs.stream import StreamJob

    base, base_node, bottom = args.get("base"), args.get("base-node"), args.get("bottom")
    if base is not None and base_node is not None:
        raise QmpError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise QmpError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise QmpError("'bottom' and 'base-node' cannot be specified at the same time")
    device = args["device"]
    bs = _lookup_bs(ctx, device, device)
    base_bs = None
    base_name = None
    if base is not None:
        base_bs = _find_backing_image(bs, base)
        if base_bs is None:
            raise QmpError(f"Can't find '{base}' in the backing chain")
        base_name = base
    if base_node is not None:
        base_bs = _lookup_bs(ctx, None, base_node)
        if base_bs not in bs.backing_chain()[1:]:
            raise QmpError(f"Node '{base_node}' is not a backing image of '{device}'")
        base_name = base_bs.filename
    if bottom is not None:
        bottom_bs = _lookup_bs(ctx, None, bottom)
        if bottom_bs not in bs.backing_chain():
            raise QmpError(f"Node '{bottom}' is not in a chain starting from '{device}'")
        base_bs = bottom_bs.backing
        base_name = base_bs.filename if base_bs is not None else None
    chain = []
    n = bs
    while n is not None and n is not base_bs:
        chain.append(n)
        n = n.backing
    _job_busy(ctx, chain)
    backing_file = args.get("backing-file")
    if base_bs is None and backing_file is not None:
        raise QmpError("backing file specified, but streaming the entire chain")
    if "filter-node-name" in args:
        raise unsupported("block-stream", "a named copy-on-read filter (filter-node-name)")
    job_id = args.get("job-id")
    if job_id is None:
        job_id = _device_of(ctx, bs) or ""
    kw = _job_kwargs(args)
    job = _create(ctx, lambda: StreamJob.new(
        job_registry(ctx.machine), job_id, bs, base_bs,
        backing_file=backing_file if backing_file is not None else base_name,
        keep=_keep_fn(ctx), **kw), kw["speed"])
    _start_and_wait(job)
    return {}


def _root_bs(ctx: CommandContext, device: str) -> Any:
    """QEMU's qmp_get_root_bs, with block-commit's ``Device '…' not found``."""
    dev = ctx.machine.find_block_device(device)
    if dev is not None and dev.node is not None:
        return dev.node
    g = ctx.machine.block_graph
    bs = g.lookup(device) if g is not None else None
    if bs is None:
        if dev is not None:
            raise QmpError("Device has no medium")
        raise QmpError(f"Device '{device}' not found", DEVICE_NOT_FOUND)
    if bs.parents > 0:
        raise QmpError("Need a root block node")
    return bs


def _switch_root(ctx: CommandContext) -> Any:
    """``switch(old, new, final_sync)`` for an active commit: the devices on ``old`` are
    quiesced, ``final_sync`` copies the guest's last writes, then they use ``new``."""
    m = ctx.machine

    def switch(old: Any, new: Any, final_sync: Any) -> None:
        devs = [d for d in m.block_devices if d.node is old]
        backends = [d.backend for d in devs if d.backend is not None]
        with m.quiesce(backends, reason="block-job-complete"):
            final_sync()
            for d in devs:
                d.node = new
                if d.backend is not None and hasattr(d.backend, "set_root"):
                    d.backend.set_root(new)
    return switch


def _active_commit(ctx: CommandContext, args: dict, bs: Any, base_bs: Any) -> None:
    """QEMU's commit_active_start: a mirror job of type ``commit``."""
    from emu.block.jobs.commit import ActiveCommitJob

    if "filter-node-name" in args:
        raise unsupported("block-commit", "a named commit filter (filter-node-name)")
    job_id = args.get("job-id")
    if job_id is None:
        job_id = _device_of(ctx, bs) or ""
    kw = _job_kwargs(args)
    reg = job_registry(ctx.machine)
    speed = kw.pop("speed")
    job = _create(ctx, lambda: ActiveCommitJob.new(
        reg, job_id, bs, base_bs, switch_root=_switch_root(ctx), keep=_keep_fn(ctx),
        speed=max(speed, 0), **kw), speed)
    job.start()         # QEMU's mirror always yields first: the reply comes before 'ready'



@qemu_command("block-commit", boxed=True)
def block_commit(ctx: CommandContext, args: dict) -> dict:
    """QEMU 7.2's qmp_block_commit for a layer below the active one; committing the active
    layer (QEMU's mirror job) is refused."""
    from emu.block.jobs.commit import CommitJob

    device = args["device"]
    bs = _root_bs(ctx, device)
    _job_busy(ctx, [bs])
    top, top_node = args.get("top"), args.get("top-node")
    if top is not None and top_node is not None:
        raise QmpError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_bs = _lookup_bs(ctx, None, top_node)
        if top_bs not in bs.backing_chain():
            raise QmpError(f"'{top_node}' is not in this backing file chain")
    elif top is not None:
        top_bs = bs if bs.filename == top else _find_backing_image(bs, top)
    else:
        top_bs = bs
    if top_bs is None:
        raise QmpError(f"Top image file {top} not found")
    base, base_node = args.get("base"), args.get("base-node")
    if base is not None and base_node is not None:
        raise QmpError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs = _lookup_bs(ctx, None, base_node)
        if base_bs not in top_bs.backing_chain():
            raise QmpError(f"'{base_node}' is not in this backing file chain")
    elif base is not None:
        base_bs = _find_backing_image(top_bs, base)
        if base_bs is None:
            raise QmpError(f"Can't find '{base}' in the backing chain")
    else:
        base_bs = top_bs.backing_chain()[-1]
    _job_busy(ctx, [n for n in top_bs.backing_chain()[1:]
                    if base_bs in n.backing_chain()])
    if top_bs is base_bs:
        raise QmpError("cannot commit an image into itself")
    if top_bs is bs:
        if args.get("backing-file") is not None:
            raise QmpError("'backing-file' specified, but 'top' is the active layer")
        _active_commit(ctx, args, bs, base_bs)
        return {}
    overlay = next(n for n in bs.backing_chain() if n.backing is top_bs)
    _job_busy(ctx, [overlay])
    if "filter-node-name" in args:
        raise unsupported("block-commit", "a named commit filter (filter-node-name)")
    job_id = args.get("job-id")
    if job_id is None:
        job_id = _device_of(ctx, bs) or ""
    kw = _job_kwargs(args)
    job = _create(ctx, lambda: CommitJob.new(
        job_registry(ctx.machine), job_id, overlay, top_bs, base_bs,
        backing_file=args.get("backing-file"), keep=_keep_fn(ctx), **kw), kw["speed"])
    _start_and_wait(job)
    return {}

"""``transaction``: several block actions, all or nothing, in one quiesce of the machine.

The engine and the ``@action`` table are :mod:`emu.block.transaction`; the backup actions
register in :mod:`emu.qmp.commands.jobs`; the snapshot and dirty-bitmap actions register
here, each reusing the standalone command's implementation for its work and adding the
undo QEMU 7.2 performs on abort (snapshot deleted, overlay detached, bitmap restored).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from emu.block import bitmaps as bmlib
from emu.block.transaction import ActionState, action
from emu.errors import EmuError, QmpError
from emu.qmp.commands import CommandContext, command
from emu.qmp.commands import jobs as jobcmds
from emu.qmp.commands.block import (TRANSACTION_ACTION, TRANSACTION_PROPS, _active_layer,
                                    _lookup_bs, external_snapshot_abort,
                                    external_snapshot_commit, external_snapshot_prepare,
                                    internal_snapshot_begin, internal_snapshot_finish)
from emu.qmp.schema import List

__all__ = ["transaction"]


@command("transaction", args=[("actions", List(TRANSACTION_ACTION)),
                              ("?properties", TRANSACTION_PROPS)], boxed=True)
def transaction(ctx: CommandContext, args: dict) -> dict:
    """QEMU's qmp_transaction: prepares in order, commit all or abort in reverse."""
    actions = [(a["type"], dict(a.get("data") or {})) for a in args["actions"]]
    props = args.get("properties") or {}
    jobcmds.run_actions(ctx, actions, grouped=props.get("completion-mode") == "grouped")
    return {}


# ----------------------------------------------------------------- snapshots

@action("blockdev-snapshot-internal-sync")
def internal_snapshot_prepare(st: ActionState) -> None:
    """The snapshot's cut is taken in prepare (cancelled again if the transaction fails);
    the snapshots of one transaction are made durable together once the guest runs again,
    before the reply (:func:`_finish_snapshots`)."""
    st.check_completion_mode()
    ctx: CommandContext = st.env
    device, name = st.data["device"], st.data["name"]
    bs, devname = _active_layer(ctx, device)
    jobcmds._drain_for(st, [bs])
    if bs.read_only and bs.supports_snapshots:
        raise QmpError(f"Device '{device}' is read only")
    ticket = internal_snapshot_begin(ctx, bs, devname, name)

    def undo() -> None:
        try:
            bs.snapshot_create_cancel(ticket)
        except EmuError:
            pass

    st.on_abort(undo)
    batch = st.txn.get("internal snapshots")
    if batch is None:
        batch = st.txn["internal snapshots"] = []
        st.on_commit(lambda: ctx.machine.after_quiesce(lambda: _finish_snapshots(batch)))
    batch.append((bs, ticket))


def _finish_snapshots(batch: list[tuple[Any, Any]]) -> None:
    """Finish every snapshot of one transaction, each image on its own thread (their waits
    on the disk overlap).  If one fails, the others are deleted again (all or nothing) and
    the first error is the command's."""
    results: list[Any] = [None] * len(batch)
    # The guest runs again meanwhile: while these threads compete with the vCPU and the block
    # workers for the GIL, let a waiting thread in after 0.5 ms instead of Python's 5 ms, so
    # the guest's requests are not held behind the finishers' CPU work.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        _finish_all(batch, results)
    finally:
        sys.setswitchinterval(interval)
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return
    for (bs, _), r in zip(batch, results):
        if isinstance(r, dict):
            try:
                bs.snapshot_delete(r["id"], r["name"])
            except EmuError:
                pass
    raise errors[0]


def _finish_all(batch: list[tuple[Any, Any]], results: list[Any]) -> None:
    """One thread per image; ``results[k]`` gets the SnapshotInfo or the exception."""

    def one(k: int) -> None:
        try:
            results[k] = internal_snapshot_finish(*batch[k])
        except BaseException as err:    # noqa: BLE001 - reported below
            results[k] = err

    threads = [threading.Thread(target=one, args=(k,), name=f"snapshot-{k}")
               for k in range(1, len(batch))]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()


@action("blockdev-snapshot-sync")
def external_snapshot_sync_prepare(st: ActionState) -> None:
    """Overlay created and attached in prepare; detached on abort (file left on disk)."""
    st.check_completion_mode()
    ctx: CommandContext = st.env
    d = st.data
    old, new = external_snapshot_prepare(ctx, d.get("device"), d.get("node-name"),
                                         d["snapshot-file"], d.get("snapshot-node-name"),
                                         d.get("format", "qcow2"),
                                         d.get("mode", "absolute-paths"))
    jobcmds._drain_for(st, [old])
    external_snapshot_commit(ctx, old, new)
    st.on_abort(lambda: external_snapshot_abort(ctx, old, new))


@action("blockdev-snapshot")
def blockdev_snapshot_prepare(st: ActionState) -> None:
    """An overlay added with blockdev-add goes on top; on abort it is detached again
    (the node stays, as the client added it)."""
    st.check_completion_mode()
    ctx: CommandContext = st.env
    node, overlay = st.data["node"], st.data["overlay"]
    from emu.qmp.commands.block import blockdev_snapshot

    old = _lookup_bs(ctx, node, node)
    g = ctx.machine.block_graph
    new = g.lookup(overlay) if g is not None else None
    had_backing_file = (new.backing_file, new.backing_format) if new is not None else None
    blockdev_snapshot(ctx, node=node, overlay=overlay)

    def undo() -> None:
        external_snapshot_abort(ctx, old, new, remove_new=False)
        new.backing_file, new.backing_format = had_backing_file

    st.on_abort(undo)


# ----------------------------------------------------------------- dirty bitmaps

@action("block-dirty-bitmap-add")
def bitmap_add_prepare(st: ActionState) -> None:
    st.check_completion_mode()
    d = st.data
    bs, bm = jobcmds.bitmap_add(st.env, d["node"], d["name"], d.get("granularity"),
                                d.get("persistent", False), d.get("disabled", False))
    st.on_abort(lambda: bmlib.remove_bitmap(bs, bm))


@action("block-dirty-bitmap-remove")
def bitmap_remove_prepare(st: ActionState) -> None:
    """Marked busy in prepare, removed at commit (QEMU hides it until then)."""
    st.check_completion_mode()
    bs, bm = jobcmds.lookup_bitmap(st.env, st.data["node"], st.data["name"])
    jobcmds._check(bm)
    bm.busy = True

    def commit() -> None:
        bm.busy = False
        bmlib.remove_bitmap(bs, bm)

    def abort() -> None:
        bm.busy = False

    st.on_commit(commit)
    st.on_abort(abort)


def _bitmap_change(st: ActionState, change: Any) -> None:
    st.check_completion_mode()
    _, bm = jobcmds.lookup_bitmap(st.env, st.data["node"], st.data.get("name",
                                                                         st.data.get("target")))
    jobcmds._check(bm)
    saved_bits, saved_rec = bm.snapshot(), bm.recording
    change(bm)

    def abort() -> None:
        bm.restore(saved_bits)
        bm.recording = saved_rec

    st.on_abort(abort)


@action("block-dirty-bitmap-clear")
def bitmap_clear_prepare(st: ActionState) -> None:
    _bitmap_change(st, lambda bm: bm.clear())


@action("block-dirty-bitmap-enable")
def bitmap_enable_prepare(st: ActionState) -> None:
    _bitmap_change(st, lambda bm: setattr(bm, "recording", True))


@action("block-dirty-bitmap-disable")
def bitmap_disable_prepare(st: ActionState) -> None:
    _bitmap_change(st, lambda bm: setattr(bm, "recording", False))


@action("block-dirty-bitmap-merge")
def bitmap_merge_prepare(st: ActionState) -> None:
    ctx: CommandContext = st.env
    bs = jobcmds.bitmap_node(ctx, st.data["node"])
    sources = st.data["bitmaps"]

    def merge(bm: Any) -> None:
        for src in jobcmds.merge_sources(ctx, bs, sources):
            bm.merge_from(src)

    _bitmap_change(st, merge)

"""Block commands beyond queries, snapshots, bitmaps and backup: NBD/exports, throttling,
removable media, ``block_resize`` (:func:`resize_node`, shared with HMP ``qemu-io
truncate``), and the block jobs and graph changes emu's block layer does not offer yet
(mirror, create, amend, reopen: ``emu does not support`` errors after QEMU's argument
checks).
"""

from __future__ import annotations

import os
from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, qemu_command
from emu.qmp.errors import unsupported


@qemu_command("query-pr-managers")
def query_pr_managers(ctx: CommandContext) -> list:
    return []


@qemu_command("query-block-exports")
def query_block_exports(ctx: CommandContext) -> list:
    return []


@qemu_command("block-export-del")
def block_export_del(ctx: CommandContext, id: str, **kw: Any) -> dict:
    raise QmpError(f"Export '{id}' is not found")


@qemu_command("nbd-server-remove")
def nbd_server_remove(ctx: CommandContext, name: str, **kw: Any) -> dict:
    raise QmpError(f"Export '{name}' is not found")


@qemu_command("nbd-server-stop")
def nbd_server_stop(ctx: CommandContext) -> dict:
    raise QmpError("NBD server not running")


@qemu_command("nbd-server-add")
def nbd_server_add(ctx: CommandContext, device: str, **kw: Any) -> dict:
    raise QmpError("NBD server not running")


def _find_device(ctx: CommandContext, device: str | None, id: str | None) -> Any:
    """QEMU's qmp_get_blk/find_device: a BlockBackend name or a qdev id."""
    if (device is None) == (id is None):
        raise QmpError("Need exactly one of 'device' and 'id'")
    if device is not None:
        dev = ctx.machine.find_block_device(device)
        if dev is None:
            raise QmpError(f"Device '{device}' not found", "DeviceNotFound")
        return dev
    for d in ctx.machine.block_devices:
        if d.qdev and d.qdev.split("/")[-1] == id:
            return d
    if any(d.id == id for d in ctx.machine.config.devices):
        # a virtio-blk-pci proxy: its block backend belongs to the virtio-backend child
        raise QmpError("Device does not have a block device backend")
    raise QmpError(f"Device '{id}' not found", "DeviceNotFound")


@qemu_command("block_set_io_throttle", boxed=True)
def block_set_io_throttle(ctx: CommandContext, args: dict) -> dict:
    """Limits of 0 everywhere mean no throttling, which is what emu does; any limit needs
    a throttle group emu does not have."""
    _find_device(ctx, args.get("device"), args.get("id"))
    limits = {k: v for k, v in args.items() if k not in ("device", "id", "group")}
    if any(isinstance(v, int) and not isinstance(v, bool) and v for v in limits.values()):
        raise unsupported("block_set_io_throttle", "I/O throttling")
    return {}


def _removable(name: str) -> Any:
    def handler(ctx: CommandContext, args: dict) -> dict:
        dev = _find_device(ctx, args.get("device"), args.get("id"))
        if not dev.removable:
            raise QmpError(f"Device '{dev.name}' is not removable")
        raise unsupported(name, "removable media")
    handler.__name__ = name.replace("-", "_")
    return handler


for _n in ("eject", "blockdev-open-tray", "blockdev-close-tray"):
    qemu_command(_n, boxed=True)(_removable(_n))


@qemu_command("watchdog-set-action")
def watchdog_set_action(ctx: CommandContext, action: str) -> dict:
    """emu has no watchdog device, so no action can ever be taken (accepted as QEMU)."""
    return {}


@qemu_command("set-action", boxed=True)
def set_action(ctx: CommandContext, args: dict) -> dict:
    other = {k: v for k, v in args.items() if k != "watchdog"}
    if other:
        raise unsupported("set-action", "changing the reboot/shutdown/panic actions at run time")
    return {}


_UNSUPPORTED = {
    "drive-mirror": "the mirror block job",
    "blockdev-mirror": "the mirror block job",
    "change-backing-file": "changing a backing file name at run time",
    "block-set-write-threshold": "write thresholds",
    "blockdev-create": "the blockdev-create job",
    "x-blockdev-amend": "the amend job",
    "blockdev-reopen": "reopening block nodes",
    "x-blockdev-change": "quorum children",
    "x-blockdev-set-iothread": "iothreads",
    "x-debug-query-block-graph": "the block graph dump",
    "x-debug-block-dirty-bitmap-sha256": "dirty bitmap hashes",
    "block-latency-histogram-set": "latency histograms",
    "blockdev-change-medium": "removable media",
    "blockdev-insert-medium": "removable media",
    "blockdev-remove-medium": "removable media",
    "nbd-server-start": "the NBD server",
    "block-export-add": "block exports",
}


def _lookups(ctx: CommandContext, name: str, args: dict) -> None:
    """The lookups QEMU makes before the work emu cannot do, so a wrong name gets QEMU's
    error rather than ours."""
    from emu.qmp.commands.block import _lookup_bs

    if name == "block-set-write-threshold":
        g = ctx.machine.block_graph
        if g is None or g.lookup(args["node-name"]) is None:
            raise QmpError(f"Device '{args['node-name']}' not found")
    elif name == "block-latency-histogram-set":
        _find_device(ctx, None, args["id"])
    elif name == "drive-mirror":
        _lookup_bs(ctx, args["device"], args["device"])


def _unsupported_handler(name: str, what: str) -> Any:
    def handler(ctx: CommandContext, args: dict) -> Any:
        _lookups(ctx, name, args)
        raise unsupported(name, what)
    handler.__name__ = name.replace("-", "_")
    return handler


for _n, _w in _UNSUPPORTED.items():
    qemu_command(_n, boxed=True)(_unsupported_handler(_n, _w))


# ----------------------------------------------------------------- block_resize

#: BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB
MAX_IMAGE_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)


def resize_node(machine: Any, bs: Any, size: int) -> None:
    """QEMU 7.2's block_resize on node ``bs`` (also HMP ``qemu-io … "truncate N"``).

    Checks in QEMU's order (permission of a protocol node under a format node, maximum
    length, read-only, qcow2's 512-byte multiple), then the resize inside a drained
    section of the devices on ``bs``; after it, each virtio-blk device on ``bs`` raises
    its configuration-change interrupt (QEMU's virtio_blk_resize); every backend on ``bs``
    calls its resize notifiers (IDE refreshes its IDENTIFY data, without an interrupt, as QEMU).

    :raises QmpError: with QEMU's texts.
    """
    from emu.errors import EmuError
    from emu.qmp.errors import desc_of

    g = machine.block_graph
    for parent in (g.nodes() if g is not None else []):
        if parent.file is bs:
            raise QmpError(
                f"Permission conflict on node '{bs.node_name}': permissions 'resize' are "
                "both required by an unnamed block device (uses node "
                f"'{bs.node_name}' as 'root' child) and unshared by node "
                f"'{parent.node_name}' (uses node '{bs.node_name}' as 'file' child).")
    if size > MAX_IMAGE_LENGTH:
        raise QmpError(f"offset({size}) exceeds maximum({MAX_IMAGE_LENGTH})")
    if bs.read_only:
        raise QmpError("Image is read-only")
    if bs.drv == "qcow2" and size % 512:
        raise QmpError("The new size must be a multiple of 512")
    devices = [d for d in machine.block_devices if d.node is bs]
    backends = [d.backend for d in devices if d.backend is not None]
    try:
        with machine.quiesce(backends, reason="block_resize"):
            bs.truncate(size)
    except QmpError:
        raise
    except EmuError as e:
        code = getattr(e, "errno", None)
        if isinstance(code, int) and code > 0 and str(e).startswith("Truncate of "):
            # the file protocol's ftruncate failed: QEMU's raw_co_truncate text
            raise QmpError(f"Could not resize file: {os.strerror(code)}") from e
        raise QmpError(desc_of(e)) from e
    except OSError as e:
        raise QmpError(f"Could not resize file: {os.strerror(e.errno or 5)}") from e
    for b in backends:
        b.resized()             # devices that listen (IDE: its IDENTIFY capacity words)
    hw = getattr(machine, "hardware", None)
    for fn in (getattr(hw, "virtio", None) or {}).values():
        dev = getattr(fn, "device", None)
        if dev is not None and any(getattr(dev, "blk", None) is b for b in backends):
            dev.config_changed()


@qemu_command("block_resize")
def block_resize(ctx: CommandContext, size: int, device: str | None = None,
                 node_name: str | None = None) -> dict:
    from emu.qmp.commands.block import _lookup_bs

    bs = _lookup_bs(ctx, device or None, node_name)
    if size < 0:
        raise QmpError("Parameter 'size' expects a >0 size")
    resize_node(ctx.machine, bs, size)
    return {}

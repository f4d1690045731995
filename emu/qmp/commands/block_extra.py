"""Block commands beyond queries, snapshots, bitmaps and backup: NBD/exports, throttling,
removable media, and the block jobs and graph changes emu's block layer does not offer
yet (stream, mirror, commit, create, amend, reopen: ``emu does not support`` errors after
QEMU's argument checks).
"""

from __future__ import annotations

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
    "block_resize": "resizing images at run time",
    "block-commit": "the commit block job",
    "block-stream": "the stream block job",
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

    if name == "block_resize":
        _lookup_bs(ctx, args.get("device"), args.get("node-name"))
    elif name == "block-set-write-threshold":
        g = ctx.machine.block_graph
        if g is None or g.lookup(args["node-name"]) is None:
            raise QmpError(f"Device '{args['node-name']}' not found")
    elif name == "block-latency-histogram-set":
        _find_device(ctx, None, args["id"])
    elif name in ("block-commit", "block-stream", "drive-mirror"):
        _lookup_bs(ctx, args["device"], args["device"])


def _unsupported_handler(name: str, what: str) -> Any:
    def handler(ctx: CommandContext, args: dict) -> Any:
        _lookups(ctx, name, args)
        raise unsupported(name, what)
    handler.__name__ = name.replace("-", "_")
    return handler


for _n, _w in _UNSUPPORTED.items():
    qemu_command(_n, boxed=True)(_unsupported_handler(_n, _w))

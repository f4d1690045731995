"""Subsystems emu does not have: migration, COLO/Xen, record/replay, dirty-rate, networking,
VNC/SPICE/input, rocker, memory dumps, VM-state snapshots.

Where QEMU 7.2 answers for a machine without the feature (no migration running, no
replay, no NIC, ``-display none``), emu gives QEMU's exact reply or error (checked against
qemu-system-x86_64 7.2 ``-machine pc``); a command that would need the missing subsystem
to do its work gets ``emu does not support …``.  Arguments are always checked first, with
QEMU's schema.
"""

from __future__ import annotations

from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, qemu_command
from emu.qmp.errors import DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, unsupported

#: QEMU 7.2's migration capabilities, in query-migrate-capabilities' order
MIGRATION_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt")

#: QEMU 7.2's default migration parameters (query-migrate-parameters)
MIGRATION_PARAMETERS = {
    "cpu-throttle-tailslow": False, "xbzrle-cache-size": 67108864, "cpu-throttle-initial": 20,
    "announce-max": 550, "decompress-threads": 2, "compress-threads": 8, "compress-level": 1,
    "multifd-channels": 2, "multifd-zstd-level": 1, "announce-initial": 50,
    "block-incremental": False, "compress-wait-thread": True, "downtime-limit": 300,
    "tls-authz": "", "multifd-compression": "none", "announce-rounds": 5,
    "announce-step": 100, "tls-creds": "", "multifd-zlib-level": 1, "max-cpu-throttle": 99,
    "max-postcopy-bandwidth": 0, "tls-hostname": "", "throttle-trigger-threshold": 50,
    "max-bandwidth": 134217728, "x-checkpoint-delay": 20000, "cpu-throttle-increment": 10,
}


def _state(ctx: CommandContext) -> dict[str, Any]:
    m = ctx.machine
    st = getattr(m, "qmp_migration", None)
    if st is None:
        st = {"caps": {c: False for c in MIGRATION_CAPABILITIES},
              "params": dict(MIGRATION_PARAMETERS)}
        m.qmp_migration = st
    return st


def _register(name: str, fn: Any) -> None:
    fn.__name__ = name.replace("-", "_")
    qemu_command(name, boxed=True)(fn)


def _reply(name: str, value: Any) -> None:
    import copy

    _register(name, lambda ctx, args: copy.deepcopy(value))


def _error(name: str, desc: str, cls: str = "GenericError") -> None:
    def fn(ctx: CommandContext, args: dict) -> Any:
        raise QmpError(desc, cls)
    _register(name, fn)


def _unsupported(name: str, what: str) -> None:
    def fn(ctx: CommandContext, args: dict) -> Any:
        raise unsupported(name, what)
    _register(name, fn)


# ------------------------------------------------------------------ migration
_reply("query-migrate", {})
_reply("migrate_cancel", {})
_unsupported("migrate", "migration")
_error("migrate-incoming", "'-incoming' was not specified on the command line")
_error("migrate-continue", "Migration not in expected state: active")
_error("migrate-recover", "Migrate recover can only be run when postcopy is paused.")
_error("migrate-start-postcopy",
       "Enable postcopy with migrate_set_capability before the start of migration")
_error("x-colo-lost-heartbeat", "The feature 'colo' is not enabled")
_reply("query-colo-status", {"last-mode": "none", "mode": "none", "reason": "none"})
_reply("query-xen-replication-status", {"error": False})
_reply("xen-colo-do-checkpoint", {})
_unsupported("xen-set-replication", "Xen replication")
_unsupported("xen-save-devices-state", "saving device state")
_unsupported("xen-load-devices-state", "loading device state")
_unsupported("xen-set-global-dirty-log", "dirty logging")
_unsupported("calc-dirty-rate", "dirty-rate measurement")
_reply("query-dirty-rate", {"status": "unstarted", "sample-pages": 0, "mode": "page-sampling",
                            "start-time": 0, "calc-time": 0})
_error("set-vcpu-dirty-limit", "dirty page limit feature requires KVM with accelerator "
       "property 'dirty-ring-size' set'")
_reply("cancel-vcpu-dirty-limit", {})
_reply("query-vcpu-dirty-limit", [])
for _n in ("snapshot-save", "snapshot-load", "snapshot-delete"):
    _unsupported(_n, "VM state snapshots")


@qemu_command("client_migrate_info")
def client_migrate_info(ctx: CommandContext, protocol: str, hostname: str,
                        **kw: Any) -> dict:
    if protocol == "spice":
        raise QmpError("SPICE is not in use", DEVICE_NOT_ACTIVE)
    raise QmpError("Parameter 'protocol' expects 'spice'")


@qemu_command("query-migrate-capabilities")
def query_migrate_capabilities(ctx: CommandContext) -> list:
    return [{"state": v, "capability": k} for k, v in _state(ctx)["caps"].items()]


@qemu_command("migrate-set-capabilities")
def migrate_set_capabilities(ctx: CommandContext, capabilities: list) -> dict:
    caps = _state(ctx)["caps"]
    for c in capabilities:
        caps[c["capability"]] = c["state"]
    return {}


@qemu_command("query-migrate-parameters")
def query_migrate_parameters(ctx: CommandContext) -> dict:
    return dict(_state(ctx)["params"])


_RANGES = {"compress-level": (0, 9), "compress-threads": (1, 255),
           "decompress-threads": (1, 255), "multifd-channels": (1, 255),
           "multifd-zlib-level": (0, 9), "multifd-zstd-level": (0, 20),
           "cpu-throttle-initial": (1, 99), "cpu-throttle-increment": (1, 99),
           "max-cpu-throttle": (1, 99), "throttle-trigger-threshold": (1, 100)}


@qemu_command("migrate-set-parameters", boxed=True)
def migrate_set_parameters(ctx: CommandContext, args: dict) -> dict:
    for k, (lo, hi) in _RANGES.items():
        if k in args and not lo <= args[k] <= hi:
            raise QmpError(f"Parameter '{k.replace('-', '_')}' expects a value between "
                           f"{lo} and {hi}" if k != "throttle-trigger-threshold" else
                           f"Parameter '{k.replace('-', '_')}' expects an integer in the "
                           f"range of {lo} to {hi}")
    params = _state(ctx)["params"]
    for k, v in args.items():
        if isinstance(v, (dict, list)):
            continue                    # StrOrNull wrappers: tls-* given as null mean ""
        params[k] = "" if v is None else v
    return {}


# ------------------------------------------------------------------ record/replay
_reply("query-replay", {"icount": 0, "mode": "none"})
_error("replay-break", "setting the breakpoint is allowed only in play mode")
_error("replay-delete-break", "replay breakpoints are allowed only in play mode")
_error("replay-seek", "replay must be enabled to seek")
_error("x-exit-preconfig", "The command is permitted only in 'preconfig' state")

# ------------------------------------------------------------------ networking
_reply("announce-self", {})
_unsupported("netdev_add", "network backends")


@qemu_command("netdev_del")
def netdev_del(ctx: CommandContext, id: str) -> dict:
    raise QmpError(f"Device '{id}' not found", DEVICE_NOT_FOUND)


@qemu_command("set_link")
def set_link(ctx: CommandContext, name: str, up: bool) -> dict:
    raise QmpError(f"Device '{name}' not found", DEVICE_NOT_FOUND)


@qemu_command("query-rx-filter")
def query_rx_filter(ctx: CommandContext, name: str | None = None) -> list:
    if name is not None:
        raise QmpError(f"invalid net client name: {name}")
    return []


for _n in ("query-rocker", "query-rocker-ports", "query-rocker-of-dpa-flows",
           "query-rocker-of-dpa-groups"):
    def _rocker(ctx: CommandContext, args: dict) -> Any:
        raise QmpError(f"rocker {args['name']} not found")
    _register(_n, _rocker)

# ------------------------------------------------------------------ display and input
_error("screendump", "There is no console to take a screendump from")
_error("change-vnc-password", "Could not set password")
_reply("display-reload", {})
_error("display-update", "Can not find vnc display")
_unsupported("send-key", "keyboard input injection")
_unsupported("input-send-event", "input event injection")


@qemu_command("set_password", boxed=True)
def set_password(ctx: CommandContext, args: dict) -> dict:
    if args["protocol"] == "spice":
        raise QmpError("SPICE is not in use", DEVICE_NOT_ACTIVE)
    raise QmpError("Could not set password")


@qemu_command("expire_password", boxed=True)
def expire_password(ctx: CommandContext, args: dict) -> dict:
    if args["protocol"] == "spice":
        raise QmpError("SPICE is not in use", DEVICE_NOT_ACTIVE)
    raise QmpError("Could not set password expire time")


# ------------------------------------------------------------------ dumps, virtio
_unsupported("dump-guest-memory", "guest memory dumps")


@qemu_command("x-query-virtio")
def x_query_virtio(ctx: CommandContext) -> list:
    out = []
    for d in ctx.machine.block_devices:
        if d.qdev.endswith("/virtio-backend"):
            out.append({"name": "virtio-blk", "path": d.qdev})
    return out


for _n in ("x-query-virtio-status", "x-query-virtio-queue-status",
           "x-query-virtio-vhost-queue-status", "x-query-virtio-queue-element"):
    def _virtio(ctx: CommandContext, args: dict, _n: str = _n) -> Any:
        path = args["path"]
        if not any(d.qdev == path for d in ctx.machine.block_devices):
            raise QmpError(f"Path {path} is not a VirtIODevice")
        raise unsupported(_n, "virtio introspection")
    _register(_n, _virtio)

"""The QOM tree as far as emu has objects (qom-list, qom-get, qom-set, qom-list-types),
and object/device hot-plug commands, which emu does not support (their arguments and
lookups still give QEMU's errors).

Tree: ``/`` with ``machine`` (``pc-i440fx-7.2-machine``), ``objects`` (``pc.ram``) and
``chardevs``; ``/machine/peripheral``, ``/machine/peripheral-anon`` and
``/machine/unattached`` hold the command line's devices at their QEMU paths.  Every object
has the ``type`` property; devices also show the properties given on the command line.
"""

from __future__ import annotations

from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, command, qemu_command
from emu.qmp import qapi72
from emu.qmp.errors import DEVICE_NOT_FOUND, unsupported
from emu.qmp.schema import Struct

MACHINE_TYPE = "pc-i440fx-7.2-machine"
#: QOM types emu implements: name -> parent
TYPES = {
    MACHINE_TYPE: "generic-pc-machine", "pc-i440fx-2.0-machine": "generic-pc-machine",
    "none-machine": "machine", "qemu64-x86_64-cpu": "x86_64-cpu",
    "virtio-blk-pci": "virtio-blk-pci-base", "ide-hd": "ide-device",
    "ide-cd": "ide-device", "isa-debug-exit": "isa-device", "i440FX": "pci-device",
    "PIIX3": "pci-device", "piix3-ide": "pci-ide", "memory-backend-ram": "memory-backend",
    "container": "object", "chardev-socket": "chardev", "chardev-stdio": "chardev-fd",
    "chardev-file": "chardev-fd", "chardev-null": "chardev", "chardev-ringbuf": "chardev",
    "chardev-memory": "chardev-ringbuf",
}
DEVICE_TYPES = {"virtio-blk-pci", "ide-hd", "ide-cd", "isa-debug-exit"}


class _Obj:
    def __init__(self, type_: str, props: dict[str, Any] | None = None) -> None:
        self.type = type_
        self.props = props or {}
        self.children: dict[str, _Obj] = {}


def _tree(ctx: CommandContext) -> _Obj:
    root = _Obj("container")
    objects = root.children["objects"] = _Obj("container")
    machine = root.children["machine"] = _Obj(MACHINE_TYPE)
    objects.children["pc.ram"] = _Obj("memory-backend-ram")
    chardevs = root.children["chardevs"] = _Obj("container")
    for c in ctx.machine.config.chardevs:
        chardevs.children[c.id] = _Obj(f"chardev-{c.backend}")
    for cid, ch in (getattr(ctx.machine, "qmp_chardevs", None) or {}).items():
        chardevs.children[cid] = _Obj(f"chardev-{ch.backend_name}")
    for sub in ("peripheral", "peripheral-anon", "unattached"):
        machine.children[sub] = _Obj("container")
    for d in ctx.machine.config.devices:
        path = d.qdev_path.split("/")
        if len(path) < 4 or path[1] != "machine":
            continue
        parent = machine.children.get(path[2])
        if parent is None:
            continue
        dev = _Obj(d.driver, dict(d.props))
        parent.children[path[3]] = dev
        if len(path) > 4 and path[4] == "virtio-backend":
            dev.children["virtio-backend"] = _Obj("virtio-blk-device")
    return root


def _resolve(ctx: CommandContext, path: str) -> _Obj:
    obj = _tree(ctx)
    if not path.startswith("/"):
        raise QmpError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
    for part in [p for p in path.split("/") if p]:
        nxt = obj.children.get(part)
        if nxt is None:
            raise QmpError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
        obj = nxt
    return obj


@qemu_command("qom-list")
def qom_list(ctx: CommandContext, path: str) -> list:
    obj = _resolve(ctx, path)
    out = [{"name": "type", "type": "string"}]
    out += [{"name": k, "type": "str"} for k in obj.props]
    out += [{"name": k, "type": f"child<{c.type}>"} for k, c in obj.children.items()]
    return out


@qemu_command("qom-get")
def qom_get(ctx: CommandContext, path: str, property: str) -> Any:
    obj = _resolve(ctx, path)
    if property == "type":
        return obj.type
    if property in obj.props:
        return obj.props[property]
    raise QmpError(f"Property '{obj.type}.{property}' not found")


@qemu_command("qom-set")
def qom_set(ctx: CommandContext, path: str, property: str, value: Any) -> dict:
    obj = _resolve(ctx, path)
    if property != "type" and property not in obj.props:
        raise QmpError(f"Property '{obj.type}.{property}' not found")
    raise unsupported("qom-set", "setting QOM properties")


@qemu_command("qom-list-types")
def qom_list_types(ctx: CommandContext, implements: str | None = None,
                   abstract: bool = False) -> list:
    out = []
    for name, parent in TYPES.items():
        if implements is not None:
            chain, t = set(), name
            while t is not None and t not in chain:
                chain.add(t)
                t = TYPES.get(t)
            if implements not in chain:
                continue
        out.append({"name": name, "parent": parent})
    return out


@qemu_command("qom-list-properties")
def qom_list_properties(ctx: CommandContext, typename: str) -> list:
    if typename not in TYPES:
        raise QmpError(f"Class '{typename}' not found", DEVICE_NOT_FOUND)
    raise unsupported("qom-list-properties", "QOM property introspection")


@qemu_command("device-list-properties")
def device_list_properties(ctx: CommandContext, typename: str) -> list:
    if typename not in TYPES:
        raise QmpError(f"Device '{typename}' not found", DEVICE_NOT_FOUND)
    raise unsupported("device-list-properties", "device property introspection")


@qemu_command("object-add", boxed=True)
def object_add(ctx: CommandContext, args: dict) -> dict:
    raise unsupported("object-add", f"creating '{args['qom-type']}' objects")


@qemu_command("object-del")
def object_del(ctx: CommandContext, id: str) -> dict:
    raise QmpError(f"object '{id}' not found")


class _DeviceAddArgs(Struct):
    """device_add's arguments: QEMU does not generate a visitor for them (``gen: false``)
    but takes any object with a string ``driver`` and passes the rest as properties.
    Introspection shows QEMU's members (driver, bus, id)."""

    def __init__(self) -> None:
        super().__init__("device_add-arg")
        self.members = list(qapi72.arg_type("device_add").members)

    def check(self, value: Any, full: str, name: str | None) -> Any:
        if not isinstance(value, dict):
            raise QmpError("Invalid parameter type for 'null', expected: object")
        if "driver" not in value:
            raise QmpError("Parameter 'driver' is missing")
        if not isinstance(value["driver"], str):
            raise QmpError("Invalid parameter type for 'driver', expected: string")
        return dict(value)


@command("device_add", args=_DeviceAddArgs(), returns=qapi72.ret_type("device_add"),
         features=qapi72.features("device_add"), boxed=True)
def device_add(ctx: CommandContext, args: dict) -> dict:
    driver = args["driver"]
    if driver not in DEVICE_TYPES:
        raise QmpError(f"'{driver}' is not a valid device model name")
    raise unsupported("device_add", "device hot-plug")


@qemu_command("device_del")
def device_del(ctx: CommandContext, id: str) -> dict:
    ids = {d.id for d in ctx.machine.config.devices if d.id}
    if id not in ids and not id.startswith("/"):
        raise QmpError(f"Device '{id}' not found", DEVICE_NOT_FOUND)
    raise unsupported("device_del", "device hot-unplug")

"""Open every ``-drive`` / ``-blockdev`` of a configuration into the machine.

Each ``-drive`` becomes a named :class:`emu.machine.pc.BlockDevice` with the qdev path of
the device it is attached to (QEMU's naming, see :mod:`emu.machine.config`) and, through
the block layer (``emu.block.node.BlockGraph``), its node graph: a format node on a
protocol node, auto-named ``#block…`` unless ``node-name=`` was given.
"""

from __future__ import annotations

from typing import Any

from emu.errors import BlockError, ConfigError, EmuError
from emu.machine.config import DriveConfig, MachineConfig
from emu.machine.pc import BlockDevice, Machine

__all__ = ["open_drives", "drive_qdev_paths"]


def drive_qdev_paths(cfg: MachineConfig) -> dict[str, str]:
    """drive id -> the qdev path of the device using it (``""`` if none)."""
    out: dict[str, str] = {}
    for dev in cfg.devices:
        drv = dev.props.get("drive")
        if drv is not None:
            out[drv] = dev.qdev_path
    return out


def _graph() -> Any:
    try:
        from emu.block.node import BlockGraph
    except ImportError:
        return None
    return BlockGraph()


def _backend_for(node: Any, name: str, readonly: bool) -> Any:
    try:
        from emu.block.api import BlockBackend
    except ImportError:
        return None
    try:
        return BlockBackend(node, name=name)
    except TypeError:
        return BlockBackend(node)


#: QEMU's bdrv_parse_discard_flags: ``-drive discard=`` values -> unmap?
_DRIVE_DISCARD = {"off": False, "ignore": False, "on": True, "unmap": True}
_DETECT_ZEROES = ("off", "on", "unmap")


def _drive_discard_options(d: DriveConfig) -> tuple[bool, str]:
    """``-drive`` ``discard=`` (default ignore: guest discards succeed and do nothing) and
    ``detect-zeroes=``, with QEMU 7.2's texts for bad values."""
    disc = d.options.get("discard", "ignore")
    if disc not in _DRIVE_DISCARD:
        raise ConfigError("Invalid discard option")
    dz = d.options.get("detect-zeroes", "off")
    if dz not in _DETECT_ZEROES:
        raise ConfigError(f"invalid parameter value: {dz}")
    return _DRIVE_DISCARD[disc], dz


def _blockdev_discard_options(options: dict[str, Any]) -> None:
    """``-blockdev`` ``discard=ignore|unmap`` and ``detect-zeroes=off|on|unmap`` (QAPI enums,
    QEMU 7.2's texts); detect-zeroes=unmap needs discard=unmap (bdrv_open_common)."""
    disc = options.get("discard", "ignore")
    if disc not in ("ignore", "unmap"):
        raise BlockError(f"Parameter 'discard' does not accept value '{disc}'")
    dz = options.get("detect-zeroes", "off")
    if dz not in _DETECT_ZEROES:
        raise BlockError(f"Parameter 'detect-zeroes' does not accept value '{dz}'")
    if dz == "unmap" and disc != "unmap":
        raise BlockError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap")


def _checked_blockdev_options(b: Any) -> dict[str, Any]:
    """A ``-blockdev``'s options as QMP ``blockdev-add`` takes them: keyval strings typed by
    the schema (``read-only=off`` is False, ``offset=4096`` an integer), then checked with
    QEMU's texts, as QEMU's visitor does for both of its syntaxes."""
    from emu.qmp.commands.block import BLOCKDEV_OPTIONS
    from emu.qmp.schema import keyval_typed

    options = b.options if b.json else keyval_typed(BLOCKDEV_OPTIONS, b.options)
    return BLOCKDEV_OPTIONS.check(options, "", None)


def open_drive(machine: Machine, d: DriveConfig, qdev: str) -> BlockDevice:
    """Open one drive (or register an empty cdrom) and add it to ``machine``."""
    discard_unmap, detect_zeroes = _drive_discard_options(d)
    if machine.block_graph is not None and machine.block_graph.lookup(d.id) is not None:
        raise ConfigError(f"Device name '{d.id}' conflicts with an existing node name")
    # a BlockBackend without a device counts as removable (QEMU: no device, no tray)
    dev = BlockDevice(name=d.id, qdev=qdev, media=d.media,
                      removable=d.media == "cdrom" or not qdev)
    dev.extra["drive"] = d
    graph = machine.block_graph
    if d.file and graph is not None:
        try:
            options = dict(d.options)
            fmt = d.format or options.pop("driver", None)
            if d.file.startswith("rbd:"):
                # -drive opens with auto-read-only=on (QEMU's drive_new): an rbd @snap
                # image then opens read-only instead of being refused.
                options.setdefault("auto-read-only", True)
            node = graph.open_image(d.file, fmt, read_only=d.readonly,
                                    node_name=d.node_name, cache=d.cache,
                                    options=options or None)
        except EmuError as e:
            raise ConfigError(str(e)) from e
        except OSError as e:
            raise ConfigError(f"Could not open '{d.file}': {e.strerror}") from e
        if qdev and node.read_only and not d.readonly and d.file.startswith("rbd:"):
            # auto-read-only made an rbd @snap read-only, but the guest's device wants to
            # write: QEMU's permission check refuses it with this text.
            graph.remove(node)
            if d.interface == "virtio":   # created with the -drive option: its prefix
                raise ConfigError("Block node is read-only")
            from emu.cli import OptionError   # other devices realize later: no prefix
            raise OptionError("Block node is read-only")
        dev.node = node
        dev.backend = _backend_for(node, d.id, d.readonly)
        if dev.backend is not None:
            dev.backend.discard_unmap = discard_unmap
            dev.backend.detect_zeroes = detect_zeroes
    machine.add_block_device(dev)
    return dev


def open_drives(machine: Machine) -> None:
    """Open every drive of ``machine.config``; ConfigError carries QEMU's text and the
    option it came from (``-drive …``)."""
    from emu.cli import OptionError

    cfg = machine.config
    machine.block_graph = _graph()
    paths = drive_qdev_paths(cfg)
    for b in cfg.blockdevs:
        if machine.block_graph is None:
            break
        try:
            options = _checked_blockdev_options(b)
            _blockdev_discard_options(options)
            machine.block_graph.blockdev_add(options)
        except (BlockError, EmuError) as e:
            raise OptionError(str(e), f"-blockdev {b.spec}") from e
    for d in cfg.drives:
        try:
            open_drive(machine, d, paths.get(d.id, ""))
        except OptionError:
            raise
        except ConfigError as e:
            raise OptionError(str(e), f"-drive {d.spec}") from e
    _attach_node_devices(machine)


def _attach_node_devices(machine: Machine) -> None:
    """Devices whose ``drive=`` names a node (``-blockdev ...,node-name=n0 -device
    virtio-blk-pci,drive=n0``): each gets a BlockBackend of its own on that node, with no
    name (query-block lists it as device ``""`` with its qdev path), as QEMU's drive
    property does (blk_by_name, then bdrv_lookup_bs and blk_new).  A device that writes
    takes the node's write permission and shares none: a second one on the same node is
    QEMU's permission conflict; an ``ide-hd`` on a read-only node is refused, a virtio-blk
    one becomes a read-only disk."""
    from emu.cli import OptionError

    cfg = machine.config
    graph = machine.block_graph
    if graph is None:
        return
    drive_ids = {d.id for d in cfg.drives}
    writers: dict[int, str] = {}        # id(node) -> qdev path of the device writing to it
    for dev in cfg.devices:
        drv = dev.props.get("drive")
        if drv is None or drv in drive_ids or not dev.driver.startswith(("virtio-blk", "ide-")):
            continue
        where = f"-device {dev.spec}"
        node = graph.lookup(drv)
        if node is None:
            raise OptionError(f"Property '{_model(dev.driver)}.drive' can't find value '{drv}'", where)
        writes = not node.read_only
        if dev.driver.startswith("ide-") and node.read_only:
            raise OptionError("Block node is read-only", where)
        other = writers.get(id(node))
        if other is None:
            other = next((b.qdev or b.name for b in machine.block_devices
                          if b.node is node and b.qdev and b.backend is not None
                          and not b.backend.read_only), None)
        if writes and other is not None:
            raise OptionError(
                f"Permission conflict on node '{drv}': permissions 'write' are both required by "
                f"block device '{other}' (uses node '{drv}' as 'root' child) and unshared by block "
                f"device '{dev.qdev_path}' (uses node '{drv}' as 'root' child).", where)
        if writes:
            writers[id(node)] = dev.qdev_path
        bdev = BlockDevice(name="", qdev=dev.qdev_path, removable=False)
        bdev.node = node
        bdev.backend = _backend_for(node, "", node.read_only)
        bdev.extra["node_attached"] = drv
        bdev.extra["device"] = dev
        machine.add_block_device(bdev)


def _model(driver: str) -> str:
    from emu.cli import BLOCK_DEVICE_MODELS

    return BLOCK_DEVICE_MODELS.get(driver, driver)

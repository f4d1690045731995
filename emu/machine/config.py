"""The machine's configuration, as the command line (or a test) describes it.

:mod:`emu.cli` turns QEMU's options into these records; :class:`emu.machine.pc.Machine`
builds the PC from them.  Names follow QEMU: a ``-drive`` without ``id=`` is called
``ide0-hd0``, ``virtio0``, … (:func:`drive_default_id`), and every device has the qdev path
QEMU gives it (:attr:`DeviceConfig.qdev_path`).
"""

from __future__ import annotations

TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Any


class _Factory:
    """A default made fresh for each instance (``dataclasses.field(default_factory=…)``)."""

    __slots__ = ("make",)

    def __init__(self, make: type) -> None:
        self.make = make


_REQUIRED = object()


class _Record:
    """A plain record class: the annotated class attributes, in order, are its fields
    (``__init__`` positional or keyword, ``==``, ``repr``), each with the class attribute as
    its default (``_Factory(list)``: a fresh list per instance).  Not dataclasses: importing
    them (and inspect) and building the classes costs every launch ~15 ms before the QMP
    greeting."""

    _FIELDS: tuple[tuple[str, object], ...] = ()

    def __init_subclass__(cls) -> None:
        fields = []
        for name in cls.__dict__.get("__annotations__", {}):
            default = cls.__dict__.get(name, _REQUIRED)
            if isinstance(default, _Factory):
                delattr(cls, name)
            fields.append((name, default))
        cls._FIELDS = tuple(fields)

    def __init__(self, *args: object, **kw: object) -> None:
        fields = self._FIELDS
        name = type(self).__name__
        if len(args) > len(fields):
            raise TypeError(f"{name}() takes {len(fields)} positional arguments")
        for (key, _), value in zip(fields, args):
            if key in kw:
                raise TypeError(f"{name}() got multiple values for argument '{key}'")
            setattr(self, key, value)
        for key, default in fields[len(args):]:
            if key in kw:
                setattr(self, key, kw.pop(key))
            elif default is _REQUIRED:
                raise TypeError(f"{name}() missing required argument: '{key}'")
            else:
                setattr(self, key, default.make() if isinstance(default, _Factory) else default)
        if kw:
            raise TypeError(f"{name}() got an unexpected keyword argument '{next(iter(kw))}'")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k, _ in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, unhashable: as the dataclasses were

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={getattr(self, k)!r}" for k, _ in self._FIELDS)
        return f"{type(self).__name__}({inner})"

#: ``-drive if=`` values QEMU knows (``if_name[]`` in blockdev.c) and their devices per bus.
IF_MAX_DEVS = {"none": 0, "ide": 2, "scsi": 7, "floppy": 2, "pflash": 0, "mtd": 0,
               "sd": 0, "virtio": 0, "xen": 0}
#: number of IDE buses on the pc machine (PIIX3: primary and secondary channel).
PC_IDE_BUSES = 2


class DriveConfig(_Record):
    """One ``-drive``.

    :param spec: the option text as given (QEMU quotes it in error messages).
    :param id: the drive's name (``id=`` or QEMU's default, e.g. ``ide0-hd0``).
    :param interface: ``if=`` (``ide``, ``virtio``, ``none``, …).
    :param bus: bus number (``ide0`` → 0); :param unit: unit on that bus.
    :param options: every remaining block option (``file.filename``, ``driver``, …), as
        QEMU passes them to the block layer.
    """

    spec: str
    id: str
    interface: str
    bus: int
    unit: int
    index: int
    file: str | None = None
    format: str | None = None
    node_name: str | None = None
    media: str = "disk"
    readonly: bool = False
    cache: str | None = None
    aio: str | None = None
    options: dict[str, Any] = _Factory(dict)


class BlockdevConfig(_Record):
    """One ``-blockdev``: QEMU's nested options (``file.driver=file`` → ``{"file": {...}}``)."""

    spec: str
    options: dict[str, Any]
    #: given as JSON (``-blockdev '{"driver": ...}'``): the options are typed already;
    #: else keyval, every leaf a string until :func:`emu.qmp.schema.keyval_typed`
    json: bool = False


class DeviceConfig(_Record):
    """One ``-device`` (explicit, or implied by ``-drive if=virtio``/``if=ide``).

    :param qdev_path: QOM path as QEMU reports it in ``query-block`` ``qdev``: e.g.
        ``/machine/peripheral/vblk2/virtio-backend``.
    """

    spec: str
    driver: str
    id: str | None
    props: dict[str, str]
    qdev_path: str = ""
    implicit: bool = False


class ChardevConfig(_Record):
    """One character device backend (``-chardev``, or implied by ``-qmp``/``-serial``)."""

    spec: str
    backend: str
    id: str
    options: dict[str, str] = _Factory(dict)


class MonitorConfig(_Record):
    """One monitor: ``-mon chardev=ID,mode=control`` or ``-qmp …``."""

    chardev: str
    mode: str = "control"
    pretty: bool = False


class MachineConfig(_Record):
    """Everything the command line selected; defaults are QEMU's."""

    machine_type: str = "pc"
    accel: str = "tcg"
    memory_mib: int = 128
    start_paused: bool = False
    name: str | None = None
    drives: list[DriveConfig] = _Factory(list)
    blockdevs: list[BlockdevConfig] = _Factory(list)
    devices: list[DeviceConfig] = _Factory(list)
    chardevs: list[ChardevConfig] = _Factory(list)
    monitors: list[MonitorConfig] = _Factory(list)
    serials: list[str] = _Factory(list)
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    bios: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    nodefaults: bool = False
    no_shutdown: bool = False
    no_reboot: bool = False
    display: str | None = None
    vga: str | None = None
    #: ``-cpu``: the model (emu has one CPU, QEMU's qemu64; ``max`` names the same)
    cpu_model: str = "qemu64"
    #: ``-boot order=`` / ``once=`` letters (QEMU's pc default: floppy, disk, CD-ROM)
    boot_order: str = "cad"
    boot_once: str | None = None
    #: ``-rtc base=``: ``"utc"``, ``"localtime"`` or the start as UTC epoch seconds
    rtc_base: str | int = "utc"
    #: ``-rtc clock=``: ``host``, ``rt`` or ``vm`` (emu's RTC follows VM time in every case)
    rtc_clock: str = "host"
    #: ``-L``: directories searched for firmware (``-bios`` names, emu's default BIOS)
    firmware_dirs: list[str] = _Factory(list)


def drive_default_id(interface: str, bus: int, unit: int, media: str) -> str:
    """QEMU's name for a ``-drive`` without ``id=`` (blockdev.c ``drive_new``)."""
    mediastr = ""
    if interface in ("ide", "scsi"):
        mediastr = "-cd" if media == "cdrom" else "-hd"
    if IF_MAX_DEVS.get(interface, 0):
        return f"{interface}{bus}{mediastr}{unit}"
    return f"{interface}{mediastr}{unit}"

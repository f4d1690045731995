"""QEMU's command line -> :class:`emu.machine.config.MachineConfig`, and the process main.

Options follow qemu-system-x86_64 7.2: ``-opt value`` or ``--opt value``; option values
in QemuOpts syntax (``key=value,…``, ``,,`` for a literal comma, an implied first key for
``-machine``/``-chardev``/``-device``/``-accel``/``-display``/``-m``); ``-blockdev`` in
keyval syntax with dotted keys.  Errors are QEMU's: ``<prog>: <option text>: <message>``
on stderr and exit status 1 (``-foo: invalid option``, ``-m: requires an argument``, …).

Names are QEMU's: a ``-drive`` without ``id=`` is ``ide0-hd0``/``virtio0``/…; implicit
devices get QEMU's qdev paths (``/machine/unattached/device[18]`` for the first IDE disk,
``/machine/peripheral-anon/device[N]`` for anonymous ``-device``s and ``if=virtio``
drives, ``/machine/peripheral/<id>`` for devices with an id).
"""

from __future__ import annotations

import _signal   # signal's enums would cost enum's import before the greeting
import os
import sys

TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing before the greeting
if TYPE_CHECKING:
    from typing import Any, Callable

from emu.errors import ConfigError, EmuError
from emu.machine.config import (IF_MAX_DEVS, PC_IDE_BUSES, BlockdevConfig, ChardevConfig,
                                DeviceConfig, DriveConfig, MachineConfig, MonitorConfig,
                                drive_default_id)

__all__ = ["main", "parse_args", "OptionError", "parse_qemu_opts", "parse_keyval", "progname"]

QEMU_VERSION_STR = "7.2.22"
#: machine types accepted for ``-machine`` (all mean emu's i440FX-like PC)
MACHINE_TYPES = ("pc", "pc-i440fx-7.2", "pc-i440fx-2.0", "none")
#: device models ``-device`` accepts, with the property QEMU names in drive errors
BLOCK_DEVICE_MODELS = {"virtio-blk-pci": "virtio-blk-device", "ide-hd": "ide-hd",
                       "ide-cd": "ide-cd", "virtio-blk": "virtio-blk-device"}
OTHER_DEVICE_MODELS = ("isa-debug-exit", "isa-serial", "virtio-serial-pci")
DISPLAY_TYPES = ("none", "default", "gtk", "sdl", "egl-headless", "curses", "cocoa",
                 "dbus", "spice-app", "vnc")
VGA_TYPES = ("none", "std", "cirrus", "vmware", "qxl", "xenfb", "tcx", "cg3", "virtio")
CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
AIO_MODES = ("threads", "native", "io_uring")
BOOL_TRUE = ("on", "yes", "true", "y")
BOOL_FALSE = ("off", "no", "false", "n")


def progname() -> str:
    """The program name QEMU-style messages start with."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "emu"
    return "emu" if name in ("__main__.py", "-c", "", "-m") else name


class OptionError(ConfigError):
    """A command-line error; ``loc`` is the option text QEMU prefixes (may be empty)."""

    def __init__(self, msg: str, loc: str = "", more: tuple[str, ...] = ()) -> None:
        super().__init__(msg)
        self.loc = loc
        #: further messages QEMU prints for the same option (each with the prefix)
        self.more = more

    def render(self) -> str:
        prefix = f"{progname()}: "
        if self.loc:
            prefix += f"{self.loc}: "
        return "\n".join(prefix + m for m in (str(self),) + self.more)


# --------------------------------------------------------------------- option syntax

def parse_qemu_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """Split QemuOpts text ``a=1,b=x,,y,flag`` into ``[(key, value)]``.

    ``,,`` is a literal comma; a bare first word is the ``implied`` key's value; a bare
    later word ``flag`` means ``flag=on`` and ``noflag`` means ``flag=off`` (QEMU's
    deprecated short form).
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str]] = []
    for n, p in enumerate(parts):
        if "=" in p:
            k, v = p.split("=", 1)
            out.append((k, v))
        elif n == 0 and implied is not None:
            out.append((implied, p))
        elif p == "":
            continue
        elif p.startswith("no") and len(p) > 2:
            out.append((p[2:], "off"))
        else:
            out.append((p, "on"))
    return out


def parse_keyval(text: str) -> dict[str, Any]:
    """``-blockdev`` keyval syntax: ``driver=qcow2,file.driver=file`` -> nested dict (a bare
    first word is the driver, as QEMU's ``keyval_parse(optarg, "driver", ...)``)."""
    root: dict[str, Any] = {}
    for k, v in parse_qemu_opts(text, "driver"):
        node = root
        keys = k.split(".")
        for part in keys[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise OptionError(f"Parameters '{part}.*' are in conflict with parameter '{part}'")
            node = nxt
        if keys[-1] in node:
            raise OptionError(f"Parameter '{k}' is duplicate") if not isinstance(
                node[keys[-1]], dict) else OptionError(
                f"Parameter '{k}' is in conflict with parameters '{k}.*'")
        node[keys[-1]] = v
    return root


def parse_bool(value: str, key: str) -> bool:
    if value in BOOL_TRUE:
        return True
    if value in BOOL_FALSE:
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


_SIZE_SUFFIX = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_mem_size(text: str) -> int:
    """``-m`` value -> MiB (no suffix means MiB, as QEMU)."""
    opts = dict(parse_qemu_opts(text, "size"))
    value = opts.get("size", "")
    num = value.rstrip("bBkKmMgGtTpPeE")
    suffix = value[len(num):].lower()
    try:
        n = float(num) if num else None
    except ValueError:
        n = None
    if n is None or n < 0 or len(suffix) > 1 or suffix not in _SIZE_SUFFIX or "e" in num.lower():
        raise OptionError("Parameter 'size' expects a non-negative number below 2^64\n"
                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                          "tera-, peta-\nand exabytes, respectively.")
    size = int(n * _SIZE_SUFFIX[suffix])
    return max(1, size >> 20) if size else 128


# ----------------------------------------------------------------- the option table

class _Opt:
    __slots__ = ("name", "has_arg", "handler")

    def __init__(self, name: str, has_arg: bool,
                 handler: Callable[[_Builder, str], None] | None) -> None:
        self.name = name
        self.has_arg = has_arg
        self.handler = handler


class _Builder:
    """Accumulates options into a MachineConfig, checking them as QEMU does."""

    def __init__(self) -> None:
        self.cfg = MachineConfig()
        self.raw_drives: list[tuple[str, dict[str, str]]] = []
        self.raw_devices: list[tuple[str, list[tuple[str, str]]]] = []
        self.chardev_ids: set[str] = set()
        self.version = False
        self.help = False
        self.compat_monitors = 0
        self.serial_specs: list[str] = []
        self.add_fds: list[dict[str, str]] = []
        self.qtest: str | None = None
        #: ``(accelerator, option text)`` in command-line order (``-accel``, ``-machine
        #: accel=a:b``, ``-enable-kvm``); QEMU tries them in turn after creating chardevs
        self.accels: list[tuple[str, str]] = []
        self.cpu: str | None = None
        self.boot: dict[str, str] = {}
        self.rtc: dict[str, str] = {}
        self.list_data_dirs = False

    # -- chardev helpers
    def add_chardev(self, spec: str, backend: str, id: str, options: dict[str, str]) -> None:
        from emu.chardev import BACKENDS

        if backend not in BACKENDS:
            raise OptionError(f"'{backend}' is not a valid char driver name", spec)
        if id in self.chardev_ids:
            raise OptionError(f"Duplicate ID '{id}' for chardev", spec)
        if backend == "file" and not options.get("path"):
            raise OptionError("chardev: file: no filename given", spec)
        if backend == "socket" and not any(k in options for k in ("path", "port", "fd")):
            raise OptionError("Unable to parse FD number ", spec)
        for key in ("server", "wait", "append", "nodelay", "telnet", "websocket"):
            if key in options:
                try:
                    parse_bool(options[key], key)
                except OptionError as e:
                    raise OptionError(str(e), spec) from None
        self.chardev_ids.add(id)
        self.cfg.chardevs.append(ChardevConfig(spec, backend, id, options))

    def compat_chardev(self, loc: str, spec: str, id: str, fail: str = "") -> None:
        """QEMU's legacy chardev syntax (``-qmp``, ``-serial``): ``unix:PATH,…``,
        ``tcp:HOST:PORT,…``, ``stdio``, ``null``, ``file:PATH``."""
        head, sep, rest = spec.partition(",")
        extra = dict(parse_qemu_opts(rest)) if sep else {}
        try:
            for k in ("server", "wait"):
                if k in extra:
                    parse_bool(extra[k], k)
        except OptionError as e:
            raise OptionError(str(e), loc) from None
        if head.startswith("unix:"):
            self.add_chardev(loc, "socket", id, {"path": head[5:], **extra})
        elif head.startswith("tcp:"):
            hostport = head[4:]
            host, colon, port = hostport.rpartition(":")
            if not colon or not port:
                raise OptionError(f"parse error: {spec}", loc)
            self.add_chardev(loc, "socket", id, {"host": host, "port": port, **extra})
        elif head in ("stdio", "null"):
            self.add_chardev(loc, head, id, extra)
        elif head.startswith("file:"):
            self.add_chardev(loc, "file", id, {"path": head[5:], **extra})
        else:
            from emu.chardev import BACKENDS

            name = head.split(":", 1)[0]
            if name not in BACKENDS:
                raise OptionError(f"'{name}' is not a valid char driver", loc,
                                  (fail or f"parse error: {spec}",))
            self.add_chardev(loc, name, id, extra)


def _opt_machine(b: _Builder, arg: str) -> None:
    for k, v in parse_qemu_opts(arg, "type"):
        if k == "type":
            if v not in MACHINE_TYPES:
                raise OptionError("unsupported machine type\n"
                                  "Use -machine help to list supported machines")
            b.cfg.machine_type = v
        elif k == "accel":
            b.accels += [(a, "") for a in v.split(":")]
        elif k in ("usb", "dump-guest-core", "mem-merge", "vmport", "smm", "hpet", "graphics"):
            continue
        else:
            raise OptionError(f"Property 'pc-i440fx-7.2-machine.{k}' not found")


def _opt_accel(b: _Builder, arg: str) -> None:
    for k, v in parse_qemu_opts(arg, "accel"):
        if k == "accel":
            b.accels.append((v, f"-accel {arg}"))


def _opt_m(b: _Builder, arg: str) -> None:
    b.cfg.memory_mib = parse_mem_size(arg)


def _opt_drive(b: _Builder, arg: str) -> None:
    opts: dict[str, str] = {}
    for k, v in parse_qemu_opts(arg, None):
        opts[k] = v
    b.raw_drives.append((arg, opts))


def _opt_hda(b: _Builder, arg: str) -> None:
    b.raw_drives.append((arg, {"file": arg, "index": "0", "media": "disk"}))


def _opt_blockdev(b: _Builder, arg: str) -> None:
    if arg.lstrip().startswith("{"):
        # QEMU's -blockdev takes a JSON object too (the QMP blockdev-add arguments)
        import json

        try:
            opts = json.loads(arg)
        except ValueError as e:
            raise OptionError(f"JSON parse error, {e.msg.lower()}") from None
        if not isinstance(opts, dict):
            raise OptionError("Invalid parameter type for 'null', expected: object")
        if "driver" not in opts:
            raise OptionError("Parameter 'driver' is missing")
        b.cfg.blockdevs.append(BlockdevConfig(arg, opts, json=True))
        return
    opts = parse_keyval(arg)
    if "driver" not in opts:
        raise OptionError("Parameter 'driver' is missing")
    b.cfg.blockdevs.append(BlockdevConfig(arg, opts))


def _opt_device(b: _Builder, arg: str) -> None:
    b.raw_devices.append((arg, parse_qemu_opts(arg, "driver")))


def _opt_chardev(b: _Builder, arg: str) -> None:
    items = parse_qemu_opts(arg, "backend")
    opts = dict(items)
    backend = opts.pop("backend", "")
    cid = opts.pop("id", None)
    from emu.chardev import BACKENDS

    if backend not in BACKENDS:
        raise OptionError(f"'{backend}' is not a valid char driver name")
    if not cid:
        raise OptionError("chardev: no id specified")
    b.add_chardev(f"-chardev {arg}", backend, cid, opts)


def _opt_mon(b: _Builder, arg: str) -> None:
    opts = dict(parse_qemu_opts(arg, "chardev"))
    mode = opts.get("mode", "readline")
    if mode not in ("control", "readline"):
        raise OptionError(f"Parameter 'mode' does not accept value '{mode}'")
    chardev = opts.get("chardev")
    if not chardev:
        raise OptionError("Parameter 'chardev' is missing")
    pretty = parse_bool(opts.get("pretty", "off"), "pretty")
    b.cfg.monitors.append(MonitorConfig(chardev, mode, pretty))


def _opt_qmp(b: _Builder, arg: str, pretty: bool = False) -> None:
    cid = f"compat_monitor{b.compat_monitors}"
    b.compat_monitors += 1
    b.compat_chardev(f"-qmp {arg}", arg, cid)
    b.cfg.monitors.append(MonitorConfig(cid, "control", pretty))


def _opt_monitor(b: _Builder, arg: str) -> None:
    """``-monitor SPEC``: the human monitor on a legacy chardev (``none``: no monitor)."""
    if arg == "none":
        return
    cid = f"compat_monitor{b.compat_monitors}"
    b.compat_monitors += 1
    b.compat_chardev(f"-monitor {arg}", arg, cid)
    b.cfg.monitors.append(MonitorConfig(cid, "readline"))


def _opt_serial(b: _Builder, arg: str) -> None:
    if arg == "none":
        return
    if arg.startswith("chardev:"):
        b.cfg.serials.append(arg[8:])
        return
    cid = f"serial{len(b.cfg.serials)}"
    b.compat_chardev(f"-serial {arg}", arg, cid,
                     f"could not connect serial device to character backend '{arg}'")
    b.cfg.serials.append(cid)


def _opt_display(b: _Builder, arg: str) -> None:
    kind = dict(parse_qemu_opts(arg, "type")).get("type", "")
    if kind not in DISPLAY_TYPES:
        raise OptionError(f"Parameter 'type' does not accept value '{kind}'")
    if kind not in ("none", "default"):
        raise OptionError(f"Display '{kind}' is not available.")
    b.cfg.display = kind


def _opt_vga(b: _Builder, arg: str) -> None:
    if arg not in VGA_TYPES:
        raise OptionError(f"unknown vga type: {arg}", "")
    b.cfg.vga = arg


def _opt_name(b: _Builder, arg: str) -> None:
    opts = dict(parse_qemu_opts(arg, "guest"))
    b.cfg.name = opts.get("guest")


def _opt_add_fd(b: _Builder, arg: str) -> None:
    opts = dict(parse_qemu_opts(arg))
    if "fd" not in opts:
        raise OptionError("fd option is required and must be non-negative")
    b.add_fds.append(opts)


def _set(attr: str, value: Any = True) -> Callable[[_Builder, str], None]:
    def h(b: _Builder, arg: str) -> None:
        setattr(b.cfg, attr, arg if value is None else value)
    return h


def _flag(attr: str) -> Callable[[_Builder, str], None]:
    def h(b: _Builder, arg: str) -> None:
        setattr(b, attr, True)
    return h


def _ignore(b: _Builder, arg: str) -> None:
    return None


def _opt_nographic(b: _Builder, arg: str) -> None:
    b.cfg.display = "none"


def _opt_qtest(b: _Builder, arg: str) -> None:
    b.qtest = arg


# ------------------------------------------------------- -cpu, -boot, -rtc, -L

#: CPU models emu offers: its one CPU is QEMU's qemu64 (``max`` under TCG means "everything
#: the accelerator has", which for emu is that same CPU)
CPU_MODELS = {"qemu64": "QEMU Virtual CPU version 2.5+", "qemu64-v1": "QEMU Virtual CPU version 2.5+",
              "max": "Enables all features supported by the accelerator in the current host"}
#: QEMU 7.2's other x86 models (``-cpu help``): known to QEMU, not offered by emu
QEMU_CPU_FAMILIES = ("486", "Broadwell", "Cascadelake-Server", "Conroe", "Cooperlake",
                     "Denverton", "Dhyana", "EPYC", "EPYC-Milan", "EPYC-Rome", "Haswell",
                     "Icelake-Server", "IvyBridge", "KnightsMill", "Nehalem", "Opteron_G1",
                     "Opteron_G2", "Opteron_G3", "Opteron_G4", "Opteron_G5", "Penryn",
                     "SandyBridge", "Skylake-Client", "Skylake-Server", "Snowridge", "Westmere",
                     "athlon", "core2duo", "coreduo", "kvm32", "kvm64", "n270", "pentium",
                     "pentium2", "pentium3", "phenom", "qemu32", "base")


def _qemu_knows_cpu(name: str) -> bool:
    """Whether ``name`` is one of QEMU 7.2's x86 models (a family, a ``-vN`` version, or
    one of its ``-IBRS``/``-noTSX``/``-IBPB`` variants)."""
    for fam in QEMU_CPU_FAMILIES:
        if name == fam:
            return True
        if name.startswith(fam + "-"):
            rest = name[len(fam) + 1:]
            if (rest[:1] == "v" and rest[1:].isdigit()) or rest in (
                    "IBRS", "noTSX", "noTSX-IBRS", "IBPB"):
                return True
    return False


def _opt_cpu(b: _Builder, arg: str) -> None:
    if arg == "":
        raise _Unlocated("-cpu option cannot be empty")
    b.cpu = arg


def _check_cpu(b: _Builder) -> None:
    """QEMU's parse_cpu_option at machine creation: the model, then its properties."""
    if b.cpu is None:
        return
    model, _, features = b.cpu.partition(",")
    if model == "host":
        raise OptionError("CPU model 'host' requires KVM or HVF")
    if model not in CPU_MODELS:
        if _qemu_knows_cpu(model):
            raise OptionError(f"CPU model '{model}' is not available in emu: its CPU is QEMU's "
                              "qemu64 (-cpu qemu64 or -cpu max)", f"-cpu {b.cpu}")
        raise OptionError(f"unable to find CPU model '{model}'")
    if features:
        raise OptionError("emu's CPUID is fixed (qemu64): CPU properties and feature flags "
                          "cannot be set", f"-cpu {b.cpu}")
    b.cfg.cpu_model = model


def _print_cpu_help() -> None:
    print("Available CPUs:")
    for name, desc in sorted(CPU_MODELS.items()):
        print(f"x86 {name:<22}  {desc}")


#: -boot keys (QEMU 7.2's BootConfiguration) and their types
BOOT_KEYS = {"order": "str", "once": "str", "menu": "bool", "splash": "str",
             "splash-time": "int", "reboot-timeout": "int", "strict": "bool"}


def _opt_boot(b: _Builder, arg: str) -> None:
    # several -boot options merge, a later key replacing an earlier one (QEMU's "boot" opts)
    for k, v in parse_qemu_opts(arg, "order"):
        b.boot[k] = v


def _validate_boot_devices(devices: str) -> None:
    """QEMU's validate_bootdevices: letters a-p, each at most once."""
    seen: set[str] = set()
    for c in devices:
        if not "a" <= c <= "p":
            raise OptionError(f"Invalid boot device '{c}'")
        if c in seen:
            raise OptionError(f"Boot device '{c}' was given twice")
        seen.add(c)


def _check_boot(b: _Builder) -> None:
    """-boot as QEMU 7.2 applies it to the pc machine (its 'boot' property): types, the
    device letters, then the pc's own limits (a/b, c, d, n; at most three).  The order goes to
    CMOS 0x3D/0x38 as QEMU writes it; menu, splash and strict are for SeaBIOS's fw_cfg, which
    emu's BIOS has no use for (it boots the hard disks in order): checked, then ignored."""
    for k, v in b.boot.items():
        kind = BOOT_KEYS.get(k)
        if kind is None:
            raise OptionError(f"Parameter 'boot.{k}' is unexpected")
        if kind == "bool" and v not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
            raise OptionError(f"Parameter 'boot.{k}' expects 'on' or 'off'")
        if kind == "int":
            try:
                int(v, 0)
            except ValueError:
                raise OptionError(f"Parameter 'boot.{k}' expects integer") from None
    order = b.boot.get("order")
    once = b.boot.get("once")
    for devices in (order, once):
        if devices is not None:
            _validate_boot_devices(devices)
    for devices in (once, order):
        if devices is not None:
            _check_pc_boot(devices)
    if "reboot-timeout" in b.boot and not -1 <= int(b.boot["reboot-timeout"], 0) <= 65535:
        raise OptionError("reboot timeout is invalid,it should be a value between -1 and 65535")
    if order is not None:
        b.cfg.boot_order = order
    b.cfg.boot_once = once


def _check_pc_boot(devices: str) -> None:
    """The pc machine's set_boot_dev limits."""
    if len(devices) > 3:
        raise OptionError("Too many boot devices for PC")
    for c in devices:
        if c not in "abcdn":
            raise OptionError(f"Invalid boot device for PC: '{c}'")


RTC_KEYS = ("base", "clock", "driftfix")


def _opt_rtc(b: _Builder, arg: str) -> None:
    for k, v in parse_qemu_opts(arg):
        if k not in RTC_KEYS:
            raise OptionError(f"Invalid parameter '{k}'")
        b.rtc[k] = v


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of year/month/day, out-of-range months and days carried over
    as QEMU's mktimegm does (March-based year)."""
    if m < 3:
        m += 12
        y -= 1
    return d + (153 * m - 457) // 5 + 365 * y + y // 4 - y // 100 + y // 400 - 719469


_C_INT = r"\s*[-+]?\d+"


def _parse_rtc_date(text: str) -> int:
    """QEMU's configure_rtc_base_datetime: ``Y-M-DTh:m:s`` or ``Y-M-D`` as sscanf reads them
    (leading blanks and signs allowed, trailing text ignored) -> UTC epoch seconds."""
    import re

    n = _C_INT
    m = re.match(rf"({n})-({n})-({n})T({n}):({n}):({n})", text)
    if m:
        y, mo, d, hh, mm, ss = (int(x) for x in m.groups())
    else:
        m = re.match(rf"({n})-({n})-({n})", text)
        if not m:
            raise OptionError("invalid datetime format\nvalid formats: "
                              "'2006-06-17T16:01:21' or '2006-06-17'")
        y, mo, d = (int(x) for x in m.groups())
        hh = mm = ss = 0
    return 86400 * _days_from_civil(y, mo, d) + 3600 * hh + 60 * mm + ss


def _check_rtc(b: _Builder) -> None:
    """QEMU's configure_rtc: base, then clock, then driftfix."""
    base = b.rtc.get("base")
    if base is not None:
        b.cfg.rtc_base = base if base in ("utc", "localtime") else _parse_rtc_date(base)
    clock = b.rtc.get("clock")
    if clock is not None:
        if clock not in ("host", "rt", "vm"):
            raise OptionError(f"invalid option value '{clock}'")
        b.cfg.rtc_clock = clock
    drift = b.rtc.get("driftfix")
    if drift is not None and drift not in ("slew", "none"):
        raise OptionError(f"invalid option value '{drift}'")


def _opt_firmware_dir(b: _Builder, arg: str) -> None:
    if arg == "help":
        b.list_data_dirs = True
    else:
        b.cfg.firmware_dirs.append(arg)


def find_firmware(cfg: MachineConfig, name: str) -> str | None:
    """QEMU's qemu_find_file for firmware: ``name`` itself when readable, else the ``-L``
    directories in order; None when not found there (the caller falls back to emu's own)."""
    if os.access(name, os.R_OK):
        return name
    for d in cfg.firmware_dirs:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.R_OK):
            return candidate
    return None


class _Unlocated(OptionError):
    """An option error QEMU prints without the option as location."""


def _opt_smp(b: _Builder, arg: str) -> None:
    opts = dict(parse_qemu_opts(arg, "cpus"))
    if opts.get("cpus", "1") not in ("1",):
        raise OptionError("emu emulates exactly one CPU (-smp 1)")


OPTIONS: dict[str, _Opt] = {o.name: o for o in [
    _Opt("machine", True, _opt_machine), _Opt("M", True, _opt_machine),
    _Opt("accel", True, _opt_accel),
    _Opt("enable-kvm", False, lambda b, a: b.accels.append(("kvm", "-enable-kvm"))),
    _Opt("m", True, _opt_m),
    _Opt("nodefaults", False, _set("nodefaults")),
    _Opt("display", True, _opt_display),
    _Opt("nographic", False, _opt_nographic),
    _Opt("vga", True, _opt_vga),
    _Opt("S", False, _set("start_paused")),
    _Opt("drive", True, _opt_drive),
    _Opt("hda", True, _opt_hda),
    _Opt("blockdev", True, _opt_blockdev),
    _Opt("device", True, _opt_device),
    _Opt("chardev", True, _opt_chardev),
    _Opt("mon", True, _opt_mon),
    _Opt("qmp", True, _opt_qmp),
    _Opt("qmp-pretty", True, lambda b, a: _opt_qmp(b, a, True)),
    _Opt("monitor", True, _opt_monitor),
    _Opt("serial", True, _opt_serial),
    _Opt("kernel", True, _set("kernel", None)),
    _Opt("initrd", True, _set("initrd", None)),
    _Opt("append", True, _set("append", None)),
    _Opt("bios", True, _set("bios", None)),
    _Opt("pidfile", True, _set("pidfile", None)),
    _Opt("daemonize", False, _set("daemonize")),
    _Opt("no-shutdown", False, _set("no_shutdown")),
    _Opt("no-reboot", False, _set("no_reboot")),
    _Opt("name", True, _opt_name),
    _Opt("add-fd", True, _opt_add_fd),
    _Opt("qtest", True, _opt_qtest),
    _Opt("smp", True, _opt_smp),
    _Opt("cpu", True, _opt_cpu),
    _Opt("boot", True, _opt_boot),
    _Opt("rtc", True, _opt_rtc),
    _Opt("L", True, _opt_firmware_dir),
    _Opt("no-user-config", False, _ignore),     # emu reads no configuration files
    _Opt("version", False, _flag("version")),
    _Opt("h", False, _flag("help")),
    _Opt("help", False, _flag("help")),
]}


def parse_args(argv: list[str]) -> tuple[MachineConfig, _Builder]:
    """Parse ``argv`` (without the program name) the way QEMU does.

    :raises OptionError: QEMU's message and location for the first bad option.
    """
    b = _Builder()
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if not a.startswith("-") or a == "-":
            try:
                _opt_hda(b, a)
            except OptionError as e:
                raise OptionError(str(e), e.loc or a) from None
            continue
        name = a[2:] if a.startswith("--") else a[1:]
        opt = OPTIONS.get(name)
        if opt is None:
            raise OptionError("invalid option", a)
        arg = ""
        if opt.has_arg:
            if i >= len(argv):
                raise OptionError("requires an argument", a)
            arg = argv[i]
            i += 1
        if b.version or b.help:
            continue
        try:
            assert opt.handler is not None
            opt.handler(b, arg)
        except OptionError as e:
            if e.loc == "" and opt.handler not in (_opt_machine, _opt_vga) \
                    and not isinstance(e, _Unlocated):
                raise OptionError(str(e), f"{a} {arg}" if opt.has_arg else a) from None
            raise
    if not (b.version or b.help or b.cpu == "help" or b.list_data_dirs):
        # QEMU's order once the options are read: the RTC, the machine's boot devices, the
        # CPU model, then the drives and devices
        _check_rtc(b)
        _check_boot(b)
        _check_cpu(b)
        _resolve(b)
    return b.cfg, b


# ---------------------------------------------------------- drives and devices

def _resolve(b: _Builder) -> None:
    cfg = b.cfg
    used: dict[tuple[str, int, int], str] = {}
    ids: set[str] = set()
    for spec, opts in b.raw_drives:
        d = _make_drive(spec, opts, used, ids)
        cfg.drives.append(d)
    ide = [d for d in cfg.drives if d.interface == "ide"]
    if ide and max(d.bus for d in ide) >= PC_IDE_BUSES:
        raise OptionError(f"Too many IDE buses defined ({max(d.bus for d in ide) + 1} > "
                          f"{PC_IDE_BUSES})")
    # devices: explicit -device first, then those implied by if=virtio drives (QEMU
    # appends them to the -device list when it processes the drives)
    drives = {d.id: d for d in cfg.drives}
    # a device's drive= is a -drive id or else a node name (QEMU's blk_by_name, then
    # bdrv_lookup_bs: the device gets a BlockBackend of its own on that node)
    nodes = {name for bd in cfg.blockdevs for name in _node_names(bd.options)}
    nodes |= {d.node_name for d in cfg.drives if getattr(d, "node_name", None)}
    claimed: set[str] = {d.id for d in cfg.drives if d.interface in ("ide", "virtio")}
    anon = 0
    dev_ids: set[str] = set()
    for spec, items in b.raw_devices:
        props = dict(items)
        driver = props.pop("driver", "")
        did = props.pop("id", None)
        if driver not in BLOCK_DEVICE_MODELS and driver not in OTHER_DEVICE_MODELS:
            raise OptionError(f"'{driver}' is not a valid device model name", f"-device {spec}")
        if did is not None:
            if did in dev_ids:
                raise OptionError(f"Duplicate ID '{did}' for device", f"-device {spec}")
            dev_ids.add(did)
            path = f"/machine/peripheral/{did}"
        else:
            path = f"/machine/peripheral-anon/device[{anon}]"
            anon += 1
        if driver in BLOCK_DEVICE_MODELS:
            drv = props.get("drive")
            if drv is not None:
                if drv not in drives and drv not in nodes:
                    raise OptionError(f"Property '{BLOCK_DEVICE_MODELS[driver]}.drive' can't "
                                      f"find value '{drv}'", f"-device {spec}")
                if drv in drives and drv in claimed:
                    raise OptionError(f"Drive '{drv}' is already in use by another device",
                                      f"-device {spec}")
                if drv in drives:
                    claimed.add(drv)
            bus = props.get("bus")
            if driver.startswith("ide-") and bus is not None and bus not in ("ide.0", "ide.1"):
                raise OptionError(f"Bus '{bus}' not found", f"-device {spec}")
            if driver.startswith("virtio-blk"):
                path += "/virtio-backend"
        cfg.devices.append(DeviceConfig(spec, driver, did, props, path))
    for n, d in enumerate(sorted(ide, key=lambda d: (d.bus, d.unit))):
        cfg.devices.append(DeviceConfig(
            d.spec, "ide-cd" if d.media == "cdrom" else "ide-hd", None,
            {"drive": d.id, "bus": f"ide.{d.bus}", "unit": str(d.unit)},
            f"/machine/unattached/device[{18 + n}]", implicit=True))
    for d in cfg.drives:
        if d.interface == "virtio":
            cfg.devices.append(DeviceConfig(
                d.spec, "virtio-blk-pci", None, {"drive": d.id},
                f"/machine/peripheral-anon/device[{anon}]/virtio-backend", implicit=True))
            anon += 1
    if cfg.daemonize:
        for c in cfg.chardevs:
            if c.backend == "stdio":
                more = ()
                if c.spec.startswith("-serial"):
                    more = ("could not connect serial device to character backend 'stdio'",)
                raise OptionError("cannot use stdio with -daemonize", c.spec, more)
    known = {c.id for c in cfg.chardevs}
    for m in cfg.monitors:
        if m.chardev not in known:
            raise OptionError(f'chardev "{m.chardev}" not found',
                              f"-mon chardev={m.chardev},mode={m.mode}")
    for s in cfg.serials:
        if s not in known:
            raise OptionError(f"could not connect serial device to character backend '{s}'",
                              f"-serial chardev:{s}")


def _node_names(options: dict[str, Any]) -> list[str]:
    """Every ``node-name`` in a -blockdev's options, nested ones (``file.node-name``) too."""
    out = [str(options["node-name"])] if isinstance(options.get("node-name"), str) else []
    for v in options.values():
        if isinstance(v, dict):
            out += _node_names(v)
    return out


def _make_drive(spec: str, opts: dict[str, str], used: dict, ids: set[str]) -> DriveConfig:
    loc = f"-drive {spec}"
    o = dict(opts)
    iface = o.pop("if", "ide")
    if iface not in IF_MAX_DEVS:
        raise OptionError(f"unsupported bus type '{iface}'", loc)
    media = o.pop("media", "disk")
    if media not in ("disk", "cdrom"):
        raise OptionError(f"'{media}' invalid media", loc)
    cache = o.pop("cache", None)
    if cache is not None and cache not in CACHE_MODES:
        raise OptionError("invalid cache option", loc)
    aio = o.pop("aio", None)
    if aio is not None and aio not in AIO_MODES:
        raise OptionError("invalid aio option", loc)
    ro_text = o.pop("readonly", o.pop("read-only", None))
    try:
        readonly = parse_bool(ro_text, "read-only") if ro_text is not None else False
    except OptionError as e:
        raise OptionError(str(e), loc) from None
    if media == "cdrom":
        readonly = True
    max_devs = IF_MAX_DEVS[iface]

    def num(key: str) -> int | None:
        v = o.pop(key, None)
        if v is None:
            return None
        try:
            n = int(v, 0)
        except ValueError:
            raise OptionError(f"Parameter '{key}' expects a number", loc) from None
        if n < 0:
            raise OptionError(f"invalid {key} number: {n}" if key != "index" else
                              f"index cannot be used with bus and unit", loc)
        return n

    index, bus, unit = num("index"), num("bus"), num("unit")
    if index is not None:
        if bus is not None or unit is not None:
            raise OptionError("index cannot be used with bus and unit", loc)
        bus = index // max_devs if max_devs else 0
        unit = index % max_devs if max_devs else index
    if bus is None:
        bus = 0
    if unit is None:
        unit = 0
        while (iface, bus, unit) in used:
            unit += 1
            if max_devs and unit >= max_devs:
                unit -= max_devs
                bus += 1
    if max_devs and unit >= max_devs:
        raise OptionError(f"unit {unit} too big (max is {max_devs - 1})", loc)
    if (iface, bus, unit) in used:
        raise OptionError(f"drive with bus={bus}, unit={unit} (index={index if index is not None else bus * max(max_devs, 1) + unit}) exists", loc)
    did = o.pop("id", None)
    if did is None:
        did = drive_default_id(iface, bus, unit, media)
    if did in ids:
        raise OptionError(f"Duplicate ID '{did}' for drive", loc)
    ids.add(did)
    used[(iface, bus, unit)] = did
    node_name = o.pop("node-name", None)
    file = o.pop("file", None)
    fmt = o.pop("format", None)
    return DriveConfig(spec=spec, id=did, interface=iface, bus=bus, unit=unit,
                       index=index if index is not None else -1, file=file, format=fmt,
                       node_name=node_name, media=media, readonly=readonly, cache=cache,
                       aio=aio, options=o)


# ------------------------------------------------------------------------ main

def _print_version() -> None:
    print(f"QEMU emulator version {QEMU_VERSION_STR} (emu 0.1.0)")
    print("emu: a QEMU-compatible x86 PC in Python on the Unicorn CPU engine")


def _print_help() -> None:
    _print_version()
    print(f"usage: {progname()} [options] [disk_image]\n")
    print("Options (QEMU syntax): " + " ".join("-" + n for n in sorted(OPTIONS)))


def _check_files(cfg: MachineConfig) -> None:
    if cfg.kernel is not None and not os.path.isfile(cfg.kernel):
        err = "No such file or directory" if not os.path.exists(cfg.kernel) else "Is a directory"
        raise _PlainExit(f"qemu: could not open kernel file '{cfg.kernel}': {err}")
    if cfg.initrd is not None and not os.path.isfile(cfg.initrd):
        raise _PlainExit(f"qemu: could not load initial ram disk '{cfg.initrd}'")
    if cfg.bios is not None:
        found = find_firmware(cfg, cfg.bios)
        if found is None:
            found = os.path.join(os.path.dirname(_default_bios_path()), cfg.bios)
        if not os.path.isfile(found):
            raise _PlainExit(f"qemu: could not load PC BIOS '{cfg.bios}'")
        cfg.bios = found
    else:
        # the default firmware is looked up in the -L directories first, then emu's own
        for d in cfg.firmware_dirs:
            if os.access(os.path.join(d, BIOS_NAME), os.R_OK):
                cfg.bios = os.path.join(d, BIOS_NAME)
                break


#: the default firmware's file name, looked up in the -L directories before emu's own
BIOS_NAME = "bios.bin"


def _default_bios_path() -> str:
    """emu's own BIOS (emu.machine.hardware.default_bios, without importing the machine)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "machine", BIOS_NAME),
                      os.path.join(os.path.dirname(here), "firmware", BIOS_NAME)):
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(here, "machine", BIOS_NAME)


class _PlainExit(Exception):
    """An error QEMU prints without the usual prefix (e.g. ``qemu: could not …``)."""


def _daemonize() -> int | None:
    """Fork: the parent waits for the child's start-up verdict and exits with it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        data = os.read(r, 1)
        os._exit(0 if data == b"0" else 1)
    os.close(r)
    os.setsid()
    return w


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``emu`` / ``python -m emu``; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg, b = parse_args(args)
    except OptionError as e:
        print(e.render(), file=sys.stderr)
        return 1
    if b.version:
        _print_version()
        return 0
    if b.help:
        _print_help()
        return 0
    if b.cpu == "help":
        _print_cpu_help()
        return 0
    if b.list_data_dirs:
        for d in cfg.firmware_dirs:
            print(d)
        print(os.path.dirname(_default_bios_path()))
        return 0
    try:
        _check_files(cfg)
    except _PlainExit as e:
        print(str(e), file=sys.stderr)
        return 1
    ready_fd = _daemonize() if cfg.daemonize else None
    try:
        return _run(cfg, b, ready_fd)
    except OptionError as e:
        print(e.render(), file=sys.stderr)
    except _Quiet:
        pass
    except EmuError as e:
        print(f"{progname()}: {e}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a bug must still end with a message, exit 1
        print(f"{progname()}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
    return 1


#: accelerators emu has (Unicorn is its TCG); QEMU's others are refused with QEMU's text
ACCELERATORS = ("tcg",)


def _configure_accel(cfg: MachineConfig, b: _Builder) -> None:
    """QEMU's configure_accelerators: try each requested accelerator in order; report every
    unknown one; fail (exit 1) when none could be used."""
    if not b.accels:
        cfg.accel = "tcg"
        return
    for name, loc in b.accels:
        if name in ACCELERATORS:
            cfg.accel = name
            return
        print(OptionError(f"invalid accelerator {name}", loc).render(), file=sys.stderr)
    raise _Quiet()


class _Quiet(Exception):
    """Exit 1 after the messages were already printed."""


_PIDFILE_FD: list[int] = []


def _write_pidfile(path: str) -> None:
    """Create and lock the pid file as QEMU does (a second emu on it fails)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OptionError(f"cannot create PID file: {os.strerror(e.errno or 0)}") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise OptionError("cannot create PID file: Cannot lock pid file: "
                          f"{os.strerror(e.errno or 0)}") from e
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _PIDFILE_FD.append(fd)      # the lock lives as long as the process


def _bios_looks_loadable(cfg: MachineConfig) -> bool:
    """True when ``check_hardware`` cannot fail for ``cfg`` (no -kernel, no device to check,
    a BIOS file of a size the pc machine loads), judged without importing the machine; False
    when it might, and then the launcher runs the real check before greeting (it has the
    error texts).  The check is light on purpose: it decides only what happens before the
    greeting, and the real check still runs (after it) before the hardware is built."""
    if cfg.kernel is not None or cfg.devices:
        return False
    path = cfg.bios if cfg.bios is not None else _default_bios_path()
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    # hardware.load_bios: not empty, a multiple of 64 KiB, at most 16 MiB, readable
    return 0 < size <= 16 << 20 and size % (64 << 10) == 0 and os.access(path, os.R_OK) \
        and not os.path.isdir(path)


def _run(cfg: MachineConfig, b: _Builder, ready_fd: int | None) -> int:
    """Start the machine and serve until it quits.

    Order, as QEMU's: every configuration error is found before any monitor greets (drives,
    chardevs, accelerator, hardware properties).  The greeting itself goes out from a minimal
    path (emu.chardev.EarlyGreeter) before the monitor's own code, asyncio and the machine
    are imported: a configuration without drives or devices costs no block-layer or machine
    import before it.  Commands that arrive meanwhile wait for the machine (server.ready).
    """
    from emu.chardev import EarlyGreeter, create_chardev
    from emu.qmp.greeting import GREETING_LINE

    if b.qtest is not None:
        raise OptionError("qtest is not supported by emu", f"-qtest {b.qtest}")
    pidfile = cfg.pidfile
    if pidfile is not None:
        _write_pidfile(pidfile)
    machine: Any = None
    signalled: list[int] = []

    # before any monitor accepts a client: a signal then always ends in a clean SHUTDOWN
    # (one that comes before the machine exists is handed to it once it does)
    def on_signal(signum: int, frame: Any) -> None:
        print(f"{progname()}: terminating on signal {signum}", file=sys.stderr, flush=True)
        if machine is None:
            signalled.append(signum)
        else:
            from emu.machine.pc import ShutdownCause

            machine.quit(ShutdownCause.HOST_SIGNAL)

    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(sig, on_signal)

    def new_machine() -> Any:
        from emu.machine.drives import open_drives
        from emu.machine.pc import Machine

        m = Machine(cfg)
        open_drives(m)
        return m

    io: Any = None
    server: Any = None
    greeter: EarlyGreeter | None = None
    chardevs: dict[str, Any] = {}
    try:
        if cfg.drives or cfg.blockdevs:
            machine = new_machine()     # image errors come before any greeting
        for c in cfg.chardevs:
            try:
                chardev = create_chardev(c.backend, c.id, c.options)
                chardev.daemonized = cfg.daemonize
                chardev.prepare()
            except ConfigError as e:
                raise OptionError(str(e), c.spec) from None
            chardevs[c.id] = chardev
        _configure_accel(cfg, b)
        plan = None
        hardware = cfg.machine_type != "none"
        if hardware and not _bios_looks_loadable(cfg):
            from emu.machine.hardware import check_hardware

            if machine is None:
                machine = new_machine()
            plan = check_hardware(machine)      # every configuration error, before greeting

        # Greet now.  The monitors' chardevs start on the I/O loop (and greet later
        # clients) once the server exists; other chardevs (serial ports) once their
        # device is there.
        early = {m.chardev for m in cfg.monitors} - set(cfg.serials)
        qmp = [chardevs[m.chardev] for m in cfg.monitors
               if m.mode == "control" and m.chardev in early]
        for chardev in qmp:
            chardev.greeting = GREETING_LINE
        greeter = EarlyGreeter(qmp)
        greeter.start()

        from emu.chardev import IOThread
        from emu.machine.pc import ShutdownCause
        from emu.qmp.protocol import QmpServer

        if machine is None:
            machine = new_machine()
        if signalled:
            machine.quit(ShutdownCause.HOST_SIGNAL)
        io = IOThread()
        io.start()
        server = QmpServer(machine, io.loop)
        for m in cfg.monitors:
            server.add_monitor(chardevs[m.chardev], m.mode)
        machine.serial_chardevs = [chardevs[s] for s in cfg.serials]
        # a command that comes before the machine is built waits for it (QEMU answers
        # nothing before its machine exists)
        server.ready.clear()
        server.executor.submit(server.ready.wait)   # HMP commands wait as well
        greeter.stop()
        for cid in early:
            io.call(chardevs[cid].start(io.loop))
        if hardware:
            from emu.machine.hardware import build_hardware, check_hardware

            if plan is None:
                plan = check_hardware(machine)
            build_hardware(machine, plan=plan)  # vCPU, board, BIOS, disk controllers
        for cid, chardev in chardevs.items():
            if cid not in early:
                io.call(chardev.start(io.loop))

        machine.start()
        server.ready.set()
        if ready_fd is not None:
            os.write(ready_fd, b"0")
            os.close(ready_fd)
            ready_fd = None
            _detach_stdio()
        code = None
        while code is None:
            code = machine.main_loop(timeout=0.5)
        return code
    finally:
        if greeter is not None:
            greeter.stop()
        if server is not None:
            if not server.ready.is_set():
                server.closing = True           # commands waiting for the machine: none run
                server.ready.set()
            try:
                io.call(server.shutdown(), timeout=10)
            except Exception:   # noqa: BLE001 - exit regardless
                pass
        for chardev in chardevs.values():
            if chardev.loop is None:
                chardev.discard()
            elif server is None:
                try:
                    io.call(chardev.close(), timeout=5)
                except Exception:   # noqa: BLE001
                    pass
        if machine is not None:
            machine.close()
        if io is not None:
            io.stop()
        if pidfile is not None:
            try:
                os.unlink(pidfile)
            except OSError:
                pass


def _detach_stdio() -> None:
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

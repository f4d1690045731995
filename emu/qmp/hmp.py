"""The HMP (human monitor) commands emu offers through ``human-monitor-command``.

Output is built with ``\\n`` and returned with QEMU's ``\\r\\n`` line ends.  Unknown
commands give QEMU's text as a *successful* reply: ``unknown command: 'foo'``.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable

__all__ = ["run_hmp", "HMP_COMMANDS", "INFO_COMMANDS", "hmp"]

HmpFn = Callable[[Any, list[str]], str]
#: top-level HMP commands: name -> fn(machine, args) -> text
HMP_COMMANDS: dict[str, HmpFn] = {}
#: ``info`` sub-commands
INFO_COMMANDS: dict[str, HmpFn] = {}
#: ``info`` sub-commands that take no argument (QEMU complains about extra text)
NO_ARGS = frozenset({"status", "version", "name", "snapshots"})


def hmp(name: str, info: bool = False, raw: bool = False) -> Callable[[Any], Any]:
    """Register an HMP command (``info=True``: an ``info`` sub-command; ``raw=True``: the
    function parses the text after the name itself, as QEMU's argument types need)."""

    def deco(fn: Any) -> Any:
        if raw:
            fn.hmp_raw = True
        (INFO_COMMANDS if info else HMP_COMMANDS)[name] = fn
        return fn

    return deco


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def run_hmp(machine: Any, line: str) -> str:
    """Run one HMP command line; return its output with ``\\r\\n`` line ends."""
    text = line.strip()
    if not text:
        return ""
    # QEMU's get_command_name: the name ends at white space or '/' (``xp/4x 0``)
    end = next((i for i, c in enumerate(text) if c.isspace() or c == "/"), len(text))
    name, rest = text[:end], text[end:]
    if name == "info":
        sub, _, rest2 = rest.strip().partition(" ")
        fn = INFO_COMMANDS.get(sub)
        if fn is None:
            out = f"unknown command: 'info {sub}'\n" if sub else _info_help()
        elif sub in NO_ARGS and rest2.strip():
            out = (f"{sub}: extraneous characters at the end of line\n"
                   f"Try \"help info {sub}\" for more information\n")
        elif getattr(fn, "hmp_raw", False):
            out = fn(machine, rest2)
        else:
            out = fn(machine, _split(rest2))
    else:
        fn = HMP_COMMANDS.get(name)
        if fn is None:
            out = f"unknown command: '{name}'\n"
        elif getattr(fn, "hmp_raw", False):
            out = fn(machine, rest)
        else:
            out = fn(machine, _split(rest))
    return out.replace("\n", "\r\n")


def _info_help() -> str:
    return "".join(f"info {n}\n" for n in sorted(INFO_COMMANDS))


@hmp("status", info=True)
def info_status(machine: Any, args: list[str]) -> str:
    st = machine.query_status()
    out = "VM status: " + ("running" if st["running"] else "paused")
    if not st["running"] and st["status"] != "paused":
        out += f" ({st['status']})"
    return out + "\n"


@hmp("version", info=True)
def info_version(machine: Any, args: list[str]) -> str:
    from emu.qmp.protocol import PACKAGE, QEMU_VERSION

    v = QEMU_VERSION
    return f"{v['major']}.{v['minor']}.{v['micro']}{PACKAGE}\n"     # QEMU: no separator


@hmp("name", info=True)
def info_name(machine: Any, args: list[str]) -> str:
    return f"{machine.name}\n" if machine.name else ""


# ----------------------------------------------------------------- block

def size_to_str(val: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary suffix."""
    import math

    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exp = math.frexp(val / (1000.0 / 1024.0)) if val else (0.0, 0)
    i = int((exp - 1) / 10) if exp > 0 else 0
    div = 1 << (i * 10)
    return "%0.3g %sB" % (val / div, suffixes[i])


def _dump_specific(d: Any, indent: int) -> str:
    from emu.qmp.json import iter_ordered

    out = []
    pad = " " * indent
    for k, v in iter_ordered(d):
        key = k.replace("-", " ")
        if isinstance(v, dict):
            out.append(f"{pad}{key}:\n" + _dump_specific(v, indent + 4))
        elif isinstance(v, list):
            out.append(f"{pad}{key}:\n")
            for item in v:
                out.append(f"{pad}    [{v.index(item)}]:\n" + _dump_specific(item, indent + 8)
                           if isinstance(item, dict) else f"{pad}    {item}\n")
        elif isinstance(v, bool):
            out.append(f"{pad}{key}: {'true' if v else 'false'}\n")
        else:
            out.append(f"{pad}{key}: {v}\n")
    return "".join(out)


def image_info_dump(info: dict) -> str:
    """QEMU's bdrv_image_info_dump (the ``Images:`` part of ``info block -v``)."""
    vsize = info["virtual-size"]
    disk = size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    out = (f"image: {info['filename']}\nfile format: {info['format']}\n"
           f"virtual size: {size_to_str(vsize)} ({vsize} bytes)\ndisk size: {disk}\n")
    if "cluster-size" in info:
        out += f"cluster_size: {info['cluster-size']}\n"
    if "backing-filename" in info:
        out += f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            out += f" (actual path: {full})"
        out += "\n"
        if "backing-filename-format" in info:
            out += f"backing file format: {info['backing-filename-format']}\n"
    if info.get("snapshots"):
        out += "Snapshot list:\n" + _snapshot_header() + "\n"
        for s in info["snapshots"]:
            out += _snapshot_row(s) + "\n"
    fs = info.get("format-specific")
    if fs is not None:
        out += "Format specific information:\n" + _dump_specific(fs.get("data", {}), 4)
    return out


def _block_entry(machine: Any, dev: Any, verbose: bool) -> str:
    from emu.qmp.commands.block import block_device_info

    ins = block_device_info(dev.node, writeback=dev.writeback) if dev.node is not None else None
    if dev.name:
        out = dev.name + (f" ({ins['node-name']})" if ins is not None else "")
    else:               # a device's own BlockBackend (drive=<node-name>) has no name
        out = ins["node-name"] if ins is not None else (dev.qdev or "<anonymous>")
    if ins is not None:
        out += f": {ins['file']} ({ins['drv']}{', read-only' if ins['ro'] else ''})\n"
    else:
        out += ": [not inserted]\n"
    if dev.qdev:
        out += f"    Attached to:      {dev.qdev}\n"
    if dev.io_status != "ok":
        out += f"    I/O status:       {dev.io_status}\n"
    if dev.removable:
        out += f"    Removable device: {'' if dev.locked else 'not '}locked, tray closed\n"
    if ins is None:
        return out
    c = ins["cache"]
    out += ("    Cache mode:       " + ("writeback" if c["writeback"] else "writethrough")
            + (", direct" if c["direct"] else "") + (", ignore flushes" if c["no-flush"] else "")
            + "\n")
    if "backing_file" in ins:
        out += (f"    Backing file:     {ins['backing_file']} "
                f"(chain depth: {ins['backing_file_depth']})\n")
    if verbose:
        out += "\nImages:\n"
        info = ins["image"]
        while True:
            out += image_info_dump(info)
            if "backing-image" not in info:
                break
            info = info["backing-image"]
    return out


@hmp("block", info=True)
def info_block(machine: Any, args: list[str]) -> str:
    verbose = "-v" in args
    rest = [a for a in args if not a.startswith("-")]
    device = rest[0] if rest else None
    out = []
    for n, dev in enumerate(machine.block_devices):
        if device is not None and dev.name != device:
            continue
        if n:
            out.append("\n")
        out.append(_block_entry(machine, dev, verbose))
    return "".join(out)


def _snapshot_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def _snapshot_row(s: dict) -> str:
    import time as _time

    date = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(s["date-sec"]))
    ns = s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"]
    secs = ns // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                     ns // 1_000_000 % 1000)
    icount = str(s["icount"]) if "icount" in s else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (s["id"], s["name"], size_to_str(s["vm-state-size"]),
                                          date, clock, icount)


@hmp("snapshots", info=True)
def info_snapshots(machine: Any, args: list[str]) -> str:
    """QEMU's hmp_info_snapshots: snapshots present (by name) on every writable disk are
    listed once with id ``--``; the rest per device as partial (non-loadable)."""
    writable = [d for d in machine.block_devices if d.node is not None and not d.node.read_only]
    capable = [d for d in writable if d.node.supports_snapshots]
    if not capable:
        return "no block device can store vmstate for snapshot\n"
    sn_tab = capable[0].node.snapshot_list()
    images = [(d.name, list(d.node.snapshot_list())) for d in capable]
    images = [(n, snaps) for n, snaps in images if snaps]
    if not images:
        return "There is no snapshot available.\n"
    names_on = [{s["name"] for s in d.node.snapshot_list()} if d.node.supports_snapshots
                else None for d in writable]
    everywhere = [sn for sn in sn_tab
                  if all(names is not None and sn["name"] in names for names in names_on)]
    out = "List of snapshots present on all disks:\n"
    if everywhere:
        out += _snapshot_header() + "\n"
        out += "".join(_snapshot_row(dict(sn, id="--")) + "\n" for sn in everywhere)
    else:
        out += "None\n"
    gone = {sn["name"] for sn in everywhere}
    for name, snaps in images:
        rest = [sn for sn in snaps if sn["name"] not in gone]
        if rest:
            out += f"\nList of partial (non-loadable) snapshots on '{name}':\n"
            out += _snapshot_header() + "\n"
            out += "".join(_snapshot_row(sn) + "\n" for sn in rest)
    return out


@hmp("savevm")
def hmp_savevm(machine: Any, args: list[str]) -> str:
    for dev in machine.block_devices:
        node = dev.node
        if node is not None and not node.read_only and not node.supports_snapshots:
            return f"Error: Device '{dev.name}' is writable but does not support snapshots\n"
    return "Error: emu cannot save the VM state (savevm); use blockdev-snapshot-internal-sync\n"


def _parse_num(text: str) -> int:
    t = text.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:].lower(), 1)
    if mult != 1:
        t = t[:-1]
    return int(float(t) * mult) if "." in t else int(t, 0) * mult


def hmp_get_str(text: str, pos: int) -> tuple[str | None, int, str | None]:
    """QEMU's HMP get_str: a double-quoted string (escapes \\n \\r \\\\ \\' \\") or one
    word.  Returns ``(value, new_pos, error)``; value ``None`` when nothing is there."""
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    if pos >= n:
        return None, pos, None
    if text[pos] != '"':
        end = pos
        while end < n and not text[end].isspace():
            end += 1
        return text[pos:end], end, None
    out = []
    pos += 1
    while pos < n and text[pos] != '"':
        c = text[pos]
        if c == "\\":
            pos += 1
            if pos >= n:
                return None, pos, "unterminated string"
            c = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(text[pos], "")
            if not c:
                return None, pos, f"unsupported escape code: '\\{text[pos]}'"
        out.append(c)
        pos += 1
    if pos >= n:
        return None, pos, "unterminated string"
    return "".join(out), pos + 1, None


def _hmp_usage_error(cmd: str, msg: str) -> str:
    return f"{cmd}: {msg}\nTry \"help {cmd}\" for more information\n"


@hmp("qemu-io", raw=True)
def hmp_qemu_io(machine: Any, rest: str) -> str:
    """``qemu-io [-d] <device> "<command>"``: QEMU's qemu-io on a device's BlockBackend
    (``-d``: the device named by its qdev id) or a node (:mod:`emu.qmp.qemu_io`: the
    command's own output goes to the emulator's stdout, as QEMU 7.2's does)."""
    from emu.qmp import qemu_io

    text = rest
    pos = 0
    by_qdev = False
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith("-d", pos) and (pos + 2 == len(text) or text[pos + 2].isspace()):
            by_qdev = True
            pos += 2
            continue
        break
    name, pos, err = hmp_get_str(text, pos)
    if err or name is None:
        return _hmp_usage_error("qemu-io", err or "block device name expected")
    cmdline, pos, err = hmp_get_str(text, pos)
    if err or cmdline is None:
        return _hmp_usage_error("qemu-io", err or "string expected")
    if text[pos:].strip():
        return _hmp_usage_error("qemu-io", "extraneous characters at the end of line")
    target: Any = None
    node: Any = None
    dev: Any = None
    if by_qdev:
        # QEMU's blk_by_qdev_id (the lookup of block_extra._find_device)
        for d in machine.block_devices:
            if d.qdev and d.qdev.split("/")[-1] == name:
                dev = d
        if dev is None:
            if any(getattr(c, "id", None) == name for c in machine.config.devices):
                return "Error: Device does not have a block device backend\n"
            return f"Error: Device '{name}' not found\n"
    else:
        dev = machine.find_block_device(name)
    if dev is not None:
        target, node = (dev.backend or dev.node), dev.node
        if dev.node is None:
            return f"Error: Device '{name}' has no medium\n"
    elif machine.block_graph is not None:
        node = machine.block_graph.lookup(name)
        target = node
    if target is None:
        return f"Error: Cannot find device='' nor node-name='{name}'\n"

    def resize(size: int) -> None:
        from emu.qmp.commands.block_extra import resize_node

        resize_node(machine, node, size)

    return qemu_io.run(target, node, cmdline, resize=resize)


@hmp("block_resize", raw=True)
def hmp_block_resize(machine: Any, rest: str) -> str:
    """``block_resize <device> <size>`` (size with QEMU's k/M/G/T suffixes)."""
    from emu.errors import QmpError
    from emu.qmp.commands.block import _lookup_bs
    from emu.qmp.commands.block_extra import resize_node

    name, pos, err = hmp_get_str(rest, 0)
    if err or name is None:
        return _hmp_usage_error("block_resize", err or "block device name expected")
    word, pos, _ = hmp_get_str(rest, pos)
    size = _hmp_size(word) if word is not None and not word.startswith('"') else None
    if size is None:        # QEMU's 'o' argument error has no command prefix
        return 'invalid size\nTry "help block_resize" for more information\n'
    if rest[pos:].strip():
        return _hmp_usage_error("block_resize", "extraneous characters at the end of line")

    class _Ctx:
        pass

    ctx = _Ctx()
    ctx.machine = machine  # type: ignore[attr-defined]
    try:
        resize_node(machine, _lookup_bs(ctx, name, None), size)  # type: ignore[arg-type]
    except QmpError as e:
        return f"Error: {e.desc}\n"
    return ""


def _hmp_size(word: str) -> int | None:
    """HMP's 'o' argument: a size with an optional k/M/G/T suffix (bytes by default)."""
    from emu.qmp.qemu_io import cvtnum

    v = cvtnum(word)
    return v if v >= 0 else None


# ------------------------------------------------------- the readline monitor

HMP_BANNER = "QEMU {version} monitor - type 'help' for more information\r\n"
PROMPT = "(qemu) "


@hmp("stop")
def hmp_stop(machine: Any, args: list[str]) -> str:
    machine.pause()
    return ""


@hmp("cont")
def hmp_cont(machine: Any, args: list[str]) -> str:
    try:
        machine.resume()
    except Exception as e:  # noqa: BLE001 - HMP prints errors
        return f"Error: {e}\n"
    return ""


@hmp("system_reset")
def hmp_system_reset(machine: Any, args: list[str]) -> str:
    from emu.machine.pc import ShutdownCause

    machine.reset(ShutdownCause.HOST_QMP_SYSTEM_RESET)
    return ""


@hmp("system_powerdown")
def hmp_system_powerdown(machine: Any, args: list[str]) -> str:
    machine.powerdown()
    return ""


@hmp("quit")
def hmp_quit(machine: Any, args: list[str]) -> str:
    from emu.machine.pc import ShutdownCause

    machine.quit(ShutdownCause.HOST_QMP_QUIT)
    return ""


def echo_line(line: str) -> str:
    """QEMU's readline redraw while a line is typed, one update per character."""
    out = []
    for k in range(1, len(line) + 1):
        out.append("\x1b[D" * (k - 1) + line[:k] + "\x1b[K")
    return "".join(out) + "\r\n"


async def hmp_session(machine: Any, executor: Any, reader: Any, writer: Any) -> None:
    """Serve the human monitor (``-monitor``, ``-mon mode=readline``) on one connection:
    banner, prompt, QEMU's echo of each typed line, the command's output, prompt."""
    import asyncio

    from emu.qmp.protocol import QEMU_VERSION

    v = QEMU_VERSION
    writer.write((HMP_BANNER.format(version=f"{v['major']}.{v['minor']}.{v['micro']}")
                  + PROMPT).encode())
    loop = asyncio.get_running_loop()
    buf = b""
    while True:
        data = await reader.read(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf or b"\r" in buf:
            cut = min(i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0)
            raw, buf = buf[:cut], buf[cut + 1:]
            if raw == b"" and data[cut - 1:cut] == b"\r":
                continue            # the \n of a \r\n pair
            line = "".join(ch for ch in raw.decode("utf-8", "replace") if ch >= " ")
            writer.write(echo_line(line).encode())
            out = await loop.run_in_executor(executor, run_hmp, machine, line)
            writer.write(out.encode("utf-8", "replace"))
            if machine.shutdown_cause is not None:
                await writer.drain()
                return
            writer.write(PROMPT.encode())
            await writer.drain()


# the vCPU and memory commands (info registers, x, xp), the block and port commands
# (info blockstats/block-jobs, snapshot_blkdev_internal, block_job_*, i, o) register themselves
from emu.qmp import hmp_block, hmp_cpu  # noqa: E402,F401

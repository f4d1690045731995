"""The HMP (human monitor) commands emu offers through ``human-monitor-command``.

Output is built with ``\\n`` and returned with QEMU's ``\\r\\n`` line ends.  Unknown
commands give QEMU's text as a *successful* reply: ``unknown command: 'foo'``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable

__all__ = ["run_hmp", "HMP_COMMANDS", "INFO_COMMANDS", "hmp"]

HmpFn = Callable[[Any, list[str]], str]
#: top-level HMP commands: name -> fn(machine, args) -> text
HMP_COMMANDS: dict[str, HmpFn] = {}
#: ``info`` sub-commands
INFO_COMMANDS: dict[str, HmpFn] = {}
#: ``info`` sub-commands that take no argument (QEMU complains about extra text)
NO_ARGS = frozenset({"status", "version", "name", "snapshots"})


def hmp(name: str, info: bool = False) -> Callable[[HmpFn], HmpFn]:
    """Register an HMP command (``info=True``: an ``info`` sub-command)."""

    def deco(fn: HmpFn) -> HmpFn:
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
    name, _, rest = text.partition(" ")
    if name == "info":
        sub, _, rest2 = rest.strip().partition(" ")
        fn = INFO_COMMANDS.get(sub)
        if fn is None:
            out = f"unknown command: 'info {sub}'\n" if sub else _info_help()
        elif sub in NO_ARGS and rest2.strip():
            out = (f"{sub}: extraneous characters at the end of line\n"
                   f"Try \"help info {sub}\" for more information\n")
        else:
            out = fn(machine, _split(rest2))
    else:
        fn = HMP_COMMANDS.get(name)
        if fn is None:
            out = f"unknown command: '{name}'\n"
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
    out = dev.name
    if ins is not None:
        out += f" ({ins['node-name']})"
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


@hmp("qemu-io")
def hmp_qemu_io(machine: Any, args: list[str]) -> str:
    """``qemu-io <device> "<command>"``: read/write/zero/discard/flush and blkdebug
    breakpoints on a device's BlockBackend (or a node)."""
    if len(args) < 2:
        return "Error: qemu-io: missing arguments\n"
    name, cmdline = args[0], " ".join(args[1:])
    dev = machine.find_block_device(name)
    target: Any = None
    node: Any = None
    if dev is not None:
        target, node = (dev.backend or dev.node), dev.node
    elif machine.block_graph is not None:
        node = machine.block_graph.lookup(name)
        target = node
    if target is None:
        if dev is not None:
            return f"Error: Device '{name}' has no medium\n"
        return f"Error: Cannot find device='' nor node-name='{name}'\n"
    words = _split(cmdline)
    if not words:
        return ""
    verb, opts = words[0], words[1:]
    try:
        msg = _qemu_io(target, node, verb, opts)
    except (ValueError, IndexError):
        msg = f"{verb}: invalid arguments\n"
    except Exception as e:  # noqa: BLE001 - qemu-io prints errors as text
        msg = f"{verb} failed: {e}\n"
    # like QEMU, qemu-io's own output goes to the emulator's stdout, not the monitor
    if msg:
        sys.stdout.write(msg)
        sys.stdout.flush()
    return ""


def _qemu_io(target: Any, node: Any, verb: str, opts: list[str]) -> str:
    # Accounting as QEMU 7.2's qemu-io: the synchronous read/write/discard/flush are not
    # counted in query-blockstats; aio_read/aio_write (not with -z) and aio_flush are,
    # -i counts an invalid request without I/O, and a request the BlockBackend refuses
    # (past the end, read-only) counts as failed, not invalid.
    acct = getattr(target, "acct", None)
    # a BlockBackend takes account=; a node (qemu-io on a node-name) has no statistics
    kw: dict[str, Any] = {"account": False} if acct is not None else {}
    if verb in ("write", "aio_write", "read", "aio_read"):
        is_aio = verb.startswith("aio_")
        kind = "wr" if verb.endswith("write") else "rd"
        pattern = 0xCD if kind == "wr" else None
        zero = invalid = False
        pos: list[str] = []
        i = 0
        while i < len(opts):
            o = opts[i]
            if o == "-P":
                pattern = int(opts[i + 1], 0)
                i += 2
                continue
            if o == "-z":
                zero = True
            elif o == "-i" and is_aio:
                invalid = True
            elif o.startswith("-"):
                pass
            else:
                pos.append(o)
            i += 1
        off = _parse_num(pos[0])
        # aio_* take several lengths (an I/O vector); the request is their sum
        length = sum(_parse_num(p) for p in pos[1:]) if is_aio else _parse_num(pos[1])
        if not pos[1:]:
            raise ValueError("missing length")
        if invalid:
            if acct is not None:
                acct.invalid(kind)
            return ""
        cookie = acct.start(kind, length) if (is_aio and not zero and acct is not None) else None
        try:
            if kind == "wr":
                if zero:
                    target.write_zeroes(off, length, **kw)
                else:
                    target.write(off, bytes([pattern & 0xFF]) * length, **kw)
                data = b""
            else:
                data = target.read(off, length, **kw)
        except Exception:
            if cookie is not None:
                acct.failed(cookie)
            raise
        if cookie is not None:
            acct.done(cookie)
        if kind == "rd" and pattern is not None and data != bytes([pattern & 0xFF]) * length:
            return f"Pattern verification failed at offset {off}, {length} bytes\n"
        return ""
    if verb in ("discard", "aio_discard"):
        # QEMU 7.2's qemu-io has no aio_discard; emu keeps it, unaccounted like discard
        target.discard(_parse_num(opts[0]), _parse_num(opts[1]), **kw)
        return ""
    if verb in ("flush", "aio_flush"):
        cookie = acct.start("flush") if (verb == "aio_flush" and acct is not None) else None
        try:
            target.flush(**kw)
        except Exception:
            if cookie is not None:
                acct.failed(cookie)
            raise
        if cookie is not None:
            acct.done(cookie)
        return ""
    blk = _blkdebug(node)
    if verb in ("break", "remove_break", "resume", "wait_break"):
        if blk is None:
            return "blkdebug is not the protocol of this device\n"
        if verb == "break":
            blk.break_on(opts[0], opts[1])
        elif verb == "remove_break":
            blk.remove_break(opts[0])
        elif verb == "resume":
            blk.resume(opts[0])
        else:
            blk.wait_break(opts[0])
        return ""
    return f"command \"{verb}\" not found\n"


def _blkdebug(node: Any) -> Any:
    while node is not None:
        if getattr(node, "drv", None) == "blkdebug":
            return node.impl
        node = getattr(node, "file", None)
    return None


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

"""emu-img subcommands that create or inspect one image: create, info, snapshot, map, resize,
commit, rebase."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from emu.errors import EmuError
from emu.img.imgopen import session
from emu.img.main import PROG, ImgError, UsageError, command
from emu.img.output import (SNAPSHOT_HEADER_LINE, qdict_order, size_to_str, snapshot_line,
                            to_json_pretty)
from emu.img.util import SizeRangeError, output_format, parse_size, qprint

# ---------------------------------------------------------------------------- create options

#: qcow2 creation options in the order qemu-img prints them on its "Formatting" line,
#: with their defaults (None: printed only when given).
QCOW2_CREATE_OPTS: list[tuple[str, str | None]] = [
    ("cluster_size", "65536"), ("extended_l2", "off"), ("preallocation", None),
    ("compression_type", "zlib"), ("size", None), ("backing_file", None), ("backing_fmt", None),
    ("compat", None), ("lazy_refcounts", "off"), ("refcount_bits", "16"),
]
RAW_CREATE_OPTS: list[tuple[str, str | None]] = [("size", None), ("preallocation", None)]
_SIZE_OPTS = {"cluster_size", "size"}
_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def parse_o(fmt: str, items: list[str], filename: str) -> dict[str, str]:
    """Parse ``-o key=value[,key=value]`` lists (QemuOpts syntax: ``,,`` escapes a comma)."""
    table = QCOW2_CREATE_OPTS if fmt == "qcow2" else RAW_CREATE_OPTS
    known = {k for k, _ in table}
    out: dict[str, str] = {}
    for item in items:
        parts, cur, i = [], "", 0
        while i < len(item):
            if item[i] == "," and item[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            if item[i] == ",":
                parts.append(cur)
                cur = ""
            else:
                cur += item[i]
            i += 1
        parts.append(cur)
        for p in parts:
            if not p:
                continue
            key, eq, val = p.partition("=")
            if not eq:
                raise ImgError(f"{filename}: Invalid parameter '{key}'")
            if key not in known:
                raise ImgError(f"{filename}: Invalid parameter '{key}'")
            if key in _SIZE_OPTS:
                try:
                    val = str(parse_size(val))
                except ValueError:
                    raise ImgError(f"{filename}: Parameter '{key}' expects a non-negative number below 2^64\n"
                                   "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                                   "peta-\nand exabytes, respectively.") from None
            out[key] = val
    return out


#: ``-o help`` rows: (name, type, description), as qemu-img lists them.
_OPT_HELP = {
    "backing_file": ("str", "File name of a base image"),
    "backing_fmt": ("str", "Image format of the base image"),
    "cluster_size": ("size", "qcow2 cluster size"),
    "compat": ("str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "compression_type": ("str", "Compression method used for image cluster compression"),
    "extended_l2": ("bool (on/off)", "Extended L2 tables"),
    "lazy_refcounts": ("bool (on/off)", "Postpone refcount updates"),
    "refcount_bits": ("num", "Width of a reference count entry in bits"),
    "size": ("size", "Virtual disk size"),
}


def create_options_help(fmt: str) -> str:
    """``create -o help``: the creation options emu-img supports for ``fmt``."""
    table = QCOW2_CREATE_OPTS if fmt == "qcow2" else RAW_CREATE_OPTS
    rows = []
    for key in sorted(k for k, _ in table):
        if key == "preallocation":
            modes = "off, metadata" if fmt == "qcow2" else "off, falloc, full"
            typ, desc = "str", f"Preallocation mode (allowed values: {modes})"
        else:
            typ, desc = _OPT_HELP[key]
        rows.append("  %-22s - %s\n" % (f"{key}=<{typ}>", desc))
    return "Supported options:\n" + "".join(rows)


def formatting_line(filename: str, fmt: str, opts: dict[str, str]) -> str:
    """qemu-img create's ``Formatting '...', fmt=... `` line."""
    table = QCOW2_CREATE_OPTS if fmt == "qcow2" else RAW_CREATE_OPTS
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for key, default in table:
        val = opts.get(key, default)
        if val is not None:
            parts.append(f"{key}={val}")
    return " ".join(parts) + "\n"


def _bool_opt(opts: dict[str, str], key: str, filename: str) -> bool:
    v = opts.get(key, "off")
    if v not in _BOOL:
        raise ImgError(f"{filename}: Parameter '{key}' expects 'on' or 'off'")
    return _BOOL[v]


def create_image(filename: str, fmt: str, size: int, opts: dict[str, str], *, quiet: bool = False) -> None:
    """Create an image as ``qemu-img create`` does (prints the Formatting line unless ``quiet``).

    :param opts: parsed ``-o`` options (``cluster_size``, ``compat``, ``lazy_refcounts``,
        ``preallocation``, ``backing_file``, ``backing_fmt``, ``refcount_bits``).
    :raises ImgError: with qemu-img's text.
    """
    opts = dict(opts)
    opts["size"] = str(size)
    qprint(quiet, formatting_line(filename, fmt, opts))
    sys.stdout.flush()
    prealloc = opts.get("preallocation", "off")
    if fmt == "raw" and filename.startswith("rbd:"):
        from emu.block.drivers import rbd
        try:
            rbd.create_image(filename, size)
        except EmuError as err:
            raise ImgError(f"{filename}: {err}") from None
        return
    if fmt == "raw":
        if prealloc not in ("off", "falloc", "full"):
            raise ImgError(f"{filename}: Invalid parameter '{prealloc}'")
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise ImgError(f"{filename}: Could not create '{filename}': {os.strerror(err.errno)}") from None
        try:
            os.ftruncate(fd, size)
            if prealloc in ("falloc", "full") and size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return
    cluster_size = int(opts.get("cluster_size", "65536"))
    if cluster_size < 512 or cluster_size > 2 * 1024 * 1024 or cluster_size & (cluster_size - 1):
        raise ImgError(f"{filename}: Cluster size must be a power of two between 512 and 2048k")
    compat = opts.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ImgError(f"{filename}: Invalid parameter '{compat}'")
    lazy = _bool_opt(opts, "lazy_refcounts", filename)
    if lazy and version < 3:
        raise ImgError(f"{filename}: Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
    if _bool_opt(opts, "extended_l2", filename):
        raise ImgError(f"{filename}: Extended L2 entries are not supported")
    if opts.get("compression_type", "zlib") != "zlib":
        raise ImgError(f"{filename}: Invalid parameter '{opts['compression_type']}'")
    refcount_bits = int(opts.get("refcount_bits", "16"))
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or refcount_bits < 1:
        raise ImgError(f"{filename}: Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise ImgError(f"{filename}: Different refcount widths than 16 bits require compatibility level "
                       "1.1 or above (use version=v3 or greater)")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise ImgError(f"{filename}: Invalid parameter '{prealloc}'")
    backing_file = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    if backing_file and prealloc != "off":
        raise ImgError(f"{filename}: Backing file and preallocation can only be used at the same time "
                       "if extended_l2 is on")
    try:
        from emu.block.qcow2 import create as qcreate
    except ImportError:
        raise ImgError(f"{filename}: qcow2 creation is not available") from None
    try:
        qcreate.create_qcow2(filename, size, cluster_size=cluster_size, compat="1.1" if version == 3 else "0.10",
                             lazy_refcounts=lazy, refcount_bits=refcount_bits, preallocation=prealloc,
                             backing_file=backing_file, backing_fmt=backing_fmt)
    except EmuError as err:
        raise ImgError(f"{filename}: {err}") from None
    except OSError as err:
        raise ImgError(f"{filename}: Could not create '{filename}': {os.strerror(err.errno or 5)}") from None


@command("create", "F:b:f:o:qu", ["object="])
def cmd_create(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]``."""
    fmt = "raw"
    base = base_fmt = None
    olist: list[str] = []
    quiet = unsafe = False
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "-b":
            base = v
        elif o == "-F":
            base_fmt = v
        elif o == "-o":
            olist.append(v)
        elif o == "-q":
            quiet = True
        elif o == "-u":
            unsafe = True
    if not args:
        raise UsageError("Expecting image file name")
    filename = args[0]
    if fmt not in ("qcow2", "raw"):
        raise ImgError(f"Unknown file format '{fmt}'")
    if any(x.strip() in ("help", "?") for x in olist):
        sys.stdout.write(create_options_help(fmt))
        return 0
    o = parse_o(fmt, olist, filename)
    if base is not None:
        o["backing_file"] = base
    if base_fmt is not None:
        o["backing_fmt"] = base_fmt
    if len(args) > 2:
        raise UsageError("Unexpected argument: " + args[2])
    size: int | None = None
    if len(args) == 2:
        try:
            size = parse_size(args[1])
        except SizeRangeError:
            raise ImgError("Invalid image size specified. Must be between 0 and 9223372036854775807.") from None
        except ValueError:
            raise ImgError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                           f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    elif "size" in o:
        size = int(o["size"])
    bfile = o.get("backing_file")
    if bfile and fmt != "qcow2":
        raise ImgError(f"{filename}: Invalid parameter 'backing_file'")
    if bfile and not o.get("backing_fmt"):
        # qemu-img 7.2 refuses to probe the backing format on create.
        detected = _detect_backing_fmt(filename, bfile)
        err = ImgError(f"{filename}: Backing file specified without backing format"
                       + (f"\nDetected format of {detected}." if detected else ""))
        err.newline = not detected  # qemu-img's hint ends without a newline
        raise err
    if bfile and (size is None or not unsafe):
        from emu.block.node import resolve_backing_path
        try:
            with session() as s:
                bs = s.open(resolve_backing_path(filename, bfile), o.get("backing_fmt"), read_only=True,
                            force_share=True)
                bsize = bs.size
        except ImgError as err:
            raise ImgError(f"{filename}: {_strip_open(str(err))}\nCould not open backing image.") from None
        if size is None:
            size = bsize
    if size is None:
        raise ImgError(f"{filename}: Image creation needs a size parameter")
    create_image(filename, fmt, size, o, quiet=quiet)
    return 0


def _strip_open(msg: str) -> str:
    # "Could not open 'x': Could not open 'x': reason" -> "Could not open 'x': reason"
    head = "Could not open '"
    if msg.startswith(head) and msg.count(head) >= 2:
        return msg[msg.index(head, 1):]
    return msg


def _detect_backing_fmt(filename: str, bfile: str) -> str | None:
    from emu.block.node import resolve_backing_path
    try:
        with open(resolve_backing_path(filename, bfile), "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return None


# ---------------------------------------------------------------------------- info

def _dump_specific(d: dict, indent: int) -> str:
    """qemu's dump_qdict for ``Format specific information``."""
    out = []
    pad = " " * indent
    for key in qdict_order(d):
        val = d[key]
        name = key.replace("-", " ")
        if isinstance(val, dict):
            out.append(f"{pad}{name}:\n" + _dump_specific(val, indent + 4))
        elif isinstance(val, list):
            out.append(f"{pad}{name}:\n")
            for i, item in enumerate(val):
                if isinstance(item, dict):
                    out.append(f"{pad}    [{i}]:\n" + _dump_specific(item, indent + 8))
                else:
                    out.append(f"{pad}    [{i}]: {_scalar_text(item)}\n")
        else:
            out.append(f"{pad}{name}: {_scalar_text(val)}\n")
    return "".join(out)


def _scalar_text(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def human_info(info: dict) -> str:
    """qemu's bdrv_image_info_dump."""
    actual = info.get("actual-size")
    lines = [f"image: {info['filename']}\n", f"file format: {info['format']}\n",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n",
             f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}\n"]
    if info.get("encrypted"):
        lines.append("encrypted: yes\n")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line + "\n")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        lines.append("Snapshot list:\n" + SNAPSHOT_HEADER_LINE + "\n")
        for sn in info["snapshots"]:
            lines.append(_snap_row(sn) + "\n")
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:\n")
        lines.append(_dump_specific(spec.get("data", {}), 4))
    return "".join(lines)


def _snap_row(sn: dict) -> str:
    return snapshot_line(sn["id"], sn["name"], sn.get("vm-state-size", 0), sn.get("date-sec", 0),
                         sn.get("vm-clock-sec", 0) * 1_000_000_000 + sn.get("vm-clock-nsec", 0),
                         sn.get("icount"))


def vsize(bs) -> int:
    """The virtual size QEMU shows: whole 512-byte sectors (a 5-byte raw file is 512 bytes)."""
    return (bs.size + 511) & ~511


def image_info(bs) -> dict:
    """QEMU's ImageInfo for one node, members inserted in QAPI order (printing reorders them).

    Built from the node's public attributes rather than ``bs.image_info()`` so that the
    disk size is measured as qemu-img does: blocks allocated to the image file.
    """
    info: dict[str, Any] = {"filename": bs.filename, "format": bs.drv,
                            "dirty-flag": bool(bs.impl.dirty_flag())}
    try:
        info["actual-size"] = os.stat(bs.filename).st_blocks * 512
    except OSError:
        pass
    info["virtual-size"] = vsize(bs)
    from emu.block.drivers.rbd import snapshot_node
    snap_bs = snapshot_node(bs)   # raw on rbd: the rbd node's snapshots and object size
    cs = getattr(bs.impl, "cluster_size", None) or getattr(snap_bs.impl, "cluster_size", None)
    if cs:
        info["cluster-size"] = cs
    if bs.backing_file:
        info["backing-filename"] = bs.backing_file
        info["full-backing-filename"] = bs.full_backing_filename()
        if bs.backing_format:
            info["backing-filename-format"] = bs.backing_format
    snaps = snap_bs.snapshot_list()
    if snaps:
        info["snapshots"] = snaps
    spec = bs.impl.info_specific()
    if spec is not None:
        info["format-specific"] = spec
    return info


@command("info", "f:U", ["format=", "output=", "backing-chain", "object=", "image-opts", "force-share"])
def cmd_info(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename``."""
    fmt = None
    out = "human"
    chain = share = False
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o == "--output":
            out = v
        elif o == "--backing-chain":
            chain = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    out = output_format(out)
    filename = args[0]
    with session() as s:
        # qemu-img info opens each image without its backing chain.
        nodes = s.chain(filename, fmt, share) if chain else \
            [s.open(filename, fmt, read_only=True, force_share=share, no_backing=True)]
        infos = []
        for n in nodes:
            try:
                infos.append(image_info(n))
            except EmuError as err:
                raise ImgError(str(err)) from None
    if out == "json":
        sys.stdout.write(to_json_pretty(infos if chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n".join(human_info(i) for i in infos))
    return 0


# ---------------------------------------------------------------------------- snapshot

@command("snapshot", "la:c:d:qU", ["object=", "image-opts", "force-share"])
def cmd_snapshot(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename``."""
    action = None
    name = ""
    quiet = share = False
    for o, v in opts:
        if o in ("-l", "-a", "-c", "-d"):
            if action is not None:
                raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = o, v
        elif o == "-q":
            quiet = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    filename = args[0]
    if action is None:
        return 0
    if share and action != "-l":
        raise ImgError(f"Could not open '{args[0]}': force-share=on can only be used with read-only images")
    with session() as s:
        bs = s.open(filename, None, read_only=(action == "-l"), force_share=share, no_backing=False)
        from emu.block.drivers.rbd import snapshot_node
        bs = snapshot_node(bs)   # QEMU's fallback: raw on rbd snapshots the rbd node
        if action == "-l":
            snaps = bs.snapshot_list()
            if snaps:
                sys.stdout.write("Snapshot list:\n" + SNAPSHOT_HEADER_LINE + "\n")
                for sn in snaps:
                    sys.stdout.write(_snap_row(sn) + "\n")
            return 0
        try:
            if action == "-c":
                if not bs.supports_snapshots:
                    raise ImgError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
                if bs.drv == "qcow2":
                    # qemu-img lets a name repeat (only ids are unique) and stores icount 0.
                    with bs.lock:
                        bs.impl.snapshot_create(name, date=time.time(), icount=0, unique_name=False)
                else:
                    bs.snapshot_create(name, date=time.time(), icount=0)
            elif action == "-d":
                if not bs.supports_snapshots:
                    raise ImgError(f"Could not delete snapshot '{name}': snapshot not found")
                # qemu-img's bdrv_snapshot_find: the first snapshot with that *name* (never an
                # id), then deleted by its id and name.
                sn = next((sn for sn in bs.snapshot_list() if sn["name"] == name), None)
                if sn is None:
                    raise ImgError(f"Could not delete snapshot '{name}': snapshot not found")
                bs.snapshot_delete(sn["id"], name)
            else:
                if not bs.supports_snapshots:
                    raise ImgError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                                   "No such file or directory")
                bs.snapshot_goto(name)
        except EmuError as err:
            verb = {"-c": "create", "-d": "delete", "-a": "apply"}[action]
            msg = str(err)
            if action == "-c" and getattr(err, "errno", None):
                # The driver's own report first (QEMU's error_report), then qemu-img's "%d (%s)".
                sys.stderr.write(f"{PROG}: {err}\n")
                msg = f"-{err.errno} ({os.strerror(err.errno)})"
            missing = "not found" in msg.lower() or "can't find" in msg.lower()
            if action == "-d" and missing:
                msg = "snapshot not found"
            if action == "-a" and missing:
                msg = "Failed to load snapshot: No such file or directory"
            raise ImgError(f"Could not {verb} snapshot '{name}': {msg}") from None
    return 0


# ---------------------------------------------------------------------------- map

def block_status_above(bs, offset: int, length: int) -> tuple[dict, int]:
    """Walk the backing chain like bdrv_block_status_above; returns (map entry fields, length)."""
    depth = 0
    node = bs
    n = length
    while True:
        kind, cnt, host = node.block_status(offset, n)
        cnt = max(1, min(cnt, n))
        if kind != "unallocated" or node.backing is None or offset >= node.backing.size:
            break
        n = cnt
        node = node.backing
        depth += 1
    zero_in_file = False
    if kind == "data" and host is not None and node.drv != "raw" and node.file is not None:
        # Like bdrv_co_block_status with want_zero: a data range over a hole of the image
        # file reads as zeroes (e.g. preallocated metadata).
        try:
            fkind, fn, _ = node.file.block_status(host, cnt)
        except EmuError:
            fkind, fn = "data", cnt
        cnt = max(1, min(cnt, fn))
        zero_in_file = fkind == "zero"
    if kind == "zero" and host is None and node.drv == "raw":
        # A hole in a raw file still has a host offset (qemu-img map prints it).
        host = offset + getattr(node.impl, "offset", 0)
    present = kind not in ("unallocated", "zero-unallocated")
    if not present:
        # Past the end of the chain or nothing allocated: reads as zeroes.
        ent = {"depth": depth, "present": False, "zero": True, "data": False, "offset": None,
               "filename": node.filename}
    else:
        ent = {"depth": depth, "present": present, "zero": kind == "zero" or zero_in_file,
               "data": kind == "data",
               "offset": host, "filename": node.filename}
    return ent, cnt


def _fmt_hex(v: int) -> str:
    return "%-16s" % (("0x%x" % v) if v else "0")


@command("map", "f:U", ["format=", "output=", "start-offset=", "max-length=", "object=", "image-opts",
                        "force-share"])
def cmd_map(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``map [-f fmt] [--start-offset=o] [--max-length=l] [--output=ofmt] [-U] filename``."""
    fmt = None
    out = "human"
    share = False
    start, max_len = 0, None
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o == "--output":
            out = v
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "--start-offset":
            try:
                start = parse_size(v)
            except ValueError:
                raise ImgError("Invalid start offset specified! You may use k, M, G, T, P or E suffixes "
                               "for") from None
        elif o == "--max-length":
            try:
                max_len = parse_size(v)
            except ValueError:
                raise ImgError("Invalid max length specified! You may use k, M, G, T, P or E suffixes "
                               "for") from None
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    out = output_format(out)
    with session() as s:
        bs = s.open(args[0], fmt, read_only=True, force_share=share)
        size = vsize(bs)
        end = size if max_len is None else min(size, start + max_len)
        entries: list[dict] = []
        off = start
        while off < end:
            if off >= bs.size:
                # The rest of the last sector of a raw image: zeroes at their own offset.
                ent, n = {"depth": 0, "present": True, "zero": True, "data": False, "offset": off,
                          "filename": bs.filename}, end - off
            else:
                ent, n = block_status_above(bs, off, min(end - off, bs.size - off, 1 << 30))
            ent["start"], ent["length"] = off, n
            last = entries[-1] if entries else None
            if last and all(last[k] == ent[k] for k in ("depth", "present", "zero", "data", "filename")) and \
                    last["start"] + last["length"] == off and (
                    (last["offset"] is None and ent["offset"] is None) or
                    (last["offset"] is not None and ent["offset"] is not None and
                     last["offset"] + last["length"] == ent["offset"])):
                last["length"] += n
            else:
                entries.append(ent)
            off += n
    if not entries:
        # qemu-img prints one empty extent for an empty image.
        entries.append({"start": start, "length": 0, "depth": 0, "present": False, "zero": False,
                        "data": False, "offset": None, "filename": args[0]})
    if out == "human":
        sys.stdout.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        for e in entries:
            if e["data"] and e["offset"] is None:
                raise ImgError("File contains external, encrypted or compressed clusters.")
            if e["data"] and not e["zero"]:
                sys.stdout.write(_fmt_hex(e["start"]) + _fmt_hex(e["length"]) + _fmt_hex(e["offset"] or 0)
                                 + e["filename"] + "\n")
        return 0
    lines = []
    for e in entries:
        line = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
                % (e["start"], e["length"], e["depth"], _scalar_text(e["present"]),
                   _scalar_text(e["zero"]), _scalar_text(e["data"])))
        if e["offset"] is not None:
            line += ', "offset": %d' % e["offset"]
        lines.append(line + "}")
    sys.stdout.write("[" + ",\n".join(lines) + "]\n")
    return 0


# ---------------------------------------------------------------------------- resize

RESIZE_SIZE_ERROR = ("Parameter 'size' expects a non-negative number below 2^64\n"
                     "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                     "and exabytes, respectively.")


@command("resize", "f:q", ["format=", "preallocation=", "shrink", "object=", "image-opts"])
def cmd_resize(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``resize [-f fmt] [--preallocation=p] [-q] [--shrink] filename [+ | -]size``."""
    fmt = None
    quiet = shrink = False
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o == "-q":
            quiet = True
        elif o == "--shrink":
            shrink = True
        elif o == "--preallocation" and v not in ("off",):
            raise ImgError(f"Invalid preallocation mode: '{v}'" if v not in ("metadata", "falloc", "full")
                           else f"Preallocation mode '{v}' is not supported by emu-img resize")
    if len(args) != 2:
        raise UsageError("Expecting image file name and size")
    filename, text = args
    rel = 0
    if text[:1] == "+":
        rel, text = 1, text[1:]
    elif text[:1] == "-":
        rel, text = -1, text[1:]
    try:
        n = parse_size(text)
    except ValueError:
        raise ImgError(RESIZE_SIZE_ERROR) from None
    with session() as s:
        bs = s.open(filename, fmt, read_only=False)
        cur = bs.size
        total = cur + rel * n if rel else n
        if total < 0:
            raise ImgError("New image size must be positive")
        if total < cur and not shrink:
            from emu.img.main import error_report
            error_report("Use the --shrink option to perform a shrink operation.")
            raise ImgError("warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                           "Before performing such an operation, make sure there is no important data there.")
        try:
            bs.truncate(total)
        except EmuError as err:
            raise ImgError(str(err)) from None
    qprint(quiet, "Image resized.\n")
    return 0


def pre_resize_args(args: list[str]) -> list[str]:
    """qemu-img lets the size of ``resize`` start with '-' without ``--``."""
    if len(args) >= 2 and args[-1].startswith("-") and args[-2] != "--" and len(args[-1]) > 1 and \
            (args[-1][1].isdigit() or args[-1][1] == "."):
        return args[:-1] + ["--", args[-1]] if "--" not in args else args
    return args


# ---------------------------------------------------------------------------- commit / rebase

#: qemu-img's IO_BUF_SIZE: rebase compares (and reports progress) in steps of this size.
IO_CHUNK = 2 << 20

def copy_allocated(src, dst, offset: int, length: int, chunk: int = 1 << 20) -> None:
    """Copy every extent that ``src`` itself allocates (data or zero) into ``dst``."""
    end = offset + length
    while offset < end:
        kind, n, _ = src.block_status(offset, min(end - offset, 1 << 30))
        n = max(1, min(n, end - offset))
        if kind == "data":
            pos = offset
            while pos < offset + n:
                m = min(chunk, offset + n - pos)
                dst.write(pos, src.read(pos, m))
                pos += m
        elif kind == "zero":
            dst.write_zeroes(offset, n)
        offset += n


@command("commit", "f:t:b:dpr:q", ["format=", "object=", "image-opts"])
def cmd_commit(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename``: data of the top image into
    its backing file, then (without ``-d``) empty the top image."""
    fmt = None
    cache = "writeback"
    quiet = drop = progress = False
    base_name = None
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o == "-t":
            cache = v
        elif o == "-b":
            base_name = v
            drop = True  # qemu-img: -b implies -d
        elif o == "-d":
            drop = True
        elif o == "-q":
            quiet = True
        elif o == "-p":
            progress = True
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    filename = args[0]
    with session() as s:
        probe = s.open(filename, fmt, read_only=True, no_backing=True)
        if not probe.backing_file:
            raise ImgError("Image does not have a backing file")
        bpath, bfmt = probe.full_backing_filename(), probe.backing_format
        s.graph.remove(probe)
        base = s.open(bpath, bfmt, read_only=False, cache=cache)
        top = s.open(filename, fmt, read_only=False, cache=cache, backing=base)
        if base_name is not None and os.path.realpath(base_name) != os.path.realpath(bpath):
            raise ImgError(f"Did not find '{base_name}' in the backing chain of '{filename}'")
        prog = Progress(progress and not quiet)
        prog.force(0.0)  # qemu-img prints the starting point twice (init, then job start)
        size = top.size
        if base.size < size:
            base.truncate(size)
        step = 64 << 20
        for off in range(0, size, step):
            copy_allocated(top, base, off, min(step, size - off))
            prog.update((off + min(step, size - off)) * 100.0 / size if size else 100)
        base.flush()
        if not drop:
            _make_empty(top)
        top.flush()
        prog.end()
    qprint(quiet, "Image committed.\n")
    return 0


@command("rebase", "f:F:b:t:T:upqU", ["format=", "object=", "image-opts", "force-share"])
def cmd_rebase(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``rebase [-U] [-q] [-f fmt] [-t cache] [-p] [-u] -b backing_file [-F backing_fmt] filename``."""
    fmt = None
    new_base = new_fmt = None
    unsafe = quiet = progress = False
    cache = "writeback"
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o == "-F":
            new_fmt = v
        elif o == "-b":
            new_base = v
        elif o == "-u":
            unsafe = True
        elif o == "-q":
            quiet = True
        elif o == "-p":
            progress = True
        elif o == "-t":
            cache = v
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    if not unsafe and new_base is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = args[0]
    from emu.block.node import resolve_backing_path
    new_base = new_base or ""
    with session() as s:
        if unsafe:
            bs = s.open(filename, fmt, read_only=False, cache=cache, no_backing=True)
        else:
            bs = s.open(filename, fmt, read_only=False, cache=cache)
        probe_fmt = None
        if new_base and new_fmt is None and not unsafe:
            probe_fmt = _detect_backing_fmt(filename, new_base)
        if not unsafe:
            new_node = None
            if new_base:
                try:
                    new_node = s.graph.open_image(resolve_backing_path(filename, new_base),
                                                  new_fmt or probe_fmt, read_only=True)
                except EmuError as err:
                    raise ImgError(f"Could not open new backing file '{new_base}': {err}") from None
            old_node = bs.backing
            size = bs.size
            prog = Progress(progress and not quiet, 2.0)
            step = 100.0 / max(1, size // min(size, IO_CHUNK)) if size else 100.0
            # qemu-img's loop: 2 MiB steps cut at allocation changes; every unallocated step
            # is compared and reported (allocated ones are skipped silently).
            off = 0
            while off < size:
                kind, n, _ = bs.block_status(off, min(IO_CHUNK, size - off))
                n = max(1, min(n, IO_CHUNK, size - off))
                if kind in ("unallocated", "zero-unallocated"):
                    old = _read_or_zero(old_node, off, n)
                    new = _read_or_zero(new_node, off, n)
                    if old != new:
                        _write_diff(bs, off, old, new)
                    prog.add(step)
                off += n
            prog.force(100.0)
            prog.end()
        if new_base and new_fmt is None:
            raise ImgError(f"Could not change the backing file to '{new_base}': backing format must be "
                           "specified")
        _set_backing(bs, new_base or None, new_fmt if new_base else None)
    return 0


def _make_empty(bs) -> None:
    """QEMU's bdrv_make_empty: every cluster of ``bs`` unallocated again (reads from backing).

    Uses the driver's ``make_empty()`` when it has one; otherwise the qcow2 driver's
    cluster-zapping primitive with "unallocated" entries (full discard), as qcow2_make_empty.
    """
    impl = bs.impl
    with bs.lock:
        if hasattr(impl, "make_empty"):
            impl.make_empty()
        elif hasattr(impl, "_zero_clusters"):
            impl.mark_dirty_for_write()
            impl._zero_clusters(0, impl.l1_coverage(), False)
        else:
            bs.discard(0, bs.size)
    bs.flush()


def _read_or_zero(node, offset: int, length: int) -> bytes:
    if node is None or offset >= node.size:
        return bytes(length)
    n = min(length, node.size - offset)
    return node.read(offset, n) + bytes(length - n)


def _write_diff(bs, pos: int, old: bytes, new: bytes, gran: int = 512) -> None:
    """Write the old backing data where it differs from the new one (sector runs)."""
    i = 0
    n = len(old)
    while i < n:
        if old[i:i + gran] == new[i:i + gran]:
            i += gran
            continue
        j = i
        while j < n and old[j:j + gran] != new[j:j + gran]:
            j += gran
        bs.write(pos + i, old[i:j])
        i = j


def _set_backing(bs, name: str | None, fmt: str | None) -> None:
    impl = bs.impl
    fn = getattr(impl, "set_backing", None)
    if fn is None:
        raise ImgError("Could not change the backing file to "
                       f"'{name or ''}': Operation not supported")
    try:
        fn(name, fmt)
    except EmuError as err:
        raise ImgError(f"Could not change the backing file to '{name or ''}': {err}") from None


# ---------------------------------------------------------------------------- progress

class Progress:
    """qemu-progress's simple printer: ``    (12.34/100%)\\r`` lines on stdout."""

    def __init__(self, enabled: bool, min_skip: float = 1.0) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last = 0.0
        if enabled:
            self._print()

    def _print(self) -> None:
        sys.stdout.write("    (%3.2f/100%%)\r" % self.current)
        sys.stdout.flush()

    def update(self, percent: float) -> None:
        """Move to ``percent`` (0..100) and print when it moved by at least ``min_skip``."""
        if not self.enabled:
            return
        self.current = min(100.0, percent)
        if self.current - self.last >= self.min_skip or self.current >= 100.0 and self.last < 100.0:
            self.last = self.current
            self._print()

    def add(self, delta: float) -> None:
        """Advance by ``delta`` percent (capped at 100), as qemu_progress_print(delta, 100)."""
        if not self.enabled:
            return
        self.current = min(100.0, self.current + delta)
        if self.current == 100.0 or self.current - self.last > self.min_skip:
            self.last = self.current
            self._print()

    def force(self, percent: float) -> None:
        """Print ``percent`` unconditionally (qemu-img convert's final 100%)."""
        if self.enabled:
            self.current = self.last = percent
            self._print()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


cmd_resize.preparse = pre_resize_args  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- measure

def _refcount_metadata_size(clusters: int, cs: int, refcount_order: int) -> int:
    """QEMU's qcow2_refcount_metadata_size: refcount blocks and table clusters for
    ``clusters`` host clusters, found as the fixed point (they count themselves)."""
    per_table_cluster = cs // 8
    per_block = cs * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cs


def _qcow2_prealloc_size(total: int, cs: int, refcount_order: int) -> int:
    """QEMU's qcow2_calc_prealloc_size: data plus every metadata cluster a fully
    allocated image of ``total`` bytes needs."""
    aligned = -(-total // cs) * cs
    meta = cs                                   # header
    per_table = cs // 8
    nl2e = -(-(aligned // cs) // per_table) * per_table
    meta += nl2e * 8                            # L2 tables
    nl1e = -(-(nl2e * 8 // cs) // per_table) * per_table
    meta += nl1e * 8                            # L1 table
    meta += _refcount_metadata_size((meta + aligned) // cs, cs, refcount_order)
    return meta + aligned


@command("measure", "hf:O:o:l:U", ["output=", "size=", "object=", "image-opts", "force-share"])
def cmd_measure(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snap]
    filename]``: the size a converted or new image needs, as qemu-img 7.2 computes it."""
    fmt = None
    out_fmt = "raw"
    olist: list[str] = []
    out = "human"
    size_text = snap = None
    share = False
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "-O":
            out_fmt = v
        elif o == "-o":
            olist.append(v)
        elif o == "-l":
            snap = v
        elif o == "--size":
            size_text = v
        elif o == "--output":
            out = v
        elif o in ("-U", "--force-share"):
            share = True
    out = output_format(out)
    if size_text is not None:
        try:
            size = parse_size(size_text)
        except ValueError:
            raise ImgError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                           f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    if len(args) > 1:
        raise UsageError("Expecting one image file name")   # (qemu-img: only one filename)
    if size_text is not None and args:
        raise ImgError("--size N cannot be used together with a filename.")
    if size_text is None and not args:
        raise ImgError("Either --size N or one filename must be specified.")
    if out_fmt not in ("qcow2", "raw"):
        raise ImgError(f"Unknown file format '{out_fmt}'")
    o = parse_o(out_fmt, olist, "")
    with session() as s:
        bs = None
        if args:
            bs = s.open(args[0], fmt, read_only=True, force_share=share, no_backing=False)
            if snap is not None:
                from emu.img.cmd_copy import _load_snapshot, _snapshot_opts
                if snap.startswith("snapshot."):
                    _load_snapshot(bs, _snapshot_opts(snap), None)
                else:
                    _load_snapshot(bs, None, snap)
        has_bitmaps = False
        if out_fmt == "raw":
            required = bs.size if bs is not None else (size + 511) & ~511
            full = required
        else:
            cs = int(o.get("cluster_size", 65536))
            refcount_order = int(o.get("refcount_bits", 16)).bit_length() - 1
            v3 = o.get("compat", "1.1") not in ("0.10", "v2")
            if bs is None:
                vsize = (size + 511) & ~511
                data = 0        # a new image: metadata only
            else:
                ssize = bs.size
                vsize = -(-ssize // cs) * cs
                data = 0
                off = 0
                while off < ssize:
                    ent, n = block_status_above(bs, off, ssize - off)
                    if ent["data"] and not ent["zero"] and ent["present"]:
                        # whole clusters, counted from the cluster's start (QEMU's loop)
                        n = -(-(off + n) // cs) * cs - off
                        data += off % cs + n
                    off += n
                # bitmaps: both the target and the source (qcow2 v3) could hold them
                has_bitmaps = v3 and bs.drv == "qcow2" and getattr(bs.impl, "version", 2) >= 3
            full = _qcow2_prealloc_size(vsize, cs, refcount_order)
            required = full - (-(-vsize // cs) * cs) + data
    if out == "json":
        d: dict[str, Any] = {"required": required, "fully-allocated": full}
        if has_bitmaps:
            d["bitmaps"] = 0
        sys.stdout.write(to_json_pretty(d) + "\n")
    else:
        text = f"required size: {required}\nfully allocated size: {full}\n"
        if has_bitmaps:
            text += "bitmaps size: 0\n"
        sys.stdout.write(text)
    return 0

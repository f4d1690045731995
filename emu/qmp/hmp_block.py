"""HMP block and port commands as QEMU 7.2 prints them (block/monitor/block-hmp-cmds.c,
monitor/misc.c): ``info blockstats``, ``info block-jobs``, ``snapshot_blkdev_internal``,
``snapshot_delete_blkdev_internal``, ``block_job_cancel``/``_complete``/``_pause``/``_resume``,
and the port commands ``i /fmt port`` and ``o /fmt port value``.

The block commands run the QMP command they stand for (the same checks and errors, which HMP
prints as ``Error: <desc>``); ``i`` and ``o`` go through the machine's I/O port bus as a guest
IN/OUT would, device side effects included, as in QEMU.
"""

from __future__ import annotations

from typing import Any

from emu.qmp.hmp import _hmp_usage_error, hmp, hmp_get_str


class _Session:
    negotiated = True
    oob_enabled = False


def _qmp(machine: Any, name: str, args: dict[str, Any] | None = None) -> tuple[Any, str | None]:
    """Run QMP ``name``: ``(return value, None)`` or ``(None, error text)``."""
    from emu.qmp.commands import CommandContext
    from emu.qmp.protocol import dispatch

    req: dict[str, Any] = {"execute": name}
    if args:
        req["arguments"] = args
    rsp = dispatch(req, CommandContext(machine, _Session()), negotiated=True, oob_enabled=False)
    if "error" in rsp:
        return None, rsp["error"]["desc"]
    return rsp["return"], None


def _words(rest: str, cmd: str, names: list[str], optional: int = 0,
           missing: str = "string expected") -> tuple[list[str], str | None]:
    """HMP 's' (or 'B': ``missing`` is then "block device name expected") arguments:
    ``names`` words, the last ``optional`` of them may be left out."""
    pos, out = 0, []
    for i, _name in enumerate(names):
        word, pos, err = hmp_get_str(rest, pos)
        if err:
            return [], _hmp_usage_error(cmd, err)
        if word is None:
            if i >= len(names) - optional:
                break
            return [], _hmp_usage_error(cmd, missing)
        out.append(word)
    if rest[pos:].strip():
        return [], _hmp_usage_error(cmd, "extraneous characters at the end of line")
    return out, None


# ------------------------------------------------------------------ info

@hmp("blockstats", info=True)
def info_blockstats(machine: Any, args: list[str]) -> str:
    """``info blockstats``: one line per device (hmp_info_blockstats)."""
    stats, err = _qmp(machine, "query-blockstats")
    if err:
        return f"Error: {err}\n"
    out = []
    for s in stats:
        st = s["stats"]
        dev = s.get("device")
        out.append(f"{dev + ':' if dev is not None else ''} rd_bytes={st['rd_bytes']} wr_bytes={st['wr_bytes']} "
                   f"rd_operations={st['rd_operations']} wr_operations={st['wr_operations']} "
                   f"flush_operations={st['flush_operations']} "
                   f"wr_total_time_ns={st['wr_total_time_ns']} "
                   f"rd_total_time_ns={st['rd_total_time_ns']} "
                   f"flush_total_time_ns={st['flush_total_time_ns']} rd_merged={st['rd_merged']} "
                   f"wr_merged={st['wr_merged']} idle_time_ns={st.get('idle_time_ns', 0)}\n")
    return "".join(out)


@hmp("block-jobs", info=True)
def info_block_jobs(machine: Any, args: list[str]) -> str:
    """``info block-jobs`` (hmp_info_block_jobs)."""
    jobs, err = _qmp(machine, "query-block-jobs")
    if err:
        return f"Error: {err}\n"
    if not jobs:
        return "No active jobs\n"
    out = []
    for j in jobs:
        if j["type"] == "stream":
            out.append(f"Streaming device {j['device']}: Completed {j['offset']} of {j['len']} "
                       f"bytes, speed limit {j['speed']} bytes/s\n")
        else:
            out.append(f"Type {j['type']}, device {j['device']}: Completed {j['offset']} of "
                       f"{j['len']} bytes, speed limit {j['speed']} bytes/s\n")
    return "".join(out)


# ------------------------------------------------------------------ snapshots and jobs

@hmp("snapshot_blkdev_internal", raw=True)
def hmp_snapshot_blkdev_internal(machine: Any, rest: str) -> str:
    """``snapshot_blkdev_internal device name``."""
    w, usage = _words(rest, "snapshot_blkdev_internal", ["device", "name"])
    if usage:
        return usage
    _ret, err = _qmp(machine, "blockdev-snapshot-internal-sync", {"device": w[0], "name": w[1]})
    return f"Error: {err}\n" if err else ""


@hmp("snapshot_delete_blkdev_internal", raw=True)
def hmp_snapshot_delete_blkdev_internal(machine: Any, rest: str) -> str:
    """``snapshot_delete_blkdev_internal device name [id]``."""
    w, usage = _words(rest, "snapshot_delete_blkdev_internal", ["device", "name", "id"], optional=1)
    if usage:
        return usage
    args = {"device": w[0], "name": w[1]}
    if len(w) > 2:
        args["id"] = w[2]
    _ret, err = _qmp(machine, "blockdev-snapshot-delete-internal-sync", args)
    return f"Error: {err}\n" if err else ""


def _job_verb(cmd: str, qmp_name: str, force_flag: bool = False) -> None:
    def run(machine: Any, rest: str) -> str:
        text = rest.strip()
        force = False
        if force_flag and (text == "-f" or text.startswith("-f ")):
            force, text = True, text[2:]
        w, usage = _words(text, cmd, ["device"], missing="block device name expected")
        if usage:
            return usage
        args: dict[str, Any] = {"device": w[0]}
        if force:
            args["force"] = True
        _ret, err = _qmp(machine, qmp_name, args)
        return f"Error: {err}\n" if err else ""
    run.__doc__ = f"``{cmd} {'[-f] ' if force_flag else ''}device``: QMP {qmp_name}."
    hmp(cmd, raw=True)(run)


_job_verb("block_job_cancel", "block-job-cancel", force_flag=True)
_job_verb("block_job_complete", "block-job-complete")
_job_verb("block_job_pause", "block-job-pause")
_job_verb("block_job_resume", "block-job-resume")


# ------------------------------------------------------------------ port I/O

def _port_args(cmd: str, rest: str, want_value: bool) -> tuple[tuple[int, int, int] | None, str]:
    """``/fmt port [value]``: ``((size, port, value), "")`` or ``(None, error text)``; both
    numbers are HMP 'i' arguments (expressions that must fit in 32 bits)."""
    from emu.qmp.hmp_cpu import HmpExprError, _Expr, _parse_fmt

    def int32_arg(pos: int) -> tuple[int, int]:
        e = _Expr(rest, pos, lambda _name: None)
        v = e.sum()
        if (v >> 32) & 0xFFFFFFFF:
            raise HmpExprError(f"'{cmd}' has failed: integer is for 32-bit values")
        return v, e.p

    try:
        _count, _fmt, size, pos = _parse_fmt(rest, 0)
        while pos < len(rest) and rest[pos].isspace():
            pos += 1
        port, pos = int32_arg(pos)
        value = 0
        if want_value:
            value, pos = int32_arg(pos)
        if pos < len(rest):
            raise HmpExprError(f"{cmd}: extraneous characters at the end of line")
    except HmpExprError as err:
        return None, f"{err}\nTry \"help {cmd}\" for more information\n"
    return (size, port, value), ""


def _port_access(machine: Any, fn: Any) -> Any:
    """Run ``fn(iobus)`` with the vCPU parked, as QEMU's monitor holds the big lock: the
    devices see the access between two guest instructions, never beside one."""
    hw = getattr(machine, "hardware", None)
    bus = getattr(getattr(hw, "board", None), "iobus", None)
    cpu = getattr(hw, "cpu", None)
    if bus is None or cpu is None:
        return None
    box: list[Any] = []
    cpu._with_cpu_stopped(lambda: box.append(fn(bus)))
    return box[0]


@hmp("i", raw=True)
def hmp_ioport_read(machine: Any, rest: str) -> str:
    """``i /fmt port``: one IN (hmp_ioport_read: size 2 or 4 reads a word or a dword, any
    other size one byte, printed that many bytes wide)."""
    args, err = _port_args("i", rest, False)
    if args is None:
        return err
    size, port, _value = args
    port &= 0xFFFF
    n, suffix = {2: (2, "w"), 4: (4, "l")}.get(size, (1, "b"))
    value = _port_access(machine, lambda bus: bus.port_read(port, n))
    if value is None:
        value = (1 << (8 * n)) - 1
    return f"port{suffix}[0x{port:04x}] = 0x{value & ((1 << (8 * n)) - 1):0{max(size, 1) * 2}x}\n"


@hmp("o", raw=True)
def hmp_ioport_write(machine: Any, rest: str) -> str:
    """``o /fmt port value``: one OUT (size 2 or 4 a word or dword, else a byte)."""
    args, err = _port_args("o", rest, True)
    if args is None:
        return err
    size, port, value = args
    n = size if size in (2, 4) else 1
    _port_access(machine, lambda bus: bus.port_write(port & 0xFFFF, n, value & ((1 << (8 * n)) - 1)))
    return ""

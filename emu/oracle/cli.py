"""``emu-oracle``: check what a transaction produced against the diskwriter guest's serial log.

Examples::

    # internal snapshots 't1' of both disks, cut read from a running emu over QMP
    emu-oracle --log serial.txt --disk ide=ide.qcow2 --disk vd=vd.qcow2 -l t1 --qmp /tmp/qmp.sock
    # the same with the cut given by hand (completed writes per disk)
    emu-oracle --log serial.txt --disk ide=ide.qcow2 --disk vd=vd.qcow2 -l t1 --cut ide=412,vd=398
    # external overlays: check the backing files; backup targets: check the targets
    emu-oracle --log serial.txt --disk ide=ide.qcow2 --disk vd=vd.qcow2 --cuts cuts.json --cut-id 3
    # no cut report (e.g. snapshots made by qemu-system-x86_64): infer the tightest cut
    emu-oracle --log serial.txt --disk ide=ide.qcow2,snapshot=t1 --disk vd=vd.qcow2,snapshot=t1

Exit status: 0 no violation, 1 violations (one line each: kind, disk, LBA, expected, found),
2 the check could not run (bad arguments, unreadable log or image, unknown cut).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from typing import Any, Sequence

from emu.errors import EmuError
from emu.oracle.check import DiskImage, check, disk_for_device
from emu.oracle.records import DISK_IDS, parse_log

__all__ = ["main", "query_cuts", "cut_from_report"]

_FORMATTING = re.compile(r"Formatting '[^\n]*\n")


class UsageError(EmuError):
    """Bad arguments or input for the command line."""


def _parse_disk(spec: str, default_snapshot: str | None) -> tuple[str, DiskImage]:
    disk, sep, rest = spec.partition("=")
    if not sep or not rest or disk not in DISK_IDS:
        raise UsageError(f"--disk {spec!r}: expected ide=PATH or vd=PATH[,snapshot=NAME][,format=FMT]")
    path, *opts = rest.split(",")
    snapshot, fmt = default_snapshot, None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "snapshot" and value:
            snapshot = value
        elif key == "format" and value in ("qcow2", "raw"):
            fmt = value
        else:
            raise UsageError(f"--disk {spec!r}: unknown option {opt!r}")
    return disk, DiskImage(path, snapshot, fmt)


def _parse_cut(spec: str) -> dict[str, int]:
    cut = {}
    for part in spec.split(","):
        disk, _, n = part.partition("=")
        if disk not in DISK_IDS or not n.isdigit():
            raise UsageError(f"--cut {spec!r}: expected ide=N,vd=N (completed writes per disk)")
        cut[disk] = int(n)
    return cut


def cut_from_report(cuts: Any, cut_id: int | None, mapping: dict[str, str]) -> dict[str, int]:
    """The per-disk cut from ``x-emu-query-cuts`` output.

    :param cuts: its return value (a list of cuts), a whole reply ``{"return": [...]}``, or one cut.
    :param cut_id: which cut; None takes the newest.
    :param mapping: device name -> disk overrides (default :func:`disk_for_device`).
    :raises UsageError: no such cut, or a device without write accounting.
    """
    if isinstance(cuts, dict) and "return" in cuts:
        cuts = cuts["return"]
    if isinstance(cuts, dict):
        cuts = [cuts]
    if not isinstance(cuts, list) or not all(isinstance(c, dict) and "id" in c for c in cuts):
        raise UsageError("the cut report is not x-emu-query-cuts output")
    chosen = [c for c in cuts if cut_id is None or c["id"] == cut_id]
    if not chosen:
        raise UsageError(f"no cut with id {cut_id} (have {', '.join(str(c['id']) for c in cuts) or 'none'})")
    cut = chosen[-1]
    out: dict[str, int] = {}
    for dev in cut.get("devices", []):
        name = str(dev.get("device", ""))
        disk = mapping.get(name) or disk_for_device(name)
        if disk is None:
            continue
        if not dev.get("accounted") or "wr_operations" not in dev:
            raise UsageError(f"cut {cut['id']}: device {name} keeps no write accounting")
        out[disk] = int(dev["wr_operations"])
    return out


def query_cuts(path: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Ask a running emu (QMP unix socket ``path``) for ``x-emu-query-cuts``.

    :raises UsageError: connection failure or an error reply.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            f = s.makefile("rwb")
            _reply(f, None)  # greeting
            for cmd in ("qmp_capabilities", "x-emu-query-cuts"):
                f.write(json.dumps({"execute": cmd, "id": cmd}).encode() + b"\n")
                f.flush()
                rsp = _reply(f, cmd)
            return rsp
    except OSError as err:
        raise UsageError(f"QMP {path}: {err.strerror or err}") from err


def _reply(f: Any, want: str | None) -> Any:
    while True:
        line = f.readline()
        if not line:
            raise UsageError("QMP connection closed")
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise UsageError(f"QMP sent something that is not JSON: {line[:80]!r}") from err
        if want is None and "QMP" in msg:
            return msg
        if msg.get("id") == want:
            if "error" in msg:
                raise UsageError(f"QMP {want}: {msg['error'].get('desc')}")
            return msg.get("return")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emu-oracle",
        description="Prove that snapshots / overlays' backing files / backup targets hold exactly "
                    "the writes the diskwriter guest saw completed before the cut, on every disk.",
        epilog="Exit status: 0 consistent, 1 violations, 2 could not check.")
    p.add_argument("--log", required=True, help="the guest's serial output (COM1)")
    p.add_argument("--disk", action="append", required=True, metavar="DISK=PATH[,snapshot=S][,format=F]",
                   help="image of disk 'ide' or 'vd' (repeat); snapshot= reads an internal snapshot")
    p.add_argument("-l", "--snapshot", help="internal snapshot name for every --disk without one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cut", help="completed writes per disk at the cut: ide=N,vd=N")
    src.add_argument("--cuts", metavar="FILE", help="x-emu-query-cuts output (JSON)")
    src.add_argument("--qmp", metavar="SOCKET", help="ask a running emu for x-emu-query-cuts")
    p.add_argument("--cut-id", type=int, help="which cut of --cuts/--qmp (default: the newest)")
    p.add_argument("--map", action="append", default=[], metavar="DEVICE=DISK",
                   help="device name of the cut report -> disk (default: ide* -> ide, virtio* -> vd)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``emu-oracle`` entry point; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        images = dict(_parse_disk(spec, args.snapshot) for spec in args.disk)
        mapping = {}
        for m in args.map:
            dev, _, disk = m.partition("=")
            if disk not in DISK_IDS:
                raise UsageError(f"--map {m!r}: expected DEVICE=ide or DEVICE=vd")
            mapping[dev] = disk
        cut = None
        if args.cut:
            cut = _parse_cut(args.cut)
        elif args.cuts:
            try:
                with open(args.cuts, encoding="utf-8") as f:
                    report = json.load(f)
            except (OSError, ValueError) as err:
                raise UsageError(f"{args.cuts}: {err}") from err
            cut = cut_from_report(report, args.cut_id, mapping)
        elif args.qmp:
            cut = cut_from_report(query_cuts(args.qmp), args.cut_id, mapping)
        if cut is not None:
            cut = {d: n for d, n in cut.items() if d in images}
        try:
            with open(args.log, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as err:
            raise UsageError(f"{args.log}: {err.strerror or err}") from err
        # QEMU and emu print "Formatting '<overlay>', fmt=..." on stdout when a snapshot
        # creates a file; with -serial stdio it can land in the middle of a guest line
        text = _FORMATTING.sub("", text)
        result = check(parse_log(text, strict=False), images, cut)
    except EmuError as err:
        print(f"emu-oracle: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "ok": result.ok, "inferred": result.inferred,
            "disks": {d: {"source": r.source, "cut": r.cut, "cut-range": list(r.cut_range),
                          "last-seq": r.last_seq, "checked": r.checked, "match": r.match,
                          "empty": r.empty, "undefined": r.undefined} for d, r in result.disks.items()},
            "violations": [{"kind": v.kind, "disk": v.disk, "lba": v.lba, "expected": v.expected,
                            "found": v.found} for v in result.violations]}, indent=1))
    else:
        print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

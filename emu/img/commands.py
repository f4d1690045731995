"""The emu-img subcommands (each registered with :func:`emu.img.main.command`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from emu.errors import EmuError
from emu.img.main import PROG, ImgError, UsageError, command, error_report
from emu.img.output import to_json_pretty
from emu.img.util import output_format, probe_format, qprint

# The other command modules register themselves on import.
from emu.img import cmd_copy, cmd_image  # noqa: E402,F401  (after the shared imports)

if TYPE_CHECKING:
    from emu.block.qcow2 import check as qcheck

# ---------------------------------------------------------------------------- check


def _check_dict(filename: str, fmt: str, r: qcheck.CheckResult) -> dict:
    """ImageCheck as QAPI builds it: optional members only when non-zero, QAPI member order."""
    d: dict = {"filename": filename, "format": fmt, "check-errors": r.check_errors}
    for key, val in (("image-end-offset", r.image_end_offset), ("corruptions", r.corruptions),
                     ("leaks", r.leaks), ("corruptions-fixed", r.corruptions_fixed),
                     ("leaks-fixed", r.leaks_fixed), ("total-clusters", r.total_clusters),
                     ("allocated-clusters", r.allocated_clusters),
                     ("fragmented-clusters", r.fragmented_clusters),
                     ("compressed-clusters", r.compressed_clusters)):
        if val:
            d[key] = val
    return d


def _dump_human_check(r: qcheck.CheckResult, quiet: bool) -> None:
    if not (r.corruptions or r.leaks or r.check_errors):
        qprint(quiet, "No errors were found on the image.\n")
    else:
        if r.corruptions:
            qprint(quiet, f"\n{r.corruptions} errors were found on the image.\n"
                          "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if r.leaks:
            qprint(quiet, f"\n{r.leaks} leaked clusters were found on the image.\n"
                          "This means waste of disk space, but no harm to data.\n")
        if r.check_errors:
            qprint(quiet, f"\n{r.check_errors} internal errors have occurred during the check.\n")
    if r.total_clusters and r.allocated_clusters:
        qprint(quiet, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
            r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
            r.fragmented_clusters * 100.0 / r.allocated_clusters,
            r.compressed_clusters * 100.0 / r.allocated_clusters))
    if r.image_end_offset:
        qprint(quiet, f"Image end offset: {r.image_end_offset}\n")


def _open_backing_chain(filename: str) -> None:
    """qemu-img check opens the image with its backing chain: a broken chain fails the same way.

    The image itself is judged leniently by the checker (as QEMU's check mode), so only the
    backing chain is opened through the block layer here.
    """
    from emu.block.node import BlockGraph, resolve_backing_path
    from emu.block.qcow2 import format as qfmt
    try:
        with open(filename, "rb") as f:
            h = qfmt.parse_header(f.read(1 << 16).ljust(4096, b"\0"))
    except (OSError, EmuError):
        return  # the checker reports the image's own problems
    if not h.backing_file:
        return
    g = BlockGraph()
    try:
        g.open_image(resolve_backing_path(filename, h.backing_file), h.backing_format, read_only=True,
                     force_share=True)
    except EmuError as err:
        raise ImgError(f"Could not open '{filename}': Could not open backing file: {err}") from None
    finally:
        g.close_all()


@command("check", "f:r:T:qU", ["format=", "repair=", "output=", "object=", "image-opts", "force-share"])
def cmd_check(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``check [-q] [-f fmt] [--output=ofmt] [-r leaks|all] [-U] filename``; exit 0/1/2/3/63."""
    # Imported here: the checker (dataclasses, inspect) would cost every other command's start-up.
    from emu.block.qcow2 import check as qcheck
    fmt = None
    fix = 0
    quiet = share = False
    out = "human"
    for o, v in opts:
        if o in ("-f", "--format"):
            fmt = v
        elif o in ("-r", "--repair"):
            if v == "leaks":
                fix = qcheck.FIX_LEAKS
            elif v == "all":
                fix = qcheck.FIX_LEAKS | qcheck.FIX_ERRORS
            else:
                raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {v}")
        elif o == "-q":
            quiet = True
        elif o == "--output":
            out = v
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    out = output_format(out)
    if share and fix:
        raise ImgError(f"Could not open '{args[0]}': force-share=on can only be used with read-only images")
    filename = args[0]
    fmt = probe_format(filename, fmt)
    if fmt != "qcow2":
        raise ImgError("This image format does not support checks", 63)
    _open_backing_chain(filename)
    try:
        res = qcheck.check_qcow2(filename, fix, force_share=share)
    except qcheck.CheckError as err:
        for line in err.reports:
            error_report(line.replace("qemu-img", PROG))
        raise ImgError(f"Check failed: {err}") from None
    except EmuError as err:
        raise ImgError(str(err)) from None
    if res.corruptions_fixed or res.leaks_fixed:
        if out == "human":
            qprint(quiet, "The following inconsistencies were found and repaired:\n\n"
                          f"    {res.leaks_fixed} leaked clusters\n"
                          f"    {res.corruptions_fixed} corruptions\n\n"
                          "Double checking the fixed image now...\n")
        fixed_leaks, fixed_corr = res.leaks_fixed, res.corruptions_fixed
        try:
            res = qcheck.check_qcow2(filename, 0, force_share=share)
        except qcheck.CheckError as err:
            raise ImgError(f"Check failed: {err}") from None
        res.leaks_fixed, res.corruptions_fixed = fixed_leaks, fixed_corr
    if out == "json":
        sys.stdout.write(to_json_pretty(_check_dict(filename, fmt, res)) + "\n")
    else:
        _dump_human_check(res, quiet)
    if res.check_errors:
        raise ImgError("Check failed")
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0

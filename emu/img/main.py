"""``emu-img``: qemu-img's command line on emu's block layer.

Each subcommand is a function registered with :func:`command`; it receives its
argument list and returns the exit code.  Errors leave as :class:`ImgError`
(printed ``emu-img: <message>``, exit 1) or :class:`UsageError` (the same plus
qemu-img's "Try ... --help" line).  Texts, JSON member order and exit codes are
qemu-img 7.2's; the program name is ours.
"""

from __future__ import annotations

import getopt
import sys
from typing import Callable

from emu.errors import EmuError

PROG = "emu-img"
VERSION = "7.2.0"

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str, list[str]]] = {}


class ImgError(Exception):
    """A fatal emu-img error: ``emu-img: <msg>`` on stderr, exit code ``code``."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code
        #: False for the few qemu-img messages whose hint has no final newline.
        self.newline = True


class UsageError(ImgError):
    """A command-line error; qemu-img adds a pointer to --help."""


def command(name: str, shortopts: str = "", longopts: list[str] | None = None):
    """Register a subcommand with its getopt option strings.

    :param name: the subcommand name, e.g. ``"check"``.
    :param shortopts: getopt short options (``"f:r:qU"``); ``h`` is added.
    :param longopts: getopt long options (``["output=", "force-share"]``).
    """
    def deco(fn: Callable[[list[tuple[str, str]], list[str]], int]):
        COMMANDS[name] = (fn, "h" + shortopts, ["help"] + list(longopts or []))
        return fn
    return deco


def error_report(msg: str, newline: bool = True) -> None:
    """Print one qemu-img style error line."""
    sys.stderr.write(f"{PROG}: {msg}" + ("\n" if newline else ""))
    sys.stderr.flush()


def parse_opts(args: list[str], shortopts: str, longopts: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU getopt (options may follow operands) with qemu-img's error texts."""
    try:
        return getopt.gnu_getopt(args, shortopts, longopts)
    except getopt.GetoptError as err:
        opt = err.opt
        bad = f"--{opt}" if len(opt) > 1 else f"-{opt}"
        if "requires argument" in err.msg:
            raise UsageError(f"missing argument for option '{bad}'") from None
        if "must not have an argument" in err.msg:
            raise UsageError(f"option '{bad}' doesn't allow an argument") from None
        if "not a unique prefix" in err.msg:
            raise UsageError(f"option '{bad}' is ambiguous") from None
        raise UsageError(f"unrecognized option '{bad}'") from None


#: ``Command syntax`` lines of --help: the options emu-img understands, in qemu-img's notation.
SYNTAX = {
    "bench": "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-n] [-o offset] "
             "[--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
    "check": "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename",
    "commit": "commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename",
    "compare": "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    "convert": "convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] "
               "[-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] "
               "filename [filename2 [...]] output_filename",
    "create": "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
    "info": "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
    "map": "map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
    "snapshot": "snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
    "rebase": "rebase [-U] [-q] [-f fmt] [-t cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
    "resize": "resize [-f fmt] [-q] [--shrink] filename [+ | -]size",
    "measure": "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] "
               "[-l snapshot_param] filename]",
}


def usage() -> str:
    """The --help text: qemu-img's layout, emu-img's commands and formats."""
    lines = [f"{PROG} version {VERSION} (emu)",
             f"usage: {PROG} [standard options] command [command options]",
             "QEMU disk image utility", "",
             "    '-h', '--help'       display this help and exit",
             "    '-V', '--version'    output version information and exit", "",
             "Command syntax:"]
    lines += [f"  {SYNTAX.get(n, n)}" for n in sorted(COMMANDS)]
    lines += ["", "Command parameters:",
              "  'filename' is a disk image filename",
              "  'fmt' is the disk image format (qcow2 or raw). It is guessed automatically in most cases",
              "  'size' is the disk image size in bytes. Optional suffixes 'k' or 'K' (kilobyte, 1024),",
              "    'M' (megabyte, 1024k), 'G' (gigabyte, 1024M), 'T' (terabyte, 1024G), 'P' (petabyte,",
              "    1024T) and 'E' (exabyte, 1024P) are supported. 'b' is ignored.",
              "  'options' is a comma separated list of format specific options in a name=value format.",
              "    Use -o help for an overview of the options supported by the used format",
              "  '-r' tries to repair any inconsistencies found during the check: '-r leaks' repairs only",
              "    cluster leaks, whereas '-r all' fixes all kinds of errors",
              "", "Supported formats: qcow2 raw"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) qemu-img's exit code."""
    # Importing the command modules registers them.
    from emu.img import commands  # noqa: F401
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(args)
    except UsageError as err:
        error_report(str(err))
        sys.stderr.write(f"Try '{PROG} --help' for more information\n")
        code = err.code
    except ImgError as err:
        error_report(str(err), err.newline)
        code = err.code
    except EmuError as err:
        error_report(str(err))
        code = 1
    except OSError as err:
        # Host errors outside the block layer (e.g. a full disk while creating).
        error_report(err.strerror or str(err))
        code = 1
    except KeyboardInterrupt:
        code = 1
    except BrokenPipeError:
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    if argv is None:
        sys.exit(code)
    return code


def _dispatch(args: list[str]) -> int:
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            sys.stdout.write(usage())
            return 0
        if opt in ("-V", "--version"):
            sys.stdout.write(f"{PROG} version {VERSION} (emu)\n")
            return 0
        if opt in ("-T", "--trace"):
            if not args:
                raise UsageError(f"missing argument for option '{opt}'")
            args.pop(0)
            continue
        raise UsageError(f"unrecognized option '{opt}'")
    if not args:
        raise UsageError("Not enough arguments")
    name = args.pop(0)
    if name not in COMMANDS:
        raise UsageError(f"Command not found: {name}")
    fn, shortopts, longopts = COMMANDS[name]
    pre = getattr(fn, "preparse", None)
    if pre is not None:
        args = pre(args)
    opts, operands = parse_opts(args, shortopts, longopts)
    if any(o in ("-h", "--help") for o, _ in opts):
        sys.stdout.write(usage())
        return 0
    return fn(opts, operands)


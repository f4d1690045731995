"""HMP ``qemu-io``: QEMU 7.2's qemu-io command interpreter on a device or node.

Where the text goes is QEMU 7.2's (checked on qemu-system-x86_64 7.2, QMP
``human-monitor-command`` and the readline monitor alike): qemu-io prints its reports
(``wrote 512/512 bytes at offset 0`` and the statistics line, ``read failed: …``,
``Pattern verification failed …``, dumps, help) on the *emulator's* stdout, and its
usage errors (``bad argument count …``, ``command "x" not found``, bad options) on
stderr; only what QEMU reports through error_report -- a write command on a read-only
node (``Block node is read-only``), ``truncate`` failures -- is the monitor's reply.
:func:`run` returns that reply text and writes the rest to :attr:`Io.out`/:attr:`Io.err`.

Accounting is QEMU's: the synchronous commands are not counted in query-blockstats;
``aio_read``/``aio_write`` (not ``-z``) and ``aio_flush`` are, ``-i`` counts an invalid
request without I/O, and a request past the end counts as failed.  The aio commands
complete before the command returns (QEMU prints their report from the main loop a
moment later; the text is the same).

Commands: read, readv, write, writev, aio_read, aio_write, aio_flush, flush, discard,
length, truncate, info, alloc, map, sleep, help, and blkdebug's break, remove_break,
resume, wait_break.  QEMU's abort and sigraise (they kill the emulator) and reopen are
listed by ``help`` but answered ``emu does not support …``; so are ``read -b``/``write -b``
(emu keeps no VM state).  ``write -c`` checks what QEMU's qcow2 checks, then writes the
data uncompressed.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["Io", "run", "cvtnum", "cvtstr", "print_report_text"]

#: BDRV_REQUEST_MAX_BYTES: the longest request qemu-io accepts
REQUEST_MAX_BYTES = 2147483136
#: BDRV_MAX_LENGTH: the largest image size (INT64_MAX rounded down to 1 GiB)
MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)

# name: (args, oneline, argmin, argmax, needs write permission)
_CMDS: dict[str, tuple[str | None, str, int, int, bool]] = {
    "abort": (None, "simulate a program crash using abort(3)", 0, 0, False),
    "aio_flush": (None, "completes all outstanding aio requests", 0, 0, False),
    "aio_read": ("[-Ciqv] [-P pattern] off len [len..]",
                 "asynchronously reads a number of bytes", 2, -1, False),
    "aio_write": ("[-Cfiquz] [-P pattern] off len [len..]",
                  "asynchronously writes a number of bytes", 2, -1, True),
    "alloc": ("offset [count]", "checks if offset is allocated in the file", 1, 2, False),
    "break": ("event tag", "sets a breakpoint on event and tags the stopped request as tag",
              2, 2, False),
    "discard": ("[-Cq] off len", "discards a number of bytes at a specified offset", 2, -1,
                True),
    "flush": (None, "flush all in-core file state to disk", 0, 0, False),
    "help": ("[command]", "help for one or all commands", 0, 1, False),
    "info": (None, "prints information about the current file", 0, 0, False),
    "length": (None, "gets the length of the current file", 0, 0, False),
    "map": ("", "prints the allocated areas of a file", 0, 0, False),
    "read": ("[-abCqv] [-P pattern [-s off] [-l len]] off len",
             "reads a number of bytes at a specified offset", 2, -1, False),
    "readv": ("[-Cqv] [-P pattern] off len [len..]",
              "reads a number of bytes at a specified offset", 2, -1, False),
    "remove_break": ("tag", "remove a breakpoint by tag", 1, 1, False),
    "reopen": ("[(-r|-w)] [-c cache] [-o options]", "reopens an image with new options", 0,
               -1, False),
    "resume": ("tag", "resumes the request tagged as tag", 1, 1, False),
    "sigraise": ("signal", "raises a signal", 1, 1, False),
    "sleep": (None, "waits for the given value in milliseconds", 1, 1, False),
    "truncate": ("[-m prealloc_mode] off", "truncates the current file at the given offset",
                 1, 3, True),
    "wait_break": ("tag", "waits for the suspension of a request", 1, 1, False),
    "write": ("[-bcCfnquz] [-P pattern | -s source_file] off len",
              "writes a number of bytes at a specified offset", 2, -1, True),
    "writev": ("[-Cfq] [-P pattern] off len [len..]",
               "writes a number of bytes at a specified offset", 2, -1, True),
}

_HELP: dict[str, str] = {
    "read": """
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

""",
    "readv": """
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

""",
    "write": """
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -s, -- use a pattern file to fill the write buffer
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_co_pwrite_zeroes

""",
    "writev": """
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -q, -- quiet mode, do not show I/O statistics

""",
    "aio_read": """
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -i, -- treat request as invalid, for exercising stats
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

""",
    "aio_write": """
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

""",
    "discard": """
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

""",
}

_OPTSTR = {"read": "bCl:pqP:s:v", "readv": "CP:qv", "write": "bcCfnpP:qs:uz",
           "writev": "CfqP:", "aio_read": "CiP:qv", "aio_write": "CfiP:quz",
           "discard": "Cq", "truncate": "m:"}


class _Usage(Exception):
    """The command printed its usage or an error already: stop it."""


def cvtnum(text: str) -> int:
    """QEMU's qemu_strtosz with byte default suffix: ``512``, ``1k``, ``1.5M``, ``0x200``.

    :returns: the value, or ``-EINVAL`` / ``-ERANGE`` as QEMU's cvtnum does.
    """
    m = re.fullmatch(r"\s*(0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]*)([bBkKmMgGtTpPeE]?)", text)
    if not m or not m.group(1) or m.group(1) == ".":
        return -errno_mod.EINVAL
    num, suffix = m.group(1), m.group(2).lower()
    mult = 1 << (10 * "bkmgtpe".index(suffix)) if suffix else 1
    if num[:2].lower() == "0x":
        val = int(num, 16) * mult
    elif "." in num:
        if mult == 1:                       # fractional bytes are refused
            return -errno_mod.EINVAL
        val = int(float(num) * mult)
    else:
        val = int(num) * mult
    if val >= 1 << 63:
        return -errno_mod.ERANGE
    return val


def cvtstr(value: float) -> str:
    """QEMU qemu-io's cvtstr: ``512 bytes``, ``4 KiB``, ``1.500 KiB``, ``33.154 MiB``."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"),
                          (20, " MiB"), (10, " KiB")):
        if value >= (1 << shift):
            s = "%.3f" % (value / (1 << shift))
            break
    else:
        s, suffix = "%f" % value, " bytes"
    i = s.find(".000")
    return (s[:i] if i >= 0 else s) + suffix


def _timestr(secs: float, verbose: bool) -> str:
    whole = int(secs)
    frac = secs - whole
    if verbose or whole:
        return "%u:%02u:%05.2f" % (whole // 3600, whole % 3600 // 60, whole % 60 + frac)
    return "%05.2f sec" % frac


def _tdiv(value: float, secs: float) -> float:
    return value / secs if secs > 0 else float("inf")


def print_report_text(op: str, secs: float, offset: int, count: int, total: int, cnt: int,
                      cflag: bool) -> str:
    """QEMU qemu-io's print_report (``-C``: ``bytes,ops,time,bytes/sec,ops/sec``)."""
    ts = _timestr(secs, cflag)
    if cflag:
        return "%d,%d,%s,%.3f,%.3f\n" % (total, cnt, ts, _tdiv(total, secs), _tdiv(cnt, secs))
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{cvtstr(total)}, {cnt} ops; {ts} ({cvtstr(_tdiv(total, secs))}/sec and "
            + "%.4f ops/sec)\n" % _tdiv(cnt, secs))


def _dump(buf: bytes, offset: int) -> str:
    out = []
    for i in range(0, len(buf), 16):
        row = buf[i:i + 16]
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in row)
        out.append("%08x:  %s %s\n" % (offset + i, "".join("%02x " % b for b in row), text))
    return "".join(out)


def _strerror(err: BaseException) -> str:
    from emu.block.api import BlockRangeError

    if isinstance(err, BlockRangeError):
        return os.strerror(errno_mod.EIO)           # QEMU's blk_check_byte_request
    code = getattr(err, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return os.strerror(errno_mod.EIO)


class Io:
    """One qemu-io command line on ``target`` (a BlockBackend, or a node for a node-name).

    :param node: the node under the target (for blkdebug and block status).
    :param resize: ``fn(size)`` that resizes the target as block_resize does (``truncate``).
    :param out: / :param err: QEMU's stdout and stderr (the emulator's by default).
    """

    def __init__(self, target: Any, node: Any, *, resize: Callable[[int], None] | None = None,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.target = target
        self.node = node
        self.resize = resize
        self.out = out
        self.err = err
        #: (stream name, text) in the order QEMU writes them
        self._text: list[tuple[str, str]] = []
        self._reply: list[str] = []
        self.acct = getattr(target, "acct", None)
        # a BlockBackend takes account=; a node (qemu-io on a node-name) keeps no statistics
        self.kw: dict[str, Any] = {"account": False} if self.acct is not None else {}

    # ----------------------------------------------------------- output
    def say(self, text: str) -> None:
        """qemu-io's printf: the emulator's stdout."""
        self._text.append(("stdout", text))

    def warn(self, text: str) -> None:
        """qemu-io's fprintf(stderr) (usage errors)."""
        self._text.append(("stderr", text))

    def _flush_streams(self) -> None:
        for name, text in self._text:
            s = getattr(self, name[3:]) or getattr(sys, name)
            try:
                s.write(text)
                s.flush()
            except (OSError, ValueError):   # a closed or dead stdout loses the text, as QEMU's
                pass
        self._text.clear()

    # ----------------------------------------------------------- the command line
    def run(self, line: str) -> str:
        """Run one qemu-io command line; returns the monitor reply text."""
        try:
            self._run(line)
        finally:
            self._flush_streams()
        return "".join(self._reply)

    def _run(self, line: str) -> None:
        argv = [w for w in line.split(" ") if w]      # qemu-io's breakline: spaces only
        if not argv:
            return
        name = argv[0]
        spec = _CMDS.get(name)
        if spec is None:
            self.warn(f'command "{name}" not found\n')
            return
        _args, _one, amin, amax, needs_write = spec
        n = len(argv) - 1
        if n < amin or (amax != -1 and n > amax):
            if amax == -1:
                self.warn(f"bad argument count {n} to {name}, expected at least {amin} "
                          "arguments\n")
            elif amin == amax:
                self.warn(f"bad argument count {n} to {name}, expected {amin} arguments\n")
            else:
                self.warn(f"bad argument count {n} to {name}, expected between {amin} and "
                          f"{amax} arguments\n")
            return
        if needs_write and self._read_only():
            self._reply.append("Block node is read-only\n")
            return
        fn = getattr(self, "_cmd_" + name, None)
        if fn is None:
            self.say(f"emu does not support the qemu-io command '{name}'\n")
            return
        try:
            fn(name, argv[1:])
        except _Usage:
            pass

    def _read_only(self) -> bool:
        ro = getattr(self.target, "read_only", False)
        return bool(ro() if callable(ro) else ro)

    # ----------------------------------------------------------- helpers
    def usage(self, name: str) -> None:
        args, one, *_ = _CMDS[name]
        self.say(f"{name} {args} -- {one}\n")

    def getopt(self, name: str, args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """GNU getopt with permutation over ``args`` (``--`` ends options)."""
        spec = _OPTSTR.get(name, "")
        opts: list[tuple[str, str]] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                rest.extend(args[i + 1:])
                break
            if len(a) < 2 or not a.startswith("-"):
                rest.append(a)
                i += 1
                continue
            j = 1
            while j < len(a):
                c = a[j]
                k = spec.find(c)
                if c == ":" or k < 0:
                    self.warn(f"{name}: invalid option -- '{c}'\n")
                    self.usage(name)
                    raise _Usage
                if k + 1 < len(spec) and spec[k + 1] == ":":
                    if j + 1 < len(a):
                        opts.append((c, a[j + 1:]))
                    elif i + 1 < len(args):
                        i += 1
                        opts.append((c, args[i]))
                    else:
                        self.warn(f"{name}: option requires an argument -- '{c}'\n")
                        self.usage(name)
                        raise _Usage
                    break
                opts.append((c, ""))
                j += 1
            i += 1
        return opts, rest

    def num(self, text: str) -> int:
        v = cvtnum(text)
        if v < 0:
            if v == -errno_mod.ERANGE:
                self.say(f"Parsing error: argument too large -- {text}\n")
            else:
                self.say("Parsing error: non-numeric argument, or extraneous/unrecognized "
                         f"suffix -- {text}\n")
            raise _Usage
        return v

    def pattern(self, text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            v = -1
        if not 0 <= v <= 255:
            self.say(f"{text} is not a valid pattern byte\n")
            raise _Usage
        return v

    def lengths(self, texts: list[str]) -> int:
        """create_iovec: the sum of the vector's lengths."""
        total = 0
        for t in texts:
            v = cvtnum(t)
            if v < 0:
                self.say(f"non-numeric length argument -- {t}\n")
                raise _Usage
            if v > 0x7FFFFFFF:
                self.say(f"too large length argument -- {t}\n")
                raise _Usage
            total += v
        if total > REQUEST_MAX_BYTES:
            self.say(f"Total size of request too large ({total})\n")
            raise _Usage
        return total

    def _check_range(self, offset: int, length: int) -> None:
        # qemu-io on a node goes through a temporary BlockBackend: out of range is EIO
        if self.acct is None and offset + length > self.target.size:
            raise OSError(errno_mod.EIO, os.strerror(errno_mod.EIO))

    def _io(self, kind: str, length: int, aio: bool, fn: Callable[[], Any]) -> Any:
        cookie = None
        if aio and self.acct is not None:
            cookie = self.acct.start(kind, length)
        try:
            r = fn()
        except Exception:
            if cookie is not None:
                self.acct.failed(cookie)
            raise
        if cookie is not None:
            self.acct.done(cookie)
        return r

    def _read(self, offset: int, length: int, aio: bool = False) -> bytes:
        def go() -> bytes:
            self._check_range(offset, length)
            return self.target.read(offset, length, **self.kw) if length else b""
        return self._io("rd", length, aio, go)

    def _write(self, offset: int, data: bytes, aio: bool = False) -> None:
        def go() -> None:
            self._check_range(offset, len(data))
            if data:
                self.target.write(offset, data, **self.kw)
        self._io("wr", len(data), aio, go)

    def _zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if length:
            self.target.write_zeroes(offset, length, **self.kw)

    # ----------------------------------------------------------- read / write
    def _cmd_read(self, name: str, args: list[str]) -> None:
        opts, rest = self.getopt(name, args)
        cflag = qflag = vflag = bflag = False
        pat: int | None = None
        p_off, p_len = 0, None
        sflag = lflag = False
        for c, v in opts:
            if c == "b":
                bflag = True
            elif c == "C":
                cflag = True
            elif c == "l":
                lflag, p_len = True, self.num(v)
            elif c == "P":
                pat = self.pattern(v)
            elif c == "q":
                qflag = True
            elif c == "s":
                sflag, p_off = True, self.num(v)
            elif c == "v":
                vflag = True
        if len(rest) != 2:
            self.usage(name)
            return
        offset = self.num(rest[0])
        count = self.num(rest[1])
        if count > REQUEST_MAX_BYTES:
            self.say(f"length cannot exceed {REQUEST_MAX_BYTES}, given {rest[1]}\n")
            return
        if pat is None and (lflag or sflag):
            self.usage(name)
            return
        if p_len is None:
            p_len = count - p_off
        if p_len < 0 or p_len + p_off > count:
            self.say("pattern verification range exceeds end of read data\n")
            return
        if bflag:
            self.say("emu does not support the VM state (read -b)\n")
            return
        t0 = time.monotonic()
        try:
            data = self._read(offset, count)
        except Exception as e:  # noqa: BLE001 - reported as qemu-io does
            self.say(f"read failed: {_strerror(e)}\n")
            return
        secs = time.monotonic() - t0
        if pat is not None and data[p_off:p_off + p_len] != bytes([pat]) * p_len:
            self.say(f"Pattern verification failed at offset {offset + p_off}, {p_len} bytes\n")
        if qflag:
            return
        if vflag:
            self.say(_dump(data, offset))
        self.say(print_report_text("read", secs, offset, count, count, 1, cflag))

    def _cmd_readv(self, name: str, args: list[str], aio: bool = False) -> None:
        opts, rest = self.getopt(name, args)
        cflag = qflag = vflag = invalid = False
        pat: int | None = None
        for c, v in opts:
            if c == "C":
                cflag = True
            elif c == "P":
                pat = self.pattern(v)
            elif c == "q":
                qflag = True
            elif c == "v":
                vflag = True
            elif c == "i":
                invalid = True
        if len(rest) < 2:
            self.usage(name)
            return
        if aio and invalid:
            if self.acct is not None:
                self.acct.invalid("rd")
            return
        offset = self.num(rest[0])
        count = self.lengths(rest[1:])
        t0 = time.monotonic()
        try:
            data = self._read(offset, count, aio)
        except Exception as e:  # noqa: BLE001
            self.say(f"readv failed: {_strerror(e)}\n")
            return
        secs = time.monotonic() - t0
        if pat is not None and data != bytes([pat]) * count:
            self.say(f"Pattern verification failed at offset {offset}, {count} bytes\n")
        if qflag:
            return
        if vflag:
            self.say(_dump(data, offset))
        self.say(print_report_text("read", secs, offset, count, count, 1, cflag))

    def _cmd_aio_read(self, name: str, args: list[str]) -> None:
        self._cmd_readv(name, args, aio=True)

    def _cmd_write(self, name: str, args: list[str]) -> None:
        opts, rest = self.getopt(name, args)
        cflag = qflag = bflag = cmpflag = zflag = fua = unmap = nofallback = False
        pat: int | None = None
        sfile: str | None = None
        for c, v in opts:
            if c == "b":
                bflag = True
            elif c == "c":
                cmpflag = True
            elif c == "C":
                cflag = True
            elif c == "f":
                fua = True
            elif c == "n":
                nofallback = True
            elif c == "P":
                pat = self.pattern(v)
            elif c == "q":
                qflag = True
            elif c == "s":
                sfile = v
            elif c == "u":
                unmap = True
            elif c == "z":
                zflag = True
        if len(rest) != 2:
            self.usage(name)
            return
        if zflag + (pat is not None) + (sfile is not None) > 1:
            self.say("Only one of -z, -P, and -s can be specified at the same time\n")
            return
        if unmap and not zflag:
            self.say("-u requires -z to be specified\n")
            return
        if nofallback and not zflag:
            self.say("-n requires -z to be specified\n")
            return
        if fua and (bflag or cmpflag):
            self.say("-f and -b or -c are mutually exclusive\n")
            return
        offset = self.num(rest[0])
        count = self.num(rest[1])
        if count > REQUEST_MAX_BYTES and not nofallback:
            self.say(f"length cannot exceed {REQUEST_MAX_BYTES} without -n, given {rest[1]}\n")
            return
        if bflag or cmpflag:
            if offset % 512:
                self.say(f"{offset} is not a sector-aligned value for 'offset'\n")
                return
            if count % 512:
                self.say(f"{count} is not a sector-aligned value for 'count'\n")
                return
        if bflag:
            self.say("emu does not support the VM state (write -b)\n")
            return
        if sfile is not None:
            try:
                with open(sfile, "rb") as fh:
                    src = fh.read(count)
            except OSError as e:
                self.say(f"Failed to open pattern file '{sfile}': {os.strerror(e.errno or 5)}\n")
                return
            if len(src) < count:
                src = (src * (count // max(1, len(src)) + 1))[:count] if src else bytes(count)
            data = src
        else:
            data = bytes([0xCD if pat is None else pat]) * (0 if zflag else count)
        t0 = time.monotonic()
        try:
            if cmpflag:
                self._check_compressed(offset, count)
            if zflag:
                self._zero(offset, count)
            else:
                self._write(offset, data)
                if fua:
                    self.target.flush(**self.kw)
        except Exception as e:  # noqa: BLE001
            self.say(f"write failed: {_strerror(e)}\n")
            return
        secs = time.monotonic() - t0
        if not qflag:
            self.say(print_report_text("wrote", secs, offset, count, count, 1, cflag))

    def _cmd_writev(self, name: str, args: list[str], aio: bool = False) -> None:
        opts, rest = self.getopt(name, args)
        cflag = qflag = zflag = unmap = fua = invalid = False
        pat = 0xCD
        for c, v in opts:
            if c == "C":
                cflag = True
            elif c == "P":
                pat = self.pattern(v)
            elif c == "q":
                qflag = True
            elif c == "f":
                fua = True
            elif c == "i":
                invalid = True
            elif c == "u":
                unmap = True
            elif c == "z":
                zflag = True
        if len(rest) < 2:
            self.usage(name)
            return
        if aio:
            if invalid:
                if self.acct is not None:
                    self.acct.invalid("wr")
                return
            if zflag and any(c == "P" for c, _ in opts):
                self.say("-z and -P cannot be specified at the same time\n")
                return
            if unmap and not zflag:
                self.say("-u requires -z to be specified\n")
                return
            if zflag and len(rest) != 2:
                self.say("-z supports only a single length parameter\n")
                return
        offset = self.num(rest[0])
        if zflag:
            count = self.num(rest[1])
        else:
            count = self.lengths(rest[1:])
        t0 = time.monotonic()
        try:
            if zflag:
                self._zero(offset, count)       # QEMU 7.2 does not account -z
            else:
                self._write(offset, bytes([pat]) * count, aio)
                if fua:
                    self.target.flush(**self.kw)
        except Exception as e:  # noqa: BLE001
            self.say(f"{'aio_write' if aio else 'writev'} failed: {_strerror(e)}\n")
            return
        secs = time.monotonic() - t0
        if not qflag:
            self.say(print_report_text("wrote", secs, offset, count, count, 1, cflag))

    def _cmd_aio_write(self, name: str, args: list[str]) -> None:
        self._cmd_writev(name, args, aio=True)

    def _check_compressed(self, offset: int, count: int) -> None:
        """write -c: only qcow2 takes compressed writes, and only into clusters not yet
        allocated (QEMU: EIO otherwise).  emu then writes the data uncompressed."""
        node = self.node
        if getattr(node, "drv", None) != "qcow2":
            raise OSError(errno_mod.ENOTSUP, os.strerror(errno_mod.ENOTSUP))
        self._check_range(offset, count)
        if count and self._allocated(offset, count)[0] < count or not count:
            return
        raise OSError(errno_mod.EIO, os.strerror(errno_mod.EIO))

    def _is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated on the node: (allocated in this layer, bytes alike)."""
        from emu.block.overlay import UNALLOCATED_KINDS

        kind, n, _ = self.node.block_status(offset, length)
        return kind not in UNALLOCATED_KINDS, max(0, min(n, length))

    def _allocated(self, offset: int, length: int) -> tuple[int, int]:
        """(bytes allocated, bytes looked at) in ``[offset, offset+length)``."""
        done = alloc = 0
        while done < length:
            a, n = self._is_allocated(offset + done, length - done)
            if n == 0:
                break
            if a:
                alloc += n
            done += n
        return alloc, done

    # ----------------------------------------------------------- the rest
    def _cmd_alloc(self, name: str, args: list[str]) -> None:
        offset = self.num(args[0])
        if offset % 512:
            self.say(f"{offset} is not a sector-aligned value for 'offset'\n")
            return
        count = self.num(args[1]) if len(args) > 1 else 512
        if count % 512:
            self.say(f"{count} is not a sector-aligned value for 'count'\n")
            return
        end = min(offset + count, self.node.size)
        alloc, seen = self._allocated(offset, max(0, end - offset))
        self.say(f"{alloc}/{seen} bytes allocated at offset {cvtstr(offset)}\n")

    def _cmd_map(self, name: str, args: list[str]) -> None:
        total = self.node.size
        offset = 0
        while offset < total:
            a, n = self._is_allocated(offset, total - offset)
            if n == 0:
                break
            while offset + n < total:          # map_is_allocated: merge alike extents
                a2, n2 = self._is_allocated(offset + n, total - offset - n)
                if a2 != a or n2 == 0:
                    break
                n += n2
            self.say("%s (0x%x) bytes %s at offset %s (0x%x)\n" % (
                cvtstr(n), n, "    allocated" if a else "not allocated", cvtstr(offset), offset))
            offset += n

    def _cmd_info(self, name: str, args: list[str]) -> None:
        node = self.node
        self.say(f"format name: {node.drv}\n")
        cs = getattr(node.impl, "cluster_size", None)
        if node.drv != "qcow2" or not cs:
            return                              # bdrv_get_info: not supported
        l2_cover = cs * (cs // 8)
        vm_state = -(-node.size // l2_cover) * l2_cover
        self.say(f"cluster size: {cvtstr(cs)}\nvm state offset: {cvtstr(vm_state)}\n")
        fs = node.image_info().get("format-specific")
        if fs is not None:
            from emu.qmp.hmp import _dump_specific

            self.say("Format specific information:\n")
            # bdrv_image_info_specific_dump prints with qemu_printf: the monitor's reply
            self._reply.append(_dump_specific(fs.get("data", {}), 4))

    def _cmd_discard(self, name: str, args: list[str]) -> None:
        opts, rest = self.getopt(name, args)
        cflag = any(c == "C" for c, _ in opts)
        qflag = any(c == "q" for c, _ in opts)
        if len(rest) != 2:
            self.usage(name)
            return
        offset = self.num(rest[0])
        count = self.num(rest[1])
        if count > REQUEST_MAX_BYTES:
            self.say(f"length cannot exceed {REQUEST_MAX_BYTES}, given {rest[1]}\n")
            return
        t0 = time.monotonic()
        try:
            self._check_range(offset, count)
            if count:
                self.target.discard(offset, count, **self.kw)
        except Exception as e:  # noqa: BLE001
            self.say(f"discard failed: {_strerror(e)}\n")
            return
        secs = time.monotonic() - t0
        if not qflag:
            self.say(print_report_text("discard", secs, offset, count, count, 1, cflag))

    def _cmd_flush(self, name: str, args: list[str]) -> None:
        try:
            self.target.flush(**self.kw)
        except Exception:  # noqa: BLE001 - QEMU's flush command prints nothing
            pass

    def _cmd_aio_flush(self, name: str, args: list[str]) -> None:
        cookie = self.acct.start("flush") if self.acct is not None else None
        try:
            self.target.flush(**self.kw)
        except Exception:  # noqa: BLE001
            if cookie is not None:
                self.acct.failed(cookie)
            return
        if cookie is not None:
            self.acct.done(cookie)

    def _cmd_length(self, name: str, args: list[str]) -> None:
        self.say(cvtstr(self.target.size) + "\n")

    def _cmd_truncate(self, name: str, args: list[str]) -> None:
        opts, rest = self.getopt(name, args)
        for c, v in opts:
            if c == "m" and v not in ("off", "metadata", "falloc", "full"):
                self._reply.append(f"Invalid preallocation mode '{v}'\n")
                return
            if c == "m" and v != "off":
                self._reply.append(f"Unsupported preallocation mode '{v}'\n")
                return
        if len(rest) != 1:
            self.usage(name)
            return
        size = self.num(rest[0])
        if self.resize is None:
            self._reply.append("emu cannot resize this node\n")
            return
        try:
            self.resize(size)
        except Exception as e:  # noqa: BLE001 - error_report: the monitor's reply
            from emu.qmp.errors import desc_of

            self._reply.append(desc_of(e) + "\n")

    def _cmd_sleep(self, name: str, args: list[str]) -> None:
        try:
            ms = int(args[0], 0)        # QEMU: strtol(…, 0), milliseconds
        except ValueError:
            ms = -1
        if ms < 0:
            self.say(f"{args[0]} is not a valid number\n")
            return
        time.sleep(ms / 1000.0)

    def _cmd_help(self, name: str, args: list[str]) -> None:
        if not args:
            for n in sorted(_CMDS):
                a, one, *_ = _CMDS[n]
                self.say(f"{n} {a} -- {one}\n" if a is not None else f"{n} -- {one}\n")
            self.say("\nUse 'help commandname' for extended help.\n")
            return
        spec = _CMDS.get(args[0])
        if spec is None:
            self.say(f"command {args[0]} not found\n")
            return
        a, one, *_ = spec
        self.say(f"{args[0]} {a} -- {one}\n" if a is not None else f"{args[0]} -- {one}\n")
        self.say(_HELP.get(args[0], ""))

    # blkdebug's breakpoints (QEMU's bdrv_debug_* on the node's blkdebug layer)
    def _blkdebug(self) -> Any:
        node = self.node
        while node is not None:
            if getattr(node, "drv", None) == "blkdebug":
                return node.impl
            node = getattr(node, "file", None)
        return None

    def _debug(self, verb: str, args: list[str]) -> None:
        blk = self._blkdebug()
        if blk is None:
            self.say({"break": "Could not set breakpoint: Operation not supported\n",
                      "remove_break": f"Could not remove breakpoint {args[0]}: "
                                      "Operation not supported\n",
                      "resume": f"Could not resume request: Operation not supported\n",
                      "wait_break": ""}[verb])
            return
        try:
            if verb == "break":
                blk.break_on(args[0], args[1])
            elif verb == "remove_break":
                blk.remove_break(args[0])
            elif verb == "resume":
                blk.resume(args[0])
            else:
                blk.wait_break(args[0])
        except Exception as e:  # noqa: BLE001
            self.say(f"{verb} failed: {e}\n")

    def _cmd_break(self, name: str, args: list[str]) -> None:
        self._debug("break", args)

    def _cmd_remove_break(self, name: str, args: list[str]) -> None:
        self._debug("remove_break", args)

    def _cmd_resume(self, name: str, args: list[str]) -> None:
        self._debug("resume", args)

    def _cmd_wait_break(self, name: str, args: list[str]) -> None:
        self._debug("wait_break", args)


def run(target: Any, node: Any, line: str, **kw: Any) -> str:
    """Run one qemu-io command line (see :class:`Io`); returns the monitor reply text."""
    return Io(target, node, **kw).run(line)

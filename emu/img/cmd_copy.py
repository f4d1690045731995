"""emu-img subcommands that move data between images: convert, compare, bench."""

from __future__ import annotations

import os
import re
import sys
import threading
import time

from emu.errors import EmuError
from emu.img.cmd_image import Progress, block_status_above, create_image, parse_o, vsize
from emu.img.imgopen import session
from emu.img.main import ImgError, UsageError, command
from emu.img.util import parse_size, qprint

#: Bytes per request: qemu-img's IO_BUF_SIZE is 2 MiB, for compare and convert alike (convert reads
#: each chunk into one reused buffer; bigger chunks measured no faster and fall out of the CPU cache
#: between the read and the write).
IO_BUF_SIZE = 2 << 20
COPY_BUF_SIZE = 2 << 20
SECTOR = 512


def _first_diff_sector(a: bytes, b: bytes) -> int:
    """Offset of the first 512-byte sector that differs (``len`` if none)."""
    if a == b:
        return len(a)
    lo, hi = 0, len(a)
    # Binary search on equal prefixes keeps this in C for large buffers.
    while hi - lo > SECTOR:
        mid = lo + ((hi - lo) // 2 // SECTOR) * SECTOR or lo + SECTOR
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _first_nonzero_sector(buf: bytes) -> int:
    """Offset of the first 512-byte sector holding a non-zero byte, or -1."""
    stripped = buf.lstrip(b"\0")
    if not stripped:
        return -1
    return ((len(buf) - len(stripped)) // SECTOR) * SECTOR


# ---------------------------------------------------------------------------- convert

@command("convert", "f:O:B:Cco:l:S:pt:T:qnm:WUr:F:",
         ["object=", "image-opts", "target-image-opts", "salvage", "target-is-zero", "bitmaps",
          "force-share", "skip-broken-bitmaps"])
def cmd_convert(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt]
    [-o options] [-S sparse_size] filename [filename2 [...]] output_filename``."""
    fmt = None
    out_fmt = "raw"
    olist: list[str] = []
    compress = progress = quiet = no_create = share = False
    cache = "unsafe"
    src_cache = None
    sparse = 4096
    out_base = out_basefmt = None
    offload = sparse_given = False
    sn_opts: dict | None = None
    snapshot_name = None
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "-O":
            out_fmt = v
        elif o == "-o":
            olist.append(v)
        elif o == "-c":
            compress = True
        elif o == "-C":
            offload = True
        elif o == "-p":
            progress = True
        elif o == "-q":
            quiet = True
        elif o == "-n":
            no_create = True
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "-t":
            cache = v
        elif o == "-T":
            src_cache = v
        elif o == "-S":
            sparse_given = True
            try:
                sparse = parse_size(v)
            except ValueError:
                from emu.img.main import PROG
                raise ImgError("Invalid buffer size for sparse output specified. You may use k, M, G, T, "
                               f"P or E suffixes for\n{PROG}: kilobytes, megabytes, gigabytes, terabytes, "
                               "petabytes and exabytes.") from None
            if sparse % SECTOR or sparse > 16 << 20:
                raise ImgError("Invalid buffer size for sparse output specified. Valid sizes are multiples "
                               "of 512 up to 16777216. Select 0 to disable sparse detection (fully "
                               "allocates output).")
        elif o == "-l":
            if v.startswith("snapshot."):
                sn_opts = _snapshot_opts(v)
            else:
                snapshot_name = v
        elif o == "-B":
            out_base = v
        elif o == "-F":
            out_basefmt = v
    if offload and compress:
        raise ImgError("Cannot enable copy offloading when -c is used")
    if offload and sparse_given:
        raise ImgError("Cannot enable copy offloading when -S is used")
    if len(args) < 2:
        raise ImgError("Must specify image file name")
    if out_fmt not in ("qcow2", "raw"):
        raise ImgError(f"Unknown file format '{out_fmt}'")
    if compress and out_fmt != "qcow2":
        raise ImgError("Compression not supported for this file format")
    *srcs, target = args
    with session() as s:
        nodes = [s.open(f, fmt, read_only=True, force_share=share, cache=src_cache) for f in srcs]
        total = sum(vsize(n) for n in nodes)
        if sn_opts is not None or snapshot_name is not None:
            if sn_opts is None and len(nodes) > 1:
                raise ImgError("No support for concatenating multiple snapshot")
            _load_snapshot(nodes[0], sn_opts, snapshot_name)
        if out_base is not None:
            # qemu-img: the target gets this backing file, and only what the sources' top
            # layers allocate is copied (the rest is left to the backing file).
            if out_fmt == "raw":
                raise ImgError("Backing file not supported for file format 'raw'")
            if out_basefmt is None:
                raise ImgError("Use of backing file requires explicit backing format")
        if not no_create:
            try:
                o = parse_o(out_fmt, olist, target)
            except ImgError as err:
                raise ImgError(str(err).removeprefix(f"{target}: ")) from None
            if out_base is not None:
                o["backing_file"], o["backing_fmt"] = out_base, out_basefmt
            try:
                create_image(target, out_fmt, total, o, quiet=True)
            except ImgError as err:
                msg = str(err).removeprefix(f"{target}: ")
                raise ImgError(f"{target}: error while converting {out_fmt}: {msg}") from None
        try:
            dst = s.open(target, out_fmt, read_only=False, cache=cache)
        except ImgError as err:
            if out_base is None or "Could not open backing file" not in str(err):
                raise
            raise ImgError(str(err).split(": Could not open backing file:")[0]
                           + ": Could not open backing file: " + str(err).split("backing file: ", 1)[1]) from None
        if no_create and dst.size < total:
            raise ImgError("Error while writing to target image")  # qemu: size check before copy
        fresh = not no_create
        if compress and not hasattr(dst.impl, "write_compressed"):
            raise ImgError("Compression not supported for this file format")
        gran = getattr(dst.impl, "cluster_size", 0) or 65536
        if compress:
            gran = dst.impl.cluster_size
        prog = Progress(progress and not quiet, 1.0)
        base = 0
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            prog.update(done[0] * 100.0 / total if total else 100.0)

        try:
            for src in nodes:
                if offload and out_base is None and _offload_pair(src, dst):
                    _convert_offload(src, dst, base, fresh, tick)
                    base += vsize(src)
                    continue
                _convert_one(src, dst, base, fresh, sparse, compress, gran, tick,
                             top_only=out_base is not None,
                             backing_end=dst.backing.size if dst.backing is not None else -1)
                base += vsize(src)
            dst.flush()
        except EmuError as err:
            raise ImgError(f"error while writing at byte {base}: {err}") from None
        prog.force(100.0)
        prog.end()
    return 0


def _offload_pair(src, dst) -> bool:
    """-C between two whole raw images on plain files: os.copy_file_range does the copy in
    the kernel (a reflink on filesystems that share extents), as qemu-img's copy_range."""
    def plain(bs) -> bool:
        return (bs.drv == "raw" and bs.file is not None and bs.file.drv == "file"
                and not getattr(bs.impl, "offset", 0) and getattr(bs.impl, "fixed_size", None) is None
                and not bs.file.impl.direct and hasattr(os, "copy_file_range"))
    return plain(src) and plain(dst)


def _convert_offload(src, dst, base: int, fresh: bool, tick) -> None:
    """Copy the data ranges of ``src`` (block status, as qemu-img -C: no zero detection
    inside data) with copy_file_range; zero ranges cost nothing on a fresh target."""
    sfd, dfd = src.file.impl.fd, dst.file.impl.fd
    size = src.size
    off = 0
    try:
        while off < size:
            ent, n = block_status_above(src, off, min(size - off, 1 << 30))
            if not ent["data"]:
                if not fresh:
                    dst.write_zeroes(base + off, n)
            else:
                done = 0
                while done < n:
                    got = os.copy_file_range(sfd, dfd, n - done, off + done, base + off + done)
                    if got <= 0:      # the source ended early: the rest reads as zeroes
                        dst.write_zeroes(base + off + done, n - done)
                        break
                    done += got
            tick(n)
            off += n
    except OSError as err:
        raise EmuError(f"Write of '{dst.filename}' failed: {os.strerror(err.errno)}") from None
    finally:
        dst.file.impl.note_written()
        dst.file.impl.refresh_size()


def _snapshot_opts(text: str) -> dict:
    """``-l snapshot.id=ID,snapshot.name=NAME`` (either or both), as qemu-img parses it."""
    from emu.img.main import PROG
    out: dict = {}
    for part in text.split(","):
        key, eq, val = part.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise ImgError(f"Invalid parameter '{key}'\n{PROG}: Failed in parsing snapshot param '{text}'")
        if not eq:   # QEMU's deprecated short-form boolean: the value is "on"
            sys.stderr.write(f"{PROG}: warning: short-form boolean option '{key}' deprecated\n"
                             f"Please use {key}=on instead\n")
            val = "on"
        out[key[9:]] = val
    return out


def _load_snapshot(bs, sn_opts: dict | None, name: str | None) -> None:
    """qemu-img convert -l: the first source reads as the snapshot (bdrv_snapshot_load_tmp;
    a bare name is tried as an id first, then as a name)."""
    load = getattr(bs.impl, "snapshot_load_tmp", None)
    try:
        if load is None:
            raise EmuError(f"Block format '{bs.drv}' used by device '' does not support temporarily "
                           "loading internal snapshots")
        with bs.lock:
            if sn_opts is not None:
                load(sn_opts.get("id"), sn_opts.get("name"))
            else:
                try:
                    load(name, None)
                except EmuError:
                    load(None, name)
    except EmuError as err:
        raise ImgError(f"Failed to load snapshot: {err}") from None


def _convert_one(src, dst, base: int, fresh: bool, sparse: int, compress: bool, gran: int, tick,
                 top_only: bool = False, backing_end: int = -1) -> None:
    step = max(sparse, SECTOR)
    zstep = bytes(step)
    buf = bytearray(max(COPY_BUF_SIZE, step))  # every chunk is read into this one buffer
    zeros = memoryview(bytes(COPY_BUF_SIZE)) if sparse == 0 and not compress else None
    if top_only:
        # The target has a backing file: it does not read as zeroes (qemu-img's
        # has_zero_init is off), so zero ranges of the top layer are written as zeroes.
        fresh = False
    for pos, n in _source_chunks(src, buf, top_only, backing_end - base if backing_end >= 0 else -1):
        if n == 0:    # not allocated in the top layer (or zeroes past the target's backing
            continue  # file's end): left to the backing file
        if n < 0:  # the source reads as zeroes here
            n = -n
            if zeros is not None:
                # -S 0 allocates everything, holes included, as qemu-img does.
                for o in range(0, n, COPY_BUF_SIZE):
                    dst.write(base + pos + o, zeros[:min(COPY_BUF_SIZE, n - o)])
            elif not fresh:
                dst.write_zeroes(base + pos, n)
        else:
            chunk = memoryview(buf)[:n]
            if compress:
                _write_compressed(dst, base + pos, chunk, gran)
            elif sparse == 0:
                dst.write(base + pos, chunk)
            else:
                for a, b, is_zero in _sparse_runs(buf, n, step, zstep):
                    if not is_zero:
                        dst.write(base + pos + a, chunk[a:b])
                    elif not fresh:
                        dst.write_zeroes(base + pos + a, b - a)
            chunk.release()
        tick(n)


def _source_chunks(src, buf: bytearray, top_only: bool = False, backing_end: int = -1):
    """Walk ``src`` by block status: yields ``(offset, -length)`` for a range that reads as
    zeroes (no data anywhere in the chain) and ``(offset, length)`` for data just read into
    ``buf`` (at most ``len(buf)`` bytes; the caller is done with it before the next step).
    (A reader thread running ahead was tried: on a loaded 2-core host the GIL hand-offs cost
    more than the overlap gained.)"""
    size = src.size
    off = 0
    while off < size:
        if top_only:
            # ``-B``: the top layer alone decides (bdrv_block_status, not _above); what it
            # leaves unallocated yields ``(offset, 0)`` and is skipped.
            kind, n, _ = src.block_status(off, min(size - off, 1 << 30))
            n = max(1, min(n, size - off))
            if kind in ("unallocated", "zero-unallocated") and src.backing is not None:
                yield off, 0
                off += n
                continue
            ent = {"data": kind == "data" or (kind == "unallocated" and src.backing is None)}
            if kind == "zero-unallocated":
                ent["data"] = False
            if not ent["data"] and backing_end >= 0:
                # qemu-img's post_backing_zero: zeroes past the end of the target's backing
                # file need no writing (the target reads zeroes there anyway).
                if off >= backing_end:
                    yield off, 0
                    off += n
                    continue
                n = min(n, backing_end - off)
        else:
            ent, n = block_status_above(src, off, min(size - off, 1 << 30))
        if not ent["data"]:
            yield off, -n
            off += n
            continue
        end = off + n
        while off < end:
            m = min(len(buf), end - off)
            view = memoryview(buf)[:m]
            try:
                src.read_into(off, view)
            finally:
                view.release()
            yield off, m
            off += m


_NONZERO = re.compile(rb"[^\x00]")


def _sparse_runs(buf: bytearray, n: int, step: int, zstep: bytes):
    """Split ``buf[:n]`` into ``(start, end, is_zero)`` runs of ``step``-sized blocks (from the
    buffer's start; the last may be short), a block being zero when every byte is (qemu-img's
    ``-S``).  Only blocks whose first 8 bytes are zero can be zero, and those are picked in C
    by a strided view of the buffer; a zero run's end is found by a regular expression
    looking for the first non-zero byte."""
    tail = n - n % step  # start of a short last block (n if none)
    cand: list[int] = []
    if tail:
        words = memoryview(buf)[:tail].cast("Q")[::step // 8].tolist()
        if 0 in words:
            cand = [b * step for b, w in enumerate(words) if not w]
    if tail < n:
        cand.append(tail)
    ci, nc = 0, len(cand)
    i = 0
    while i < n:
        z = n
        while ci < nc:
            a = cand[ci]
            ci += 1
            if a < i:
                continue
            if buf.startswith(zstep, a) if a < tail else _NONZERO.search(buf, a, n) is None:
                z = a
                break
        if z > i:
            yield i, z, False
            i = z
            if i >= n:
                break
        k = _NONZERO.search(buf, i, n)
        j = n if k is None else (k.start() // step) * step
        yield i, j, True
        i = j


def _write_compressed(dst, offset: int, buf: memoryview, cluster: int) -> None:
    for i in range(0, len(buf), cluster):
        piece = bytes(buf[i:i + cluster])
        if piece.count(0) == len(piece):
            continue
        if len(piece) < cluster or (offset + i) % cluster:
            dst.write(offset + i, piece)
        else:
            with dst.lock:
                dst.impl.write_compressed(offset + i, piece)


# ---------------------------------------------------------------------------- compare

@command("compare", "f:F:T:pqsU", ["object=", "image-opts", "force-share"])
def cmd_compare(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2``.

    Exit 0: identical; 1: different; 2: an error opened or read the images.
    """
    fmt1 = fmt2 = None
    progress = quiet = strict = share = False
    cache = None
    for o, v in opts:
        if o == "-f":
            fmt1 = v
        elif o == "-F":
            fmt2 = v
        elif o == "-T":
            cache = v
        elif o == "-p":
            progress = True
        elif o == "-q":
            quiet = True
        elif o == "-s":
            strict = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 2:
        raise UsageError("Expecting two image file names")
    if fmt2 is None:
        fmt2 = fmt1
    f1, f2 = args
    try:
        return _compare(f1, f2, fmt1, fmt2, cache, share, quiet, strict, progress and not quiet)
    except ImgError as err:
        if err.code == 1:
            err.code = 2
        raise


def _compare(f1: str, f2: str, fmt1, fmt2, cache, share: bool, quiet: bool, strict: bool,
             progress: bool) -> int:
    with session() as s:
        bs1 = s.open(f1, fmt1, read_only=True, force_share=share, cache=cache)
        bs2 = s.open(f2, fmt2, read_only=True, force_share=share, cache=cache)
        prog = Progress(progress, 2.0)
        size1, size2 = vsize(bs1), vsize(bs2)
        total = min(size1, size2)
        if strict and size1 != size2:
            qprint(quiet, "Strict mode: Image size mismatch!\n")
            return 1
        off = 0
        end1 = end2 = 0
        try:
            while off < total:
                # Each image's extent is kept until consumed: re-asking at every step of the
                # other image's (possibly short) extents would rescan the same tables.
                if off >= end1:
                    st1, n1 = _status(bs1, off, total - off)
                    end1 = off + n1
                if off >= end2:
                    st2, n2 = _status(bs2, off, total - off)
                    end2 = off + n2
                chunk = min(end1, end2) - off
                a1, a2 = st1["present"], st2["present"]
                if strict and (a1, st1["zero"], st1["data"]) != (a2, st2["zero"], st2["data"]):
                    qprint(quiet, f"Strict mode: Offset {off} block status mismatch!\n")
                    return 1
                if st1["zero"] and st2["zero"]:
                    pass
                elif a1 == a2:
                    chunk = min(chunk, IO_BUF_SIZE)
                    b1, b2 = _cmp_read(bs1, f1, off, chunk), _cmp_read(bs2, f2, off, chunk)
                    d = _first_diff_sector(b1, b2)
                    if d < chunk:
                        qprint(quiet, f"Content mismatch at offset {off + d}!\n")
                        return 1
                else:
                    chunk = min(chunk, IO_BUF_SIZE)
                    node, name = (bs1, f1) if a1 else (bs2, f2)
                    i = _first_nonzero_sector(_cmp_read(node, name, off, chunk))
                    if i >= 0:
                        qprint(quiet, f"Content mismatch at offset {off + i}!\n")
                        return 1
                off += chunk
                prog.update(off * 100.0 / total)
            if size1 != size2:
                qprint(quiet, "Warning: Image size mismatch!\n")
                big, bname = (bs1, f1) if size1 > size2 else (bs2, f2)
                off = total
                while off < vsize(big):
                    st, n = _status(big, off, vsize(big) - off)
                    n = min(n, IO_BUF_SIZE)
                    if not st["zero"]:
                        i = _first_nonzero_sector(_cmp_read(big, bname, off, n))
                        if i >= 0:
                            qprint(quiet, f"Content mismatch at offset {off + i}!\n")
                            return 1
                    off += n
        except EmuError as err:
            raise ImgError(f"Error while reading offset {off}: {err}", 4) from None
        qprint(quiet, "Images are identical.\n")
        prog.end()
    return 0


def _status(bs, offset: int, length: int) -> tuple[dict, int]:
    """block_status_above, with the sub-sector tail of a raw image reading as zeroes."""
    if offset >= bs.size:
        return {"depth": 0, "present": False, "zero": True, "data": False, "offset": None,
                "filename": bs.filename}, length
    return block_status_above(bs, offset, min(length, bs.size - offset))


def _cmp_read(bs, name: str, offset: int, length: int) -> bytes:
    """A compare read (zeros past a raw image's last byte); failures exit 4 as qemu-img."""
    try:
        n = max(0, min(length, bs.size - offset))
        return (bs.read(offset, n) if n else b"") + bytes(length - n)
    except EmuError as err:
        raise ImgError(f"Error while reading offset {offset} of {name}: {err}", 4) from None


# ---------------------------------------------------------------------------- bench

@command("bench", "c:d:f:ni:o:qs:S:t:wU",
         ["flush-interval=", "no-drain", "pattern=", "force-share", "object=", "image-opts"])
def cmd_bench(opts: list[tuple[str, str]], args: list[str]) -> int:
    """``bench [-c count] [-d depth] [-f fmt] [-o offset] [-q] [-s buffer_size] [-S step_size]
    [-t cache] [-w] [-U] [--pattern=p] [--flush-interval=n] filename``: sequential I/O timing."""
    count, depth, fmt = 75000, 64, None
    offset, size, step = 0, 4096, None
    cache = "writeback"
    write = quiet = share = False
    pattern = 0
    flush_interval = 0
    for o, v in opts:
        try:
            if o == "-c":
                count = int(v)
            elif o == "-d":
                depth = int(v)
            elif o == "-f":
                fmt = v
            elif o == "-n":
                cache = "none"
            elif o == "-o":
                offset = parse_size(v)
            elif o == "-s":
                size = parse_size(v)
            elif o == "-S":
                step = parse_size(v)
            elif o == "-t":
                cache = v
            elif o == "-w":
                write = True
            elif o == "-q":
                quiet = True
            elif o in ("-U", "--force-share"):
                share = True
            elif o == "--pattern":
                pattern = int(v, 0)
            elif o == "--flush-interval":
                flush_interval = int(v)
        except ValueError:
            raise ImgError(f"Invalid {o.lstrip('-')} specified") from None
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    if step is None:
        step = size
    with session() as s:
        bs = s.open(args[0], fmt, read_only=not write, force_share=share and not write, cache=cache)
        image_size = bs.size
        if image_size < size:
            raise ImgError("Image size is smaller than buffer size")
        qprint(quiet, "Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %d, "
                      "step size %d)%s\n" % (count, "write" if write else "read", size, depth, offset, step,
                                             f" with flush interval {flush_interval}" if flush_interval
                                             else ""))
        sys.stdout.flush()
        from emu.block.api import BlockBackend  # its logging import is start-up time convert does not need
        buf = bytes([pattern & 0xFF]) * size
        blk = BlockBackend(bs, "bench", workers=max(1, min(depth, 4)))
        slots = threading.Semaphore(max(1, depth))
        errors: list[BaseException] = []

        def done(result) -> None:
            if isinstance(result, BaseException):
                errors.append(result)
            slots.release()

        # Requests straight to a driver whose completions this thread can reap itself (rbd):
        # one Python thread submits and completes, as qemu-img's event loop does.
        poll = None
        target = blk._native_target(write) if depth > 1 else None
        if target is not None and hasattr(target[0].impl, "inline_completions"):
            poll = target[0].impl.inline_completions()
        inflight = 0

        def done_inline(result) -> None:
            nonlocal inflight
            inflight -= 1
            if isinstance(result, BaseException):
                errors.append(result)

        start = time.monotonic()
        pos = offset
        try:
            if poll is not None:
                submit = blk.aio_write if write else blk.aio_read
                arg = buf if write else size
                for i in range(count):
                    if pos + size > image_size:
                        pos = 0
                    while inflight >= depth:
                        poll()
                    if errors:
                        break
                    inflight += 1
                    submit(pos, arg, done_inline)
                    if write and flush_interval and (i + 1) % flush_interval == 0:
                        blk.flush()
                    pos = (pos + step) % image_size
                while inflight:
                    poll()
                count = 0                   # done: skip the threaded loop below
            for i in range(count):
                if pos + size > image_size:
                    pos = 0
                if depth <= 1:
                    # One request at a time: no worker hand-off.
                    blk.write(pos, buf) if write else blk.read(pos, size)
                else:
                    # Up to ``depth`` requests in flight through the backend's workers.
                    slots.acquire()
                    if errors:
                        break
                    if write:
                        blk.aio_write(pos, buf, done)
                    else:
                        blk.aio_read(pos, size, done)
                if write and flush_interval and (i + 1) % flush_interval == 0:
                    blk.flush()
                pos = (pos + step) % image_size
            for _ in range(max(1, depth) if depth > 1 else 0):
                slots.acquire()
            if errors:
                raise errors[0]
            if write:
                blk.flush()
        except EmuError as err:
            raise ImgError(f"Failed request: {err}") from None
        finally:
            blk.close()
        elapsed = time.monotonic() - start
    qprint(quiet, "Run completed in %3.3f seconds.\n" % elapsed)
    return 0

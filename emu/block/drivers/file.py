"""The ``file`` protocol driver: a POSIX file or block device.

preadv/pwritev on the file descriptor, fdatasync on flush (none with ``cache.no-flush``, and
none when nothing was written since the last one: QEMU's write_gen/flushed_gen), discard by punching holes, and ``O_DIRECT`` for ``cache=none`` with page-aligned bounce
buffers (``mmap`` memory is page aligned).  Host errors (EIO, ENOSPC, ...) become
:class:`~emu.errors.BlockError` carrying ``errno``; nothing is silently dropped.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import stat
import threading
from typing import Any

from emu.block.node import (BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE,
                            BLK_PERM_WRITE_UNCHANGED, BlockDriver, apply_perm_locks, register_driver,
                            release_locks)
from emu.errors import BlockError, ImageOpenError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Alignment used for O_DIRECT (covers 512-byte and 4 KiB logical-sector devices).
DIRECT_ALIGN = 4096

_libc_fallocate = None


def _libc():
    # Loaded on first use: ctypes (and ctypes.util.find_library, which runs ldconfig) would
    # cost every emu-img start-up.
    global _libc_fallocate
    if _libc_fallocate is None:
        import ctypes
        try:
            lib = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            from ctypes.util import find_library
            lib = ctypes.CDLL(find_library("c"), use_errno=True)
        fn = lib.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        _libc_fallocate = fn
    return _libc_fallocate


class HostIOError(BlockError):
    """A host I/O failure; ``errno`` is the OS error number."""

    def __init__(self, msg: str, err: int) -> None:
        super().__init__(msg)
        self.errno = err


_bounce = threading.local()


def _bounce_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least ``size`` bytes, reused per thread (no page faults
    and no mmap/munmap per request)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, max(size, 1 << 20))
        _bounce.buf = buf
    return buf


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc()(fd, mode, offset, length) != 0:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@register_driver("file")
class FileDriver(BlockDriver):
    """POSIX file protocol."""

    is_protocol = True
    can_grow = True
    takes_buffers = True

    def __init__(self, bs) -> None:
        super().__init__(bs)
        self.fd = -1
        self.direct = False
        self.options: dict[str, Any] = {}
        self._discard_nb_ok = self._discard_nb_failed = self._discard_bytes_ok = 0
        # Write generations (QEMU's bs->write_gen / bs->flushed_gen): every completed write,
        # zero write, discard or truncate stores a fresh number from the counter (next() is
        # atomic under the GIL; a late store of an older number only costs a redundant sync);
        # a flush that finds the number it synced last skips the fdatasync.  Flushes run one
        # at a time so they complete in generation order.
        self._size: int | None = None
        self._gens = itertools.count(1)
        self._write_gen = 0
        self._flushed_gen = 0
        self._flush_lock = threading.Lock()
        #: fdatasync calls made (tests and benchmarks read it).
        self.syncs = 0

    def open(self, options: dict[str, Any]) -> None:
        path = options["filename"]
        if path.startswith("file:"):
            path = path[5:]
        self.path = path
        self.options = dict(options)
        self.fd = self._open_fd(self.bs.read_only)
        self._size = None

    def _open_fd(self, read_only: bool) -> int:
        bs, path, options = self.bs, self.path, self.options
        flags = os.O_RDONLY if read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if bs.cache_direct:
            flags |= os.O_DIRECT
            self.direct = True
        try:
            fd = os.open(path, flags)
        except OSError as err:
            raise ImageOpenError(f"Could not open '{path}': {os.strerror(err.errno)}") from err
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            os.close(fd)
            raise ImageOpenError(f"'file' driver requires '{path}' to be a regular file")
        if options.get("locking", "auto") not in ("off", False):
            if read_only:
                perm = BLK_PERM_CONSISTENT_READ
                shared = BLK_PERM_ALL if bs.force_share else BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
            else:
                perm = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE
                shared = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
            # Our own old descriptor must not count as a conflict while reopening.
            old = self.fd
            if old >= 0:
                release_locks(old)
            try:
                apply_perm_locks(fd, path, perm, shared)
            except BaseException:
                os.close(fd)
                if old >= 0:
                    self._relock(old)
                raise
        return fd

    def _relock(self, fd: int) -> None:
        bs = self.bs
        if bs.read_only:
            perm = BLK_PERM_CONSISTENT_READ
            shared = BLK_PERM_ALL if bs.force_share else BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
        else:
            perm = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE
            shared = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
        try:
            apply_perm_locks(fd, self.path, perm, shared)
        except ImageOpenError:
            pass  # keep going with what we had

    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (new descriptor, new locks)."""
        fd = self._open_fd(read_only)
        old, self.fd = self.fd, fd
        self._size = None
        if old >= 0:
            os.close(old)

    def _err(self, what: str, err: OSError) -> HostIOError:
        return HostIOError(f"{what} of '{self.path}' failed: {os.strerror(err.errno)}", err.errno)

    @property
    def size(self) -> int:
        # Cached as QEMU's total_sectors (every request's range check asks): set at open and
        # by our own writes past the end and truncates; block and character devices ask
        # the kernel each time.
        n = self._size
        if n is not None:
            return n
        st = os.fstat(self.fd)
        if st.st_size == 0 and not stat.S_ISREG(st.st_mode):
            try:
                return os.lseek(self.fd, 0, os.SEEK_END)
            except OSError:
                return 0
        if stat.S_ISREG(st.st_mode):
            self._size = st.st_size
        return st.st_size

    def refresh_size(self) -> None:
        """Forget the cached size (the file was changed behind this node)."""
        self._size = None

    # --- I/O ----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        try:
            if self.direct:
                return self._read_direct(offset, length)
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:  # past EOF reads as zeroes, as in QEMU
                    return data + bytes(length - len(data))
                data += more
            return data
        except OSError as err:
            raise self._err("Read", err) from err

    def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        try:
            if self.direct:
                start, alen = self._aligned(offset, length)
                bounce = memoryview(_bounce_buffer(alen))[:alen]
                try:
                    got = os.preadv(self.fd, [bounce], start)
                    head = offset - start
                    have = max(0, min(length, got - head))
                    buf[:have] = bounce[head:head + have]
                finally:
                    bounce.release()
            else:
                have = 0
                while have < length:
                    got = os.preadv(self.fd, [buf[have:]], offset + have)
                    if not got:
                        break
                    have += got
            if have < length:  # past EOF reads as zeroes, as in QEMU
                buf[have:] = bytes(length - have)
        except OSError as err:
            raise self._err("Read", err) from err

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        start = offset & ~(DIRECT_ALIGN - 1)
        end = (offset + length + DIRECT_ALIGN - 1) & ~(DIRECT_ALIGN - 1)
        return start, end - start

    def _read_direct(self, offset: int, length: int) -> bytes:
        start, alen = self._aligned(offset, length)
        buf = memoryview(_bounce_buffer(alen))[:alen]
        try:
            got = os.preadv(self.fd, [buf], start)
            if got < alen:
                buf[got:alen] = bytes(alen - got)
            return bytes(buf[offset - start:offset - start + length])
        finally:
            buf.release()

    def write(self, offset: int, data: bytes) -> None:
        try:
            if self.direct:
                self._size = None   # (alignment padding and ftruncate: ask again)
                self._write_direct(offset, data)
                return
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwritev(self.fd, [view[done:]], offset + done)
        except OSError as err:
            self._size = None     # a partial write may have grown the file
            raise self._err("Write", err) from err
        finally:
            self._write_gen = next(self._gens)
        n = self._size
        if n is not None and offset + len(data) > n:
            self._size = offset + len(data)

    def _write_direct(self, offset: int, data: bytes) -> None:
        start, alen = self._aligned(offset, len(data))
        buf = memoryview(_bounce_buffer(alen))[:alen]
        try:
            if start != offset or alen != len(data):
                # Read-modify-write of the partial sectors at both ends.
                got = os.preadv(self.fd, [buf], start)
                if got < alen:
                    buf[got:alen] = bytes(alen - got)
            buf[offset - start:offset - start + len(data)] = data
            end = offset + len(data)
            # Alignment padding must not grow the file beyond what was written.
            fsize = os.fstat(self.fd).st_size if start + alen > end else 0
            done = 0
            while done < alen:
                done += os.pwritev(self.fd, [buf[done:]], start + done)
            if start + alen > end and end > fsize:
                os.ftruncate(self.fd, end)
        finally:
            buf.release()

    def note_written(self) -> None:
        """Record that the file changed (callers writing to :attr:`fd` behind the driver)."""
        self._write_gen = next(self._gens)

    def flush(self) -> None:
        if self.bs.cache_no_flush:
            return
        with self._flush_lock:
            gen = self._write_gen
            if gen == self._flushed_gen:
                return   # nothing written since the last fdatasync (QEMU's bdrv_co_flush)
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                raise self._err("Flush", err) from err
            self.syncs += 1
            self._flushed_gen = gen

    def drain_metadata(self) -> None:
        pass  # nothing cached here: pwrite()s are already visible to other processes

    def discard(self, offset: int, length: int) -> None:
        # Counted as QEMU's raw_account_discard: any error (even "unsupported") is a failure.
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            self._write_gen = next(self._gens)
            self._discard_nb_failed += 1
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise self._err("Discard", err) from err
            return
        self._write_gen = next(self._gens)
        self._discard_nb_ok += 1
        self._discard_bytes_ok += length

    def stats(self) -> dict:
        """QEMU's BlockStatsSpecificFile counters."""
        return {"discard-nb-ok": self._discard_nb_ok, "discard-nb-failed": self._discard_nb_failed,
                "discard-bytes-ok": self._discard_bytes_ok}

    def write_zeroes(self, offset: int, length: int) -> None:
        size = self.size
        if offset >= size:
            self.truncate(offset + length)  # a sparse extension reads as zeroes
            return
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, min(length, size - offset))
            self._write_gen = next(self._gens)
            if offset + length > size:
                self.truncate(offset + length)
        except OSError:
            # Punching holes unsupported: write the zeroes.
            step = 1 << 20
            for o in range(offset, offset + length, step):
                self.write(o, bytes(min(step, offset + length - o)))

    def truncate(self, size: int) -> None:
        self._size = None
        try:
            os.ftruncate(self.fd, size)
        except OSError as err:
            raise self._err("Truncate", err) from err
        finally:
            self._write_gen = next(self._gens)

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole until EOF
                return "zero", length, None
            return "data", length, offset
        if data > offset:
            return "zero", min(length, data - offset), None
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return "data", length, offset
        return "data", max(1, min(length, hole - offset)), offset

    def actual_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            release_locks(self.fd)
            os.close(self.fd)
            self.fd = -1

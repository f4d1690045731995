"""The backup job: copy a node's content, as it was when the job was created, to a target.

Copy-before-write: at creation the job hooks the source node's ``before_write`` list.  A
write (guest, qemu-io, anything) to a cluster the job has not copied yet first copies the
cluster's *old* content to the target, under the source node's lock, so the target ends
up holding the point-in-time image while the guest keeps writing.  The background copy
on the job's worker thread takes the same lock per cluster, so a cluster is copied
exactly once, by whichever comes first.

Sync modes (QEMU's MirrorSyncMode): ``full`` (every cluster), ``top`` (clusters allocated
in the top image; the target gets the source's backing file), ``none`` (nothing in the
background, only copy-before-write; the target's backing is the source), ``bitmap``
(clusters dirty in a bitmap; ``incremental`` is ``bitmap`` + ``on-success``).
"""

from __future__ import annotations

import errno as errno_mod
import os
import time
from typing import Any, Callable

from emu.block.bitmaps import DirtyBitmap
from emu.block.jobs import Job, JobError, JobRegistry, JobTxn
from emu.block.overlay import is_allocated_above
from emu.errors import BlockError

__all__ = ["BackupJob", "BACKUP_CLUSTER_SIZE", "SYNC_MODES", "BITMAP_MODES",
           "ON_ERROR_POLICIES", "busy_error"]

#: QEMU's BACKUP_CLUSTER_SIZE_DEFAULT: the copy unit (raised to the target's cluster size).
BACKUP_CLUSTER_SIZE = 1 << 16
#: QEMU's BLOCK_COPY_MAX_BUFFER: the most one background copy step moves.
BLOCK_COPY_MAX_BUFFER = 1 << 20
SYNC_MODES = ("top", "full", "none", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
ON_ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")


def busy_error(registry: JobRegistry, node: Any, label: str) -> str | None:
    """QEMU's op blocker text when ``node`` is already the source of a backup job."""
    for j in registry.jobs():
        if isinstance(j, BackupJob) and j.source is node and not j.is_completed():
            return f"Node '{label}' is busy: block device is in use by block job: backup"
    return None


class _CopyError(Exception):
    def __init__(self, is_read: bool, err: BaseException) -> None:
        super().__init__(str(err))
        self.is_read = is_read
        self.errno = getattr(err, "errno", None) or errno_mod.EIO


class BackupJob(Job):
    """A backup job from ``source`` to ``target`` (both open nodes of one graph).

    :param sync: ``full``, ``top``, ``none`` or ``bitmap``.
    :param bitmap: the bitmap for ``sync=bitmap`` (or to update with ``bitmap_mode``).
    :param bitmap_mode: ``on-success``, ``never`` or ``always``.
    :param compress: accepted for qcow2 targets (emu writes the clusters uncompressed).
    :param on_source_error: / :param on_target_error: QEMU's BlockdevOnError policies.
    :param target_is_new: the target was created empty (zero clusters need no write).
    :param on_clean: called once when the job lets go of its nodes (remove the target).
    """

    job_type = "backup"

    def __init__(self, registry: JobRegistry, job_id: str, source: Any, target: Any, *,
                 sync: str = "full", bitmap: DirtyBitmap | None = None,
                 bitmap_mode: str | None = None, compress: bool = False,
                 on_source_error: str = "report", on_target_error: str = "report",
                 speed: int = 0, auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: JobTxn | None = None, target_is_new: bool = False,
                 on_clean: Callable[[], None] | None = None) -> None:
        super().__init__(registry, job_id, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss, txn=txn)
        self.source = source
        self.target = target
        self.sync = sync
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.compress = compress
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.on_clean = on_clean
        self.cluster_size = max(BACKUP_CLUSTER_SIZE, getattr(target.impl, "cluster_size", 0) or 0)
        self.size = source.size
        # a new target without backing reads as zeroes: zero clusters need no write
        self._skip_zero = target_is_new and target.backing is None
        self._todo: set[int] = set()
        self._copied: set[int] = set()
        self._next_time = 0.0
        self._hooked = False
        self._cleaned = False
        self._zero = bytes(self.cluster_size)

    # ----------------------------------------------------------- creation
    @classmethod
    def new(cls, registry: JobRegistry, job_id: str, source: Any, target: Any,
               **kw: Any) -> "BackupJob":
        """QEMU's backup_job_create: checks, the ``created`` event, copy-before-write on.

        :raises JobError: with QEMU's texts (same node, sizes, compression, ids, speed).
        """
        if source is target:
            raise JobError("Source and target cannot be the same")
        if kw.get("compress") and not getattr(target.impl, "cluster_size", 0):
            # QEMU names the target's BlockBackend, which a backup target never has
            raise JobError("Compression is not supported for this drive ")
        if target.size != source.size:
            raise JobError("Source and target image have different sizes")
        registry.check_new_id(job_id)
        speed = kw.get("speed", 0)
        bitmap: DirtyBitmap | None = kw.get("bitmap")
        if bitmap is not None and kw.get("bitmap_mode") != "never":
            bitmap.check_usable()
        job = cls(registry, job_id, source, target, **kw)
        job.create()
        if speed < 0:
            job.early_fail()
            raise JobError("Parameter 'speed' expects a non-negative value")
        if bitmap is not None:
            bitmap.freeze()
        job._init_copy_set()
        source.before_write.append(job._copy_before_write)
        job._hooked = True
        return job

    def _init_copy_set(self) -> None:
        cs, size = self.cluster_size, self.size
        n_clusters = (size + cs - 1) // cs
        if self.sync in ("full", "none"):
            self._todo = set(range(n_clusters))
        elif self.sync == "top":
            todo: set[int] = set()
            base = self.source.backing
            for c in range(n_clusters):
                off = c * cs
                alloc, _ = is_allocated_above(self.source, base, off, min(cs, size - off))
                if alloc:
                    todo.add(c)
            self._todo = todo
        else:                               # bitmap
            todo = set()
            assert self.bitmap is not None
            for off, n in self.bitmap.extents():
                todo.update(range(off // cs, (off + n - 1) // cs + 1))
            self._todo = {c for c in todo if c < n_clusters}
        self.progress_total = sum(min(cs, size - c * cs) for c in self._todo)

    def nodes(self) -> list[Any]:
        return [self.source, self.target]

    # ----------------------------------------------------------- copying
    def _alloc(self, c: int) -> bool:
        off = c * self.cluster_size
        return is_allocated_above(self.source, None, off,
                                  min(self.cluster_size, self.size - off))[0]

    def _chunk(self, c: int) -> list[int]:
        """The clusters one background step copies: ``c`` and the clusters after it that
        are still to do and allocated alike, up to QEMU's BLOCK_COPY_MAX_BUFFER (1 MiB),
        which is also the unit the rate limit charges."""
        out = [c]
        alloc = self._alloc(c)
        limit = max(1, BLOCK_COPY_MAX_BUFFER // self.cluster_size)
        while len(out) < limit and out[-1] + 1 in self._todo and self._alloc(out[-1] + 1) == alloc:
            out.append(out[-1] + 1)
        return out

    def _copy_cluster(self, c: int, count: int = 1) -> int:
        """Copy clusters ``c .. c+count-1`` that are still to do; returns the bytes done."""
        cs = self.cluster_size
        done = 0
        with self.source.lock:
            todo = [k for k in range(c, c + count) if k in self._todo]
            if not todo:
                return 0
            first, last = todo[0], todo[-1]
            off = first * cs
            end = min((last + 1) * cs, self.size)
            if self._skip_zero and self.sync == "full":
                alloc, cnt = is_allocated_above(self.source, None, off, end - off)
                if not alloc and cnt >= end - off:
                    for k in todo:
                        n = min(cs, self.size - k * cs)
                        self._done(k, n)
                        done += n
                    return done
            try:
                data = self.source.read(off, end - off)
            except BlockError as err:
                raise _CopyError(True, err) from err
            for k in todo:
                koff = k * cs
                n = min(cs, self.size - koff)
                piece = data[koff - off:koff - off + n]
                try:
                    if piece == self._zero[:n]:
                        if not self._skip_zero:
                            self.target.write_zeroes(koff, n)
                    else:
                        self.target.write(koff, piece)
                except BlockError as err:
                    raise _CopyError(False, err) from err
                self._done(k, n)
                done += n
        return done

    def _done(self, c: int, n: int) -> None:
        self._todo.discard(c)
        self._copied.add(c)
        self.progress_current += n

    def _copy_before_write(self, offset: int, length: int) -> None:
        """Source ``before_write`` hook (runs under the source node's lock)."""
        if not self._todo or length <= 0:
            return
        cs = self.cluster_size
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            if c in self._todo:
                try:
                    self._copy_cluster(c)
                except _CopyError as err:
                    # QEMU's default on-cbw-error=break-guest-write: the write fails
                    raise BlockError(f"copy-before-write failed: {err}") from err

    def _error_action(self, err: _CopyError) -> str:
        policy = self.on_source_error if err.is_read else self.on_target_error
        return self._apply_error_policy(policy, err.is_read, err.errno)

    def run(self) -> str | None:
        if self.sync == "none":
            while not self.cancelled:
                self.pause_point()
                if self.cancelled:
                    break
                self.sleep(3600)
            return None
        for c in sorted(self._todo):
            while True:
                self.pause_point()
                if self.cancelled:
                    return None
                if c not in self._todo:
                    break
                now = time.monotonic()
                if self.speed and self._next_time > now:
                    self.sleep(self._next_time - now)
                    continue
                if not self.set_busy():
                    continue
                try:
                    chunk = self._chunk(c)
                    n = self._copy_cluster(c, len(chunk))
                except _CopyError as err:
                    with self._lock:
                        self.busy = False
                    action = self._error_action(err)
                    if action == "report":
                        return os.strerror(err.errno)
                    if action == "ignore":
                        self.sleep(0.01)    # retry, as QEMU's backup loop does
                    continue
                with self._lock:
                    self.busy = False
                if self.speed and n:
                    self._next_time = max(now, self._next_time) + n / self.speed
                break
        try:
            self.target.flush()
        except BlockError as err:
            return os.strerror(getattr(err, "errno", None) or errno_mod.EIO)
        return None

    # ----------------------------------------------------------- end of the job
    def commit(self) -> None:
        bm = self.bitmap
        if bm is not None and bm.busy:
            if self.bitmap_mode in ("on-success", "always"):
                bm.abdicate()
            else:
                bm.reclaim()

    def abort(self) -> None:
        bm = self.bitmap
        if bm is not None and bm.busy:
            if self.bitmap_mode == "always":
                # what was copied is clean now; the rest and new writes stay dirty
                cs = self.cluster_size
                for c in self._copied:
                    bm.reset(c * cs, cs)
            bm.reclaim()

    def clean(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self._hooked and self._copy_before_write in self.source.before_write:
            self.source.before_write.remove(self._copy_before_write)
        self._hooked = False
        try:
            if not self.target.closed and not self.target.read_only:
                self.target.flush()
        except BlockError:
            pass
        if self.on_clean is not None:
            self.on_clean()

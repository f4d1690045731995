"""The commit job (QMP ``block-commit`` of a layer below the active one): copy what ``top``
and the layers between it and ``base`` hold down into ``base``, then make ``base`` the
backing file of the node above ``top`` and drop the layers in between.

The guest never writes to ``top`` or below (they are backing files), so the copy needs no
copy-before-write; reads through the chain see the same data before, during and after the
job.  ``base`` is reopened read-write for the job and back to read-only at its end (QEMU's
``base_read_only``).  Cancelling leaves the chain as it was: ``base`` then holds some of
``top``'s data, which nothing reads through ``base`` while ``top`` is above it.

Committing the active layer is QEMU's mirror job: :class:`ActiveCommitJob` (``ready``,
``block-job-complete``, the devices switched to ``base``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from emu.block.jobs import SYNC_TIMEOUT, JobError, JobRegistry, JobStatus, JobVerb
from emu.block.jobs.stream import STREAM_CHUNK, ChainCopyJob, _IOError, chain_between
from emu.block.overlay import is_allocated_above, set_backing
from emu.errors import BlockError

__all__ = ["CommitJob", "ActiveCommitJob"]


class CommitJob(ChainCopyJob):
    """Commit ``top`` (and the layers down to ``base``) into ``base``.

    :param overlay: the node whose backing file is ``top`` (re-pointed at ``base``).
    :param backing_file: the backing file name written into ``overlay``'s header
        (default: ``base``'s file name).
    """

    job_type = "commit"

    def __init__(self, registry: JobRegistry, job_id: str, overlay: Any, top: Any, base: Any,
                 *, backing_file: str | None = None, **kw: Any) -> None:
        super().__init__(registry, job_id, **kw)
        self.overlay = overlay
        self.top = top
        self.base = base
        self.backing_file = backing_file
        #: the layers that leave the chain: top and those between it and base
        self.dropped = [top] + chain_between(top, base)

    @classmethod
    def new(cls, registry: JobRegistry, job_id: str, overlay: Any, top: Any, base: Any,
            **kw: Any) -> "CommitJob":
        """Checks, ``base`` reopened read-write, the ``created`` event.

        :raises JobError: QEMU's job id texts, or ``base`` cannot be written.
        """
        if overlay.backing is not top or base not in top.backing_chain() or base is top:
            raise JobError("cannot commit an image into itself" if base is top else
                           f"'{base.node_name}' is not in this backing file chain")
        registry.check_new_id(job_id)
        job = cls(registry, job_id, overlay, top, base, **kw)
        job.create()
        # QEMU's commit_start reopens base after creating the job: a failure drops it
        # again (created, null) with bdrv_reopen's text
        try:
            job.make_writable(base)
        except BlockError as err:
            job.early_fail()
            job.clean()
            if base.force_share:
                raise JobError("Cannot change the option 'force-share'") from err
            raise JobError(str(err)) from err
        return job

    def nodes(self) -> list[Any]:
        return [self.overlay] + self.dropped + [self.base]

    def prepare_run(self) -> bool:
        size = self.top.size
        self.progress_total = size
        if self.base.size < size:
            try:
                self.base.truncate(size)
            except BlockError as err:
                raise _IOError(False, err) from err
        return size > 0

    def step(self, offset: int) -> tuple[int, bool]:
        n = min(STREAM_CHUNK, self.top.size - offset)
        try:
            alloc, cnt = is_allocated_above(self.top, self.base, offset, n)
            if not alloc:
                return cnt, False
            data = self.top.read(offset, cnt)
        except BlockError as err:
            raise _IOError(True, err) from err
        try:
            self.base.write(offset, data)
        except BlockError as err:
            raise _IOError(False, err) from err
        return cnt, True

    def flush_target(self) -> None:
        self.base.flush()

    def commit(self) -> None:
        overlay, base = self.overlay, self.base
        reopened = False
        try:
            if overlay.read_only:       # its header names the new backing file
                overlay.reopen(False)
                reopened = True
            set_backing(overlay, base, self.backing_file or base.filename, base.drv)
            overlay.flush()
        except BlockError as err:       # QEMU's commit_prepare failing: the job fails
            self.ret = str(err)
            return
        finally:
            if reopened:
                try:
                    overlay.reopen(True)
                except BlockError:
                    pass
        self.drop_nodes(self.dropped)


#: the dirty-tracking unit of an active commit (QEMU's mirror granularity for 64 KiB
#: clusters) and the most one copy step moves
ACTIVE_GRANULARITY = 1 << 16
ACTIVE_CHUNK = 1 << 20
#: how often a ``ready`` job looks for new guest writes
READY_POLL = 0.02

SwitchFn = Callable[[Any, Any, Callable[[], None]], None]


class ActiveCommitJob(ChainCopyJob):
    """Commit the active layer (QEMU's commit_active_start, a mirror job of type
    ``commit``): copy everything above ``base`` into ``base`` while the guest keeps writing
    to ``active`` (its writes are tracked in a dirty set by a ``before_write`` hook and
    copied again), report ``ready`` (``BLOCK_JOB_READY``) once ``base`` is in sync, keep it
    in sync until ``block-job-complete``, then switch the devices from ``active`` to
    ``base`` (``switch_root(old, new, final_sync)``: the caller quiesces the devices and
    calls ``final_sync`` inside) and drop the layers above ``base``.

    ``block-job-cancel`` of a ready job (without ``force``) ends it successfully without the
    switch, as QEMU's mirror does; before ``ready`` it is an ordinary cancel.  The switch is
    made at the end of the job's work, so a job waiting for ``job-finalize`` already runs on
    ``base``.
    """

    job_type = "commit"

    def __init__(self, registry: JobRegistry, job_id: str, active: Any, base: Any, *,
                 switch_root: SwitchFn | None = None, **kw: Any) -> None:
        super().__init__(registry, job_id, **kw)
        self.active = active
        self.base = base
        self.switch_root = switch_root
        self.dropped = [active] + chain_between(active, base)
        self.should_complete = False
        self.soft_cancel = False
        self.pivoted = False
        self._dirty: set[int] = set()
        self._hooked = False

    @classmethod
    def new(cls, registry: JobRegistry, job_id: str, active: Any, base: Any,
            **kw: Any) -> "ActiveCommitJob":
        """Checks, the ``created`` event, ``base`` reopened read-write, tracking on.

        :raises JobError: QEMU's texts.
        """
        if base is active:
            raise JobError("cannot commit an image into itself")
        if base not in active.backing_chain():
            raise JobError(f"'{base.node_name}' is not in this backing file chain")
        registry.check_new_id(job_id)
        job = cls(registry, job_id, active, base, **kw)
        job.create()
        try:
            job.make_writable(base)
        except BlockError as err:
            job.early_fail()
            job.clean()
            if base.force_share:
                raise JobError("Cannot change the option 'force-share'") from err
            raise JobError(str(err)) from err
        with active.lock:
            active.before_write.append(job._track)
            job._hooked = True
        return job

    def nodes(self) -> list[Any]:
        return self.dropped + [self.base]

    # ----------------------------------------------------------- dirty tracking
    def _track(self, offset: int, length: int) -> None:
        """``before_write`` hook of ``active`` (under its lock): the range is dirty."""
        if length > 0:
            g = ACTIVE_GRANULARITY
            self._dirty.update(range(offset // g, (offset + length - 1) // g + 1))

    def _unhook(self) -> None:
        if self._hooked:
            with self.active.lock:
                if self._track in self.active.before_write:
                    self.active.before_write.remove(self._track)
            self._hooked = False

    def _dirty_bytes(self) -> int:
        g, size = ACTIVE_GRANULARITY, self.active.size
        return sum(min(g, size - c * g) for c in list(self._dirty) if c * g < size)

    def _init_dirty(self) -> None:
        size, off, g = self.active.size, 0, ACTIVE_GRANULARITY
        while off < size:
            n = min(ACTIVE_CHUNK, size - off)
            alloc, cnt = is_allocated_above(self.active, self.base, off, n)
            if alloc:
                self._dirty.update(range(off // g, (off + cnt - 1) // g + 1))
            off += cnt
        self.progress_total = self._dirty_bytes()

    def _copy_some(self, limit: int | None) -> int:
        """Copy dirty clusters (a run of up to ``limit`` clusters, all when ``None``) from
        ``active``'s view into ``base``, under ``active``'s lock; returns the bytes."""
        g, size = ACTIVE_GRANULARITY, self.active.size
        done = 0
        with self.active.lock:
            while self._dirty:
                first = min(self._dirty)
                run = [first]
                while (limit is None or len(run) < limit) and run[-1] + 1 in self._dirty:
                    run.append(run[-1] + 1)
                off = first * g
                end = min((run[-1] + 1) * g, size)
                self._dirty.difference_update(run)
                if off >= size:
                    continue
                try:
                    data = self.active.read(off, end - off)
                except BlockError as err:
                    self._dirty.update(run)
                    raise _IOError(True, err) from err
                try:
                    self.base.write(off, data)
                except BlockError as err:
                    self._dirty.update(run)
                    raise _IOError(False, err) from err
                done += end - off
                if limit is not None:
                    break
        return done

    # ----------------------------------------------------------- verbs
    def complete(self) -> None:
        """``block-job-complete``: switch to ``base`` once in sync."""
        with self._lock:
            self.apply_verb(JobVerb.COMPLETE)
            if self.cancelled or self.soft_cancel:
                raise JobError(f"The active block job '{self.id}' cannot be completed")
            self.should_complete = True
            self._cond.notify_all()

    def cancel(self, force: bool = False, wait: float = SYNC_TIMEOUT) -> None:
        """A ready job cancelled without ``force`` ends without the switch (QEMU's soft
        cancel of a mirror: ``BLOCK_JOB_COMPLETED``); its reply does not wait, as
        QEMU's does not."""
        with self._lock:
            if (force or self.status not in (JobStatus.READY, JobStatus.STANDBY)
                    or self.user_paused):
                pass
            else:
                self.apply_verb(JobVerb.CANCEL)
                self.soft_cancel = True
                self._cond.notify_all()
                return
        super().cancel(force, wait)

    # ----------------------------------------------------------- the job
    def run(self) -> str | None:
        self._init_dirty()
        while True:
            self.pause_point()
            if self.cancelled or self.soft_cancel:
                return None
            if not self._dirty:
                with self._lock:
                    self.progress_total = self.progress_current
                    if self.status is JobStatus.RUNNING:
                        self._transition(JobStatus.READY)
                        self.registry.emit("BLOCK_JOB_READY", {
                            "device": self.id, "len": self.progress_total,
                            "offset": self.progress_current, "speed": self.speed,
                            "type": self.job_type})
                    if self.should_complete and not self.should_pause:
                        break
                    self.busy = False
                    self.yielded.set()
                    self._cond.wait(READY_POLL)
                continue
            now = time.monotonic()
            if self.speed and self._next_time > now:
                self.sleep(self._next_time - now)
                continue
            if not self.set_busy():
                continue
            self.yielded.set()
            try:
                n = self._copy_some(ACTIVE_CHUNK // ACTIVE_GRANULARITY)
            except _IOError as err:
                with self._lock:
                    self.busy = False
                action = self._error_action(err)
                if action == "report":
                    return os.strerror(err.errno)
                if action == "ignore":
                    self.sleep(0.01)
                continue
            with self._lock:
                self.busy = False
                self.progress_current += n
                self.progress_total = self.progress_current + self._dirty_bytes()
            if self.speed and n:
                self._next_time = max(now, self._next_time) + n / self.speed
        return self._pivot()

    def _pivot(self) -> str | None:
        """The switch to ``base``: what the guest wrote last is copied with the devices
        quiesced, then they use ``base``."""
        def final_sync() -> None:
            n = self._copy_some(None)
            self.base.flush()
            with self._lock:
                self.progress_current += n
                self.progress_total += n
            self._unhook()

        try:
            if self.switch_root is not None:
                self.switch_root(self.active, self.base, final_sync)
            else:
                final_sync()
        except _IOError as err:
            return os.strerror(err.errno)
        except BlockError as err:
            return str(err)
        self.pivoted = True
        if self.base in self._reopened:     # base is the active layer now
            self._reopened.remove(self.base)
        return None

    def flush_target(self) -> None:
        self.base.flush()

    def commit(self) -> None:
        self._unhook()
        if self.pivoted:
            self.drop_nodes(self.dropped)

    def abort(self) -> None:
        self._unhook()

    def clean(self) -> None:
        self._unhook()
        super().clean()

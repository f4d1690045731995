"""The commit job (QMP ``block-commit`` of a layer below the active one): copy what ``top``
and the layers between it and ``base`` hold down into ``base``, then make ``base`` the
backing file of the node above ``top`` and drop the layers in between.

The guest never writes to ``top`` or below (they are backing files), so the copy needs no
copy-before-write; reads through the chain see the same data before, during and after the
job.  ``base`` is reopened read-write for the job and back to read-only at its end (QEMU's
``base_read_only``).  Cancelling leaves the chain as it was: ``base`` then holds some of
``top``'s data, which nothing reads through ``base`` while ``top`` is above it.

Committing the active layer is QEMU's mirror job (``ready``, ``block-job-complete``); emu
refuses it (see :mod:`emu.qmp.commands.jobs`).
"""

from __future__ import annotations

from typing import Any

from emu.block.jobs import JobError, JobRegistry
from emu.block.jobs.stream import STREAM_CHUNK, ChainCopyJob, _IOError, chain_between
from emu.block.overlay import is_allocated_above, set_backing
from emu.errors import BlockError

__all__ = ["CommitJob"]


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

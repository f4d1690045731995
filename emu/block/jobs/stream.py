"""The stream job (QMP ``block-stream``): pull the data of the layers between a node and
``base`` up into the node, then make ``base`` the node's backing file.

Also :class:`ChainCopyJob`, the copy loop the stream and commit jobs share: QEMU's chunk
walk (512 KiB steps, progress over the whole image, allocated or not), its rate limit
(charged only for bytes copied), ``on-error`` policies with ``BLOCK_JOB_ERROR``, and the
"first yield" a QMP command waits for, so a job with nothing to copy reports all its events
before the command's reply, as QEMU's coroutine does.

Guest writes win: each stream step checks, reads the backing chain and writes the node
under the node's lock, which every write to the node takes too (``_write_locked``).  A
cluster the guest wrote is allocated in the node and skipped; a cluster the stream wrote
first is simply overwritten by the guest afterwards.  Cancelling leaves the chain as it was:
what was copied reads the same through the node as through its backing files.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
from typing import Any, Callable

from emu.block.jobs import Job, JobError, JobRegistry
from emu.block.overlay import UNALLOCATED_KINDS, is_allocated_above, set_backing
from emu.errors import BlockError

__all__ = ["ChainCopyJob", "StreamJob", "STREAM_CHUNK", "chain_between"]

#: QEMU's STREAM_CHUNK / COMMIT_BUFFER_SIZE: the step of the copy loop.
STREAM_CHUNK = 512 * 1024

KeepFn = Callable[[Any], bool]


class _IOError(Exception):
    def __init__(self, is_read: bool, err: BaseException) -> None:
        super().__init__(str(err))
        self.is_read = is_read
        self.errno = getattr(err, "errno", None) or errno_mod.EIO


def chain_between(top: Any, base: Any | None) -> list[Any]:
    """The nodes below ``top`` down to ``base`` (excluded; ``None``: to the bottom)."""
    out = []
    n = top.backing
    while n is not None and n is not base:
        out.append(n)
        n = n.backing
    return out


class ChainCopyJob(Job):
    """The copy loop of stream and commit: subclasses give :meth:`step` and :meth:`finish`.

    :param on_error: QEMU's BlockdevOnError (``report``, ``ignore``, ``enospc``, ``stop``,
        ``auto``).
    :param keep: ``keep(node)``: the node must stay in the graph after it leaves the chain
        (the client added it with ``blockdev-add``); other dropped nodes are closed.
    """

    def __init__(self, registry: JobRegistry, job_id: str, *, on_error: str = "report",
                 keep: KeepFn | None = None, **kw: Any) -> None:
        super().__init__(registry, job_id, **kw)
        self.on_error = on_error
        self.keep = keep or (lambda node: False)
        #: set at the job's first I/O or when it has completed: what a QMP command waits
        #: for before its reply
        self.yielded = threading.Event()
        self._next_time = 0.0
        self._reopened: list[Any] = []

    # ----------------------------------------------------------- node modes
    def make_writable(self, node: Any) -> None:
        """Reopen ``node`` read-write for the job (back to read-only at :meth:`clean`)."""
        if node.read_only:
            node.reopen(False)
            self._reopened.append(node)

    def clean(self) -> None:
        while self._reopened:
            node = self._reopened.pop()
            try:
                if not node.closed:
                    node.reopen(True)
            except BlockError:
                pass

    def drop_nodes(self, nodes: list[Any]) -> None:
        """Close the nodes that left the chain and nothing else uses (top first)."""
        for n in nodes:
            graph = n.graph
            if n.parents <= 0 and not self.keep(n) and n in graph.nodes():
                try:
                    graph.remove(n)
                except BlockError:
                    pass

    # ----------------------------------------------------------- the loop
    def _worker(self) -> None:
        try:
            super()._worker()
        finally:
            self.yielded.set()

    def step(self, offset: int) -> tuple[int, bool]:
        """Do the step at ``offset``: returns ``(bytes, copied)``; raises :class:`_IOError`."""
        raise NotImplementedError

    def prepare_run(self) -> bool:
        """Before the loop: set the length; ``False``: nothing to do."""
        return True

    def flush_target(self) -> None:
        raise NotImplementedError

    def _error_action(self, err: _IOError) -> str:
        policy = self.on_error
        return self._apply_error_policy(policy, err.is_read, err.errno)

    def run(self) -> str | None:
        if not self.prepare_run():
            return None
        size = self.progress_total
        offset = 0
        while offset < size:
            self.pause_point()
            if self.cancelled:
                return None
            now = time.monotonic()
            if self.speed and self._next_time > now:
                self.sleep(self._next_time - now)
                continue
            if not self.set_busy():
                continue
            self.yielded.set()
            try:
                n, copied = self.step(offset)
            except _IOError as err:
                with self._lock:
                    self.busy = False
                action = self._error_action(err)
                if action == "report":
                    return os.strerror(err.errno)
                if action == "ignore":
                    # QEMU skips the failed chunk with ignore
                    n, copied = min(STREAM_CHUNK, size - offset), False
                else:
                    continue
            with self._lock:
                self.busy = False
                self.progress_current += n
            offset += n
            if copied and self.speed:
                self._next_time = max(now, self._next_time) + n / self.speed
        try:
            self.flush_target()
        except BlockError as err:
            return os.strerror(getattr(err, "errno", None) or errno_mod.EIO)
        return None


class StreamJob(ChainCopyJob):
    """``block-stream``: copy into ``top`` what its backing files above ``base`` hold.

    :param top: the node streamed into (QMP ``device``).
    :param base: the node that stays as backing file (``None``: the whole chain).
    :param backing_file: the backing file name written into ``top``'s header
        (default: ``base``'s file name; none without ``base``).
    """

    job_type = "stream"

    def __init__(self, registry: JobRegistry, job_id: str, top: Any, base: Any | None, *,
                 backing_file: str | None = None, **kw: Any) -> None:
        super().__init__(registry, job_id, **kw)
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.streamed = chain_between(top, base)

    @classmethod
    def new(cls, registry: JobRegistry, job_id: str, top: Any, base: Any | None,
            **kw: Any) -> "StreamJob":
        """Checks, the ``created`` event; the caller starts the job.

        :raises JobError: QEMU's job id texts, or ``top`` cannot be made writable.
        """
        registry.check_new_id(job_id)
        if base is not None and base not in top.backing_chain():
            raise JobError(f"'{base.node_name}' is not in the backing chain of "
                           f"'{top.node_name}'")
        job = cls(registry, job_id, top, base, **kw)
        if job.streamed:
            try:
                job.make_writable(top)
            except BlockError as err:
                raise JobError(str(err)) from err
        job.create()
        return job

    def nodes(self) -> list[Any]:
        return [self.top] + self.streamed

    def prepare_run(self) -> bool:
        if not self.streamed:           # the node sits right on base: nothing to stream
            return False
        self.progress_total = self.top.size
        return True

    def step(self, offset: int) -> tuple[int, bool]:
        top = self.top
        n = min(STREAM_CHUNK, top.size - offset)
        with top.lock:                  # a guest write to top waits for this step
            try:
                kind, cnt, _ = top.block_status(offset, n)
            except BlockError as err:
                raise _IOError(True, err) from err
            cnt = max(1, min(n, cnt))
            if kind not in UNALLOCATED_KINDS:
                return cnt, False       # top has its own data here (the guest's, maybe)
            try:
                alloc, cnt = is_allocated_above(top.backing, self.base, offset, cnt)
                if not alloc:
                    return cnt, False
                data = top.read_backing(offset, cnt)
            except BlockError as err:
                raise _IOError(True, err) from err
            try:
                top.write(offset, data)
            except BlockError as err:
                raise _IOError(False, err) from err
        return cnt, True

    def flush_target(self) -> None:
        self.top.flush()

    def commit(self) -> None:
        base = self.base
        name = None
        if base is not None:
            name = self.backing_file or base.filename
        try:
            set_backing(self.top, base, name, base.drv if base is not None else None)
            self.top.flush()
        except BlockError as err:       # QEMU's stream_prepare failing: the job fails
            self.ret = str(err)
            return
        self.drop_nodes(self.streamed)

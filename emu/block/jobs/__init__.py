"""Block jobs: QEMU's job state machine, job transactions and the registry of a machine.

Map:

- this module -- :class:`JobStatus` / :class:`JobVerb` (QEMU's ``JobSTT`` / ``JobVerbTable``),
  :class:`Job` (state machine, pause/resume/cancel, completion, events), :class:`JobTxn`
  (jobs that complete or fail together: transaction ``completion-mode: grouped``) and
  :class:`JobRegistry` (the jobs of one machine: ``find``, ``query-block-jobs``,
  ``query-jobs``, drains).
- :mod:`emu.block.jobs.backup` -- the backup job with copy-before-write.
- :mod:`emu.block.jobs.stream` -- the stream job (and the copy loop stream and commit share).
- :mod:`emu.block.jobs.commit` -- the commit job of a layer below the active one.

Threads: each started job runs its :meth:`Job.run` on its own worker thread.  All job
state of a registry is guarded by one lock (QEMU's ``job_mutex``).  Status changes emit
``JOB_STATUS_CHANGE`` through the registry's ``emit(name, data)`` callback in the thread
that makes them; verbs (pause, resume, drains) change status synchronously, so a
monitor's reply always follows the events its command caused, as QEMU's does.
"""

from __future__ import annotations

import enum
import errno
import threading
from typing import Any, Callable, Iterable

from emu.errors import BlockError

__all__ = ["JobStatus", "JobVerb", "JobError", "Job", "JobTxn", "JobRegistry",
           "JOB_STT", "JOB_VERB_TABLE"]

EmitFn = Callable[[str, "dict[str, Any] | None"], None]


class JobError(BlockError):
    """A job verb or job creation refused, with QEMU's text."""


class JobStatus(enum.Enum):
    """QEMU's ``JobStatus`` (qapi/job.json)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.Enum):
    """QEMU's ``JobVerb``: what a client may ask of a job."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


_S = JobStatus
#: QEMU's JobSTT (job.c): the status changes a job may make.
JOB_STT: dict[JobStatus, frozenset[JobStatus]] = {
    _S.UNDEFINED: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ABORTING, _S.NULL}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.READY, _S.WAITING, _S.ABORTING}),
    _S.PAUSED: frozenset({_S.RUNNING}),
    _S.READY: frozenset({_S.STANDBY, _S.WAITING, _S.ABORTING}),
    _S.STANDBY: frozenset({_S.READY}),
    _S.WAITING: frozenset({_S.PENDING, _S.ABORTING}),
    _S.PENDING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.ABORTING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.CONCLUDED: frozenset({_S.NULL}),
    _S.NULL: frozenset(),
}
_ACTIVE = frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY})
#: QEMU's JobVerbTable (job.c): the states in which each verb is accepted.
JOB_VERB_TABLE: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {_S.WAITING, _S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({_S.READY, _S.STANDBY}),   # QEMU 7.2 takes it in standby
    JobVerb.FINALIZE: frozenset({_S.PENDING}),
    JobVerb.DISMISS: frozenset({_S.CONCLUDED}),
    JobVerb.CHANGE: frozenset({_S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY}),
}
#: job_is_completed(): the job's own work is over.
_COMPLETED = frozenset({_S.WAITING, _S.PENDING, _S.ABORTING, _S.CONCLUDED, _S.NULL})

#: How long a verb that waits for a job (cancel, drain) waits before giving up.
SYNC_TIMEOUT = 10.0


def id_wellformed(job_id: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, ``-``, ``.``, ``_``."""
    return bool(job_id) and job_id[0].isascii() and job_id[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in job_id)


class JobTxn:
    """Jobs that finish together (QEMU's JobTxn): they go to ``pending`` only when all of
    them are done, and when one fails or is cancelled the others are cancelled."""

    def __init__(self) -> None:
        #: newest first, as QEMU's QLIST_INSERT_HEAD leaves them
        self.jobs: list[Job] = []
        self.aborting = False

    def add(self, job: "Job") -> None:
        self.jobs.insert(0, job)
        job.txn = self


class Job:
    """One job: the state machine, pause points, cancellation and completion.

    Subclasses implement :meth:`run` (worker thread; return ``None`` on success or an
    error text) and may override :meth:`commit`, :meth:`abort`, :meth:`clean`,
    :meth:`event_data` and :meth:`info_extra`.

    :param registry: the registry the job belongs to (its lock, its events).
    :param job_id: the job's id (QMP ``device`` of block jobs).
    :param speed: rate limit in bytes/s (0: none).
    :param auto_finalize: go from ``pending`` to ``concluded`` without ``job-finalize``.
    :param auto_dismiss: go from ``concluded`` to ``null`` without ``job-dismiss``.
    :param txn: the transaction to join (a new one of its own by default).
    """

    job_type = "backup"

    def __init__(self, registry: "JobRegistry", job_id: str, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: JobTxn | None = None) -> None:
        self.registry = registry
        self.id = job_id
        self.speed = speed
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.pause_count = 0
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.started = False
        self.busy = False
        self.ret: str | None = None
        self.finished_run = False
        self.progress_current = 0
        self.progress_total = 0
        self.iostatus = "ok"
        self.txn: JobTxn | None = None
        (txn or JobTxn()).add(self)
        self._thread: threading.Thread | None = None
        self._drains: list[Any] = []
        self._lock = registry.lock
        self._cond = registry.cond

    # ----------------------------------------------------------- state machine
    def _transition(self, new: JobStatus) -> None:
        old = self.status
        if new not in JOB_STT[old]:
            raise JobError(f"Job '{self.id}': invalid transition {old.value} -> {new.value}")
        self.status = new
        if old is not new:
            self.registry.emit("JOB_STATUS_CHANGE", {"status": new.value, "id": self.id})
        self._cond.notify_all()

    def apply_verb(self, verb: JobVerb) -> None:
        """Refuse ``verb`` in the current state with QEMU's text."""
        if self.status not in JOB_VERB_TABLE[verb]:
            raise JobError(f"Job '{self.id}' in state '{self.status.value}' cannot accept "
                           f"command verb '{verb.value}'")

    def is_completed(self) -> bool:
        return self.status in _COMPLETED

    @property
    def should_pause(self) -> bool:
        return self.pause_count > 0 and not self.cancelled

    # ----------------------------------------------------------- lifecycle
    def create(self) -> None:
        """Register the job (``created`` event).  Called by the creator after checks."""
        with self._lock:
            self.registry._add(self)
            self._transition(JobStatus.CREATED)

    def early_fail(self) -> None:
        """Creation failed after ``created``: straight to ``null`` (job_early_fail)."""
        with self._lock:
            self._transition(JobStatus.NULL)
            self._drop()

    def start(self) -> None:
        """Start the job's worker thread (``running``; ``paused`` at once if a drain or a
        pause is pending, as QEMU's first pause point does)."""
        with self._lock:
            if self.status is not JobStatus.CREATED:
                return
            self.started = True
            self._transition(JobStatus.RUNNING)
            if self.should_pause:
                self._transition(JobStatus.PAUSED)
            self._thread = threading.Thread(target=self._worker, name=f"job-{self.id}",
                                            daemon=True)
            self._thread.start()

    def _worker(self) -> None:
        try:
            ret = self.run()
        except Exception as err:  # noqa: BLE001 - a job failure is reported, never raised
            ret = str(err) or type(err).__name__
        self.pause_point()      # a job drained right at its end completes after the drain
        with self._lock:
            self.busy = False
            self.finished_run = True
            self._completed(ret)

    def run(self) -> str | None:
        """The job's work (worker thread).  Call :meth:`pause_point` often."""
        raise NotImplementedError

    def pause_point(self) -> None:
        """Wait here while the job is paused (user pause or a drain); ``busy`` off."""
        with self._lock:
            if not self.should_pause:
                return
            self.busy = False
            self._cond.notify_all()
            while self.should_pause:
                self._cond.wait()
            if self.status is JobStatus.PAUSED:
                self._transition(JobStatus.RUNNING)
            elif self.status is JobStatus.STANDBY:
                self._transition(JobStatus.READY)

    def sleep(self, seconds: float) -> None:
        """Sleep (rate limit) but wake at once for cancel, pause or a speed change."""
        with self._lock:
            self.busy = False
            self._cond.notify_all()
            self._cond.wait(timeout=max(0.0, seconds))

    def set_busy(self) -> bool:
        """Mark the worker busy with I/O; ``False`` when it should stop or pause instead."""
        with self._lock:
            if self.cancelled or self.should_pause:
                return False
            self.busy = True
            return True

    # ----------------------------------------------------------- pause / resume
    def _apply_error_policy(self, policy: str, is_read: bool, err_no: int) -> str:
        """QEMU's block_job_error_action: pick the action for ``policy`` (enospc/auto stop
        only on ENOSPC), emit BLOCK_JOB_ERROR, and on ``stop`` pause the job with its
        iostatus set.  Returns the action (report, ignore, stop)."""
        if policy in ("enospc", "auto"):
            action = "stop" if err_no == errno.ENOSPC else "report"
        else:
            action = policy
        self.registry.emit("BLOCK_JOB_ERROR", {"device": self.id,
                                               "operation": "read" if is_read else "write",
                                               "action": action})
        if action == "stop":
            with self._lock:
                self.iostatus = "nospace" if err_no == errno.ENOSPC else "failed"
                if not self.user_paused:
                    self.user_paused = True
                    self._pause()
        return action

    def _pause(self) -> None:
        self.pause_count += 1
        if self.pause_count == 1 and self.started and not self.cancelled:
            if self.status is JobStatus.RUNNING:
                self._transition(JobStatus.PAUSED)
            elif self.status is JobStatus.READY:
                self._transition(JobStatus.STANDBY)

    def _resume(self) -> None:
        if self.pause_count == 0:
            return
        self.pause_count -= 1
        if self.pause_count == 0:
            if self.status is JobStatus.PAUSED:
                self._transition(JobStatus.RUNNING)
            elif self.status is JobStatus.STANDBY:
                self._transition(JobStatus.READY)
            self._cond.notify_all()

    def _wait_idle(self, timeout: float = SYNC_TIMEOUT) -> None:
        # a drained job must not be in the middle of a request
        self._cond.wait_for(lambda: not self.busy or self.is_completed(), timeout)

    # ----------------------------------------------------------- verbs
    def pause(self) -> None:
        """``block-job-pause`` / ``job-pause``."""
        with self._lock:
            self.apply_verb(JobVerb.PAUSE)
            if self.user_paused:
                raise JobError("Job is already paused")
            self.user_paused = True
            self._pause()

    def resume(self) -> None:
        """``block-job-resume`` / ``job-resume``."""
        with self._lock:
            if not self.user_paused:
                raise JobError("Can't resume a job that was not paused")
            self.apply_verb(JobVerb.RESUME)
            self.iostatus = "ok"
            self.user_paused = False
            self._resume()

    def set_speed(self, speed: int) -> None:
        """``block-job-set-speed``."""
        with self._lock:
            self.apply_verb(JobVerb.SET_SPEED)
            if speed < 0:
                raise JobError("Parameter 'speed' expects a non-negative value")
            self.speed = speed
            self._cond.notify_all()

    def complete(self) -> None:
        """``block-job-complete``: only jobs that reach ``ready`` (backup never does)."""
        with self._lock:
            self.apply_verb(JobVerb.COMPLETE)
            raise JobError(f"The active block job '{self.id}' cannot be completed")

    def finalize(self) -> None:
        """``block-job-finalize``: finish a ``pending`` transaction (auto-finalize off)."""
        with self._lock:
            self.apply_verb(JobVerb.FINALIZE)
            self._do_finalize()

    def dismiss(self) -> None:
        """``block-job-dismiss``: forget a ``concluded`` job."""
        with self._lock:
            self.apply_verb(JobVerb.DISMISS)
            self._do_dismiss()

    def cancel(self, force: bool = False, wait: float = SYNC_TIMEOUT) -> None:
        """``block-job-cancel``; waits (up to ``wait`` s) for the job to finish, so the
        events come before the reply, as QEMU's did in the recordings."""
        with self._lock:
            if self.user_paused and not force:
                raise JobError(f"The block job for device '{self.id}' is currently paused")
            self.apply_verb(JobVerb.CANCEL)
            self._cancel(force)
            if wait:
                self._cond.wait_for(lambda: self.status in (JobStatus.CONCLUDED, JobStatus.NULL)
                                    or not self.started, wait)

    def cancel_sync(self) -> None:
        """Cancel and wait until concluded (transaction abort, shutdown)."""
        with self._lock:
            if self.status is JobStatus.NULL:
                return
            self._cancel(True)
            self._cond.wait_for(lambda: self.status in (JobStatus.CONCLUDED, JobStatus.NULL),
                                SYNC_TIMEOUT)

    def _cancel(self, force: bool) -> None:
        if self.status is JobStatus.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            self._completed(None)
        elif self.finished_run and self.status in (JobStatus.WAITING, JobStatus.PENDING):
            # work done, waiting for its group or for job-finalize: abort the transaction
            self.ret = "Operation canceled"
            self._transition(JobStatus.ABORTING)
            self._txn_abort()
        else:
            self._cond.notify_all()

    def _cancel_async(self, force: bool) -> None:
        if self.user_paused:
            self.user_paused = False
            self.pause_count -= 1
        self.cancelled = True
        self.force_cancel |= force
        self._cond.notify_all()

    # ----------------------------------------------------------- completion
    def _completed(self, ret: str | None) -> None:
        if self.is_completed():
            return
        if ret is None and self.cancelled:
            ret = "Operation canceled"
        self.ret = ret
        if self.status is JobStatus.PAUSED:      # a paused job leaves its pause first
            self._transition(JobStatus.RUNNING)
        if ret is not None:
            self._transition(JobStatus.ABORTING)
            self._txn_abort()
        else:
            self._txn_success()

    def _txn_success(self) -> None:
        txn = self.txn
        assert txn is not None
        self._transition(JobStatus.WAITING)
        if not all(j.is_completed() for j in txn.jobs):
            return
        for j in list(txn.jobs):        # newest first, as QEMU's job_txn_apply
            if j.status is JobStatus.WAITING:
                j._transition(JobStatus.PENDING)
                if not j.auto_finalize:     # QEMU's job_event_pending
                    self.registry.emit("BLOCK_JOB_PENDING", {"type": j.job_type, "id": j.id})
        if all(j.auto_finalize for j in txn.jobs):
            self._do_finalize()

    def _txn_abort(self) -> None:
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return
        txn.aborting = True
        for other in txn.jobs:
            if other is not self:
                other._cancel_async(True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.is_completed():
                if not other.started:
                    other.ret = "Operation canceled"
                    other._transition(JobStatus.ABORTING)
                else:
                    self._cond.wait_for(other.is_completed, SYNC_TIMEOUT)
                    if not other.is_completed():    # stuck in I/O: give up on it
                        other.ret = other.ret or "Operation canceled"
                        other.status = JobStatus.ABORTING
            other._finalize_single()

    def _do_finalize(self) -> None:
        txn = self.txn
        assert txn is not None
        for j in list(txn.jobs):        # newest first (checked against QEMU 7.2)
            j._finalize_single()

    def _finalize_single(self) -> None:
        # job_update_rc(): a job cancelled after its work ended still ends as cancelled
        if self.ret is None and self.cancelled:
            self.ret = "Operation canceled"
        if self.ret is not None and self.status is not JobStatus.ABORTING:
            self._transition(JobStatus.ABORTING)
        if self.txn is not None and self in self.txn.jobs:
            self.txn.jobs.remove(self)
        try:
            if self.ret is None:
                self.commit()
            else:
                self.abort()
        finally:
            self.clean()
        if self.started:
            data = self.event_data()
            if self.cancelled and self.ret is not None:
                self.registry.emit("BLOCK_JOB_CANCELLED", data)
            else:
                if self.ret is not None:
                    data["error"] = self.ret
                self.registry.emit("BLOCK_JOB_COMPLETED", data)
        self._transition(JobStatus.CONCLUDED)
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        self._transition(JobStatus.NULL)
        self._drop()

    def _drop(self) -> None:
        self.registry._remove(self)
        if self.txn is not None and self in self.txn.jobs:
            self.txn.jobs.remove(self)

    # ----------------------------------------------------------- subclass hooks
    def commit(self) -> None:
        """The job succeeded (whole transaction): make its result permanent."""

    def abort(self) -> None:
        """The job (or its transaction) failed or was cancelled."""

    def clean(self) -> None:
        """Always after commit/abort: release what the job held."""

    def nodes(self) -> list[Any]:
        """Block nodes the job uses (a drain of any of them pauses it)."""
        return []

    def event_data(self) -> dict[str, Any]:
        """BLOCK_JOB_* event data, members in QEMU's order."""
        return {"device": self.id, "len": self.progress_total, "offset": self.progress_current,
                "speed": self.speed, "type": self.job_type}

    def block_job_info(self) -> dict[str, Any]:
        """``query-block-jobs`` entry, members in QEMU's order."""
        d: dict[str, Any] = {"auto-finalize": self.auto_finalize, "io-status": self.iostatus,
                             "device": self.id, "auto-dismiss": self.auto_dismiss,
                             "busy": self.busy, "len": self.progress_total,
                             "offset": self.progress_current, "status": self.status.value,
                             "paused": self.pause_count > 0, "speed": self.speed,
                             "ready": self.status in (JobStatus.READY, JobStatus.STANDBY),
                             "type": self.job_type}
        if self.ret is not None and not self.cancelled and self.status is JobStatus.CONCLUDED:
            d["error"] = self.ret
        return d

    def job_info(self) -> dict[str, Any]:
        """``query-jobs`` entry, members in QEMU's order."""
        d: dict[str, Any] = {"current-progress": self.progress_current,
                             "status": self.status.value,
                             "total-progress": self.progress_total, "type": self.job_type,
                             "id": self.id}
        if self.ret is not None and self.status is JobStatus.CONCLUDED:
            d["error"] = self.ret
        return d


def _uses(job: Job, nodes: list[Any]) -> bool:
    return any(any(n is m for m in nodes) for n in job.nodes())


class _Drain:
    """One drained section (its nodes; ``None``: everything)."""

    def __init__(self, nodes: list[Any] | None) -> None:
        self.nodes = nodes

    def covers(self, job: Job) -> bool:
        return self.nodes is None or _uses(job, self.nodes)


class JobRegistry:
    """The jobs of one machine.

    :param emit: ``emit(name, data)`` for JOB_STATUS_CHANGE and BLOCK_JOB_* events.
    """

    def __init__(self, emit: EmitFn | None = None) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self._jobs: list[Job] = []
        self._drains: list[_Drain] = []
        self._emit = emit

    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        if self._emit is not None:
            self._emit(name, data)

    def _add(self, job: Job) -> None:
        self._jobs.append(job)
        # a job created on drained nodes starts out paused by those drains
        for token in self._drains:
            if token.covers(job):
                job._drains.append(token)
                job._pause()

    def _remove(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def jobs(self) -> list[Job]:
        """Every job not yet dismissed, oldest first."""
        with self.lock:
            return list(self._jobs)

    def find(self, job_id: str) -> Job | None:
        """The job with id ``job_id`` (QMP's job verbs look jobs up here)."""
        with self.lock:
            for j in self._jobs:
                if j.id == job_id:
                    return j
            return None

    def check_new_id(self, job_id: str) -> None:
        """QEMU's job_create() id checks.

        :raises JobError: ``Invalid job ID '…'`` / ``Job ID '…' already in use``.
        """
        if not id_wellformed(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if self.find(job_id) is not None:
            raise JobError(f"Job ID '{job_id}' already in use")

    def query_block_jobs(self) -> list[dict[str, Any]]:
        """``query-block-jobs`` (newest first, as QEMU's job list)."""
        with self.lock:
            return [j.block_job_info() for j in reversed(self._jobs)]

    def query_jobs(self) -> list[dict[str, Any]]:
        """``query-jobs``."""
        with self.lock:
            return [j.job_info() for j in reversed(self._jobs)]

    def jobs_on(self, nodes: Iterable[Any]) -> list[Job]:
        """Jobs using any of ``nodes``."""
        wanted = [n for n in nodes if n is not None]
        with self.lock:
            return [j for j in self._jobs if _uses(j, wanted)]

    def drain_begin(self, nodes: Iterable[Any] | None = None) -> object:
        """QEMU's bdrv_drained_begin for jobs: pause every job using ``nodes`` (all jobs
        for ``None``), also jobs created on them before :meth:`drain_end`, and wait until
        none is in the middle of a request.  Returns the token for :meth:`drain_end`."""
        token = _Drain(None if nodes is None else [n for n in nodes if n is not None])
        with self.lock:
            self._drains.append(token)
            jobs = [j for j in self._jobs if token.covers(j)]
            for j in jobs:
                j._drains.append(token)
                j._pause()
            for j in jobs:
                j._wait_idle()
        return token

    def drain_end(self, token: object) -> None:
        """End a drained section begun with :meth:`drain_begin`."""
        with self.lock:
            if token in self._drains:
                self._drains.remove(token)
            for j in list(self._jobs):
                if token in j._drains:
                    j._drains.remove(token)
                    j._resume()

    def drain_all(self) -> None:
        """QEMU's bdrv_drain_all(): every job pauses and resumes (``paused``, ``running``)."""
        self.drain_end(self.drain_begin(None))

    def cancel_all(self) -> None:
        """Cancel every job and wait for them (machine shutdown)."""
        for j in self.jobs():
            try:
                j.cancel_sync()
            except BlockError:
                pass

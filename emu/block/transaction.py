"""Atomic transactions: the ``@action`` table and the prepare / commit / abort / clean run.

Each action type registers once with :func:`action`; its ``prepare(state)`` does the
visible work at once (QEMU 7.2 creates the internal snapshot, the overlay, the backup
target and job in prepare) and records how to finish it with ``state.on_commit``,
``state.on_abort`` and ``state.on_clean``.  :func:`run_transaction` runs the prepares in
order and stops at the first error; then either every commit in order, or every abort in
*reverse* order; then every clean in order (QEMU's qmp_transaction).  The caller runs it
inside one quiesce of the machine, so the guest sees one consistent cut.

Action implementations that need the machine (device names, the job registry) register
from the monitor layer (:mod:`emu.qmp.commands.transaction`); the ``abort`` action, which
needs nothing, registers here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from emu.errors import BlockError

__all__ = ["action", "ACTIONS", "ActionDef", "ActionState", "TransactionError",
           "run_transaction"]


class TransactionError(BlockError):
    """A transaction refused as a whole (QEMU's texts)."""


@dataclass
class ActionDef:
    """One row of the action table."""

    name: str
    prepare: Callable[["ActionState"], None]
    #: the action may run with ``completion-mode: grouped`` (only job-creating ones)
    grouped: bool = False


#: action type -> definition (QEMU 7.2's TransactionActionKind)
ACTIONS: dict[str, ActionDef] = {}


def action(name: str, grouped: bool = False) -> Callable[[Callable], Callable]:
    """Register ``prepare(state)`` as transaction action ``name``.

    :param grouped: whether ``completion-mode: grouped`` is supported (backup actions).
    """

    def deco(fn: Callable[["ActionState"], None]) -> Callable[["ActionState"], None]:
        ACTIONS[name] = ActionDef(name, fn, grouped)
        return fn

    return deco


@dataclass
class ActionState:
    """What one action's prepare sees and leaves behind.

    :ivar kind: the action type.
    :ivar data: the action's (already type-checked) arguments.
    :ivar env: whatever the caller passed (the monitor passes its command context).
    :ivar grouped: ``completion-mode`` is ``grouped``.
    :ivar txn: shared by all actions of one transaction (the job transaction for
        grouped completion lives here as ``txn["jobs"]``).
    """

    kind: str
    data: dict[str, Any]
    env: Any
    grouped: bool
    txn: dict[str, Any]
    commit_fns: list[Callable[[], None]] = field(default_factory=list)
    abort_fns: list[Callable[[], None]] = field(default_factory=list)
    clean_fns: list[Callable[[], None]] = field(default_factory=list)

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.commit_fns.append(fn)

    def on_abort(self, fn: Callable[[], None]) -> None:
        self.abort_fns.append(fn)

    def on_clean(self, fn: Callable[[], None]) -> None:
        self.clean_fns.append(fn)

    def check_completion_mode(self) -> None:
        """QEMU's action_check_completion_mode()."""
        if self.grouped and not ACTIONS[self.kind].grouped:
            raise TransactionError(f"Action '{self.kind}' does not support Transaction "
                                   "property completion-mode = grouped")


def run_transaction(actions: list[tuple[str, dict[str, Any]]], env: Any = None, *,
                    grouped: bool = False) -> None:
    """Run ``actions`` (``(type, data)`` pairs) atomically.

    :raises Exception: the first failing prepare's error, after every action already
        prepared was aborted (reverse order) and cleaned.
    """
    txn: dict[str, Any] = {}
    done: list[ActionState] = []
    try:
        try:
            for kind, data in actions:
                if kind not in ACTIONS:
                    raise TransactionError(f"Parameter 'type' does not accept value '{kind}'")
                st = ActionState(kind, data, env, grouped, txn)
                done.append(st)     # a failing prepare is aborted and cleaned too
                ACTIONS[kind].prepare(st)
        except BaseException:
            for st in reversed(done):
                for fn in reversed(st.abort_fns):
                    fn()
            raise
        for st in done:
            for fn in st.commit_fns:
                fn()
    finally:
        for st in done:
            for fn in st.clean_fns:
                fn()


@action("abort")
def _abort_prepare(state: ActionState) -> None:
    """The ``abort`` action: always fails (tests use it to force a rollback)."""
    raise TransactionError("Transaction aborted using Abort action")

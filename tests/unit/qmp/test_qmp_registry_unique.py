"""The QMP command table holds each name once: a second ``@command`` for a name is refused,
and the job/transaction commands are the ones :mod:`.jobs` / :mod:`.transaction` register."""

from __future__ import annotations

import pytest

from emu.qmp.commands import COMMANDS, command, load_all
from emu.qmp.schema import STR


def test_duplicate_registration_is_refused() -> None:
    load_all()
    before = COMMANDS["query-status"]
    with pytest.raises(ValueError, match="'query-status' is already registered by "
                                         "emu.qmp.commands.core"):
        command("query-status", args=[("device", STR)])(lambda ctx, device: {})
    assert COMMANDS["query-status"] is before        # the first one is untouched


def test_job_and_transaction_commands_registered_once_where_they_run() -> None:
    cmds = load_all()
    assert cmds["drive-backup"].fn.__module__ == "emu.qmp.commands.jobs"
    assert cmds["blockdev-backup"].fn.__module__ == "emu.qmp.commands.jobs"
    assert cmds["transaction"].fn.__module__ == "emu.qmp.commands.transaction"
    assert cmds["drive-backup"].features == ("deprecated",)
    import emu.qmp.commands.block as block

    assert not hasattr(block, "_delegate")
    # a fresh import of every module (what a second load_all does) registers nothing twice
    assert len(load_all()) == len(cmds)

"""``human-monitor-command``: HMP text commands over QMP (see :mod:`emu.qmp.hmp`)."""

from __future__ import annotations

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, command
from emu.qmp.schema import INT, STR


@command("human-monitor-command", args=[("command-line", STR), ("?cpu-index", INT)],
         returns=STR, features=("savevm-monitor-nodes",))
def human_monitor_command(ctx: CommandContext, command_line: str,
                          cpu_index: int | None = None) -> str:
    from emu.qmp.hmp import run_hmp

    if cpu_index is not None and cpu_index != 0:    # emu has one CPU, index 0
        raise QmpError("Parameter 'cpu-index' expects a CPU number")
    return run_hmp(ctx.machine, command_line)

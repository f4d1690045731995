"""The QMP monitor, byte-compatible with QEMU 7.2.

Which module owns what:

- :mod:`emu.qmp.json`      QEMU's JSON dialect: lexer/streamer/parser with QEMU's error
                           texts, and the writer (QDict member order, ``\\uXXXX``, ``%.17g``)
- :mod:`emu.qmp.schema`    QAPI-style types: argument checking with QEMU's texts, and the
                           ``query-qmp-schema`` introspection builder
- :mod:`emu.qmp.protocol`  greeting, negotiation, oob, dispatch, sessions, the server that
                           serves every monitor on one I/O loop and fans events out
- :mod:`emu.qmp.greeting`  the greeting as constant bytes, importable before anything else
                           (the launcher greets before the monitor is imported)
- :mod:`emu.qmp.errors`    error classes and the error reply shape
- :mod:`emu.qmp.events`    the table of events emu emits (for introspection)
- :mod:`emu.qmp.commands`  the ``@command`` registry: ``core`` (run state, version, schema),
                           ``hmp`` (human-monitor-command), ``block`` (queries, snapshots,
                           blockdev-add/-del, job verbs, transaction)
- :mod:`emu.qmp.hmp`       HMP commands (``info block``, ``info snapshots``, ``qemu-io`` …)
                           and the readline monitor (``-monitor``)

The monitor talks to the machine only (:class:`emu.machine.pc.Machine`).
"""

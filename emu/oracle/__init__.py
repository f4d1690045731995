"""The consistency oracle: proves a snapshot holds exactly the writes a guest saw completed.

Package map (user documentation: ``emu/oracle/README.md``):

- ``records`` - reference decoder of the diskwriter guest's on-disk records and serial log
  (spec: ``guest-images/diskwriter/FORMAT.md``; owned by the diskwriter engineer).
- ``cuts`` - the cut report: ``Machine.quiesce()`` records per-device completed-write counters
  after the drain (:class:`~emu.oracle.cuts.CutLog`); QMP ``x-emu-query-cuts`` lists them.
- ``images`` - reads the data area of an image's active layer (through its backing chain) or of
  an internal qcow2 snapshot (its own L1/L2 tables).
- ``check`` - the oracle proper: :func:`~emu.oracle.check.check` (log + images + optional cut
  -> :class:`~emu.oracle.check.OracleResult` with per-violation detail).
- ``cli`` - the ``emu-oracle`` command (also ``python -m emu.oracle``).
"""

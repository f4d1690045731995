"""The consistency oracle: proves a snapshot holds exactly the writes a guest saw completed.

Package map:

- ``records`` - reference decoder of the diskwriter guest's on-disk records and serial log
  (spec: ``guest-images/diskwriter/FORMAT.md``).

The oracle proper (reading snapshots / overlays / backup targets of a transaction plus the log,
and checking the cut) builds on ``records``.
"""

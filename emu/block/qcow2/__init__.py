"""qcow2 (QEMU docs/interop/qcow2.txt), split by concern as QEMU splits it.

- :mod:`.format`   -- on-disk constants, structs, header/extension/snapshot-table parse and serialise.
- :mod:`.cache`    -- write-back table cache (L2 tables, refcount blocks), flushed in dependency order.
- :mod:`.refcount` -- refcount table/blocks: lookup, update, cluster allocation, free.
- :mod:`.cluster`  -- guest offset -> host cluster mapping (L1/L2), allocation with COW, zero and
  compressed clusters, discard.
- :mod:`.snapshot` -- internal snapshots: create, delete, list, goto.
- :mod:`.driver`   -- :class:`Qcow2Driver`: open (validation against hostile input), read/write,
  flush, dirty bit, lazy refcounts, image info; registered as format ``qcow2``.
- :mod:`.create`   -- image creation with qemu-img's options and layout.
- ``check.py`` (owned by the check engineer) -- consistency check and repair.
"""

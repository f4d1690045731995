"""The block layer: image formats, the node graph, and the BlockBackend devices see.

Map:

- :mod:`emu.block.api` -- :class:`BlockBackend`, the only interface devices and jobs use
  (sync and async I/O, in-flight count, drain/resume).
- :mod:`emu.block.node` -- :class:`BlockDriverState` nodes, :class:`BlockGraph` (node names,
  backing chains, image locking), the driver registry (``@register_driver``) and format probing.
- :mod:`emu.block.drivers` -- protocol/format drivers: ``file``, ``raw``, ``blkdebug``.
- :mod:`emu.block.qcow2` -- the qcow2 format driver (see its docstring for its own map).
- :mod:`emu.block.overlay` -- external overlays, rebase, commit (library functions for QMP/emu-img).
"""

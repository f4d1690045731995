"""emu: a QEMU-compatible x86 PC written in Python on the Unicorn CPU engine.

The package map (imports point down only; see docs/architecture.md):

- :mod:`emu.cli`      QEMU's command line -> :class:`emu.machine.config.MachineConfig`
- :mod:`emu.qmp`      the QMP monitor (protocol, commands, events)
- :mod:`emu.machine`  the PC as a whole: threads, run state, the facade QMP uses
- :mod:`emu.cpu`      the vCPU on Unicorn: run loop, interrupt/exception delivery
- :mod:`emu.hw`       guest-visible devices on an overlap-checked bus
- :mod:`emu.block`    block layer: nodes, drivers (file, raw, qcow2, blkdebug), jobs
- :mod:`emu.img`      ``emu-img``, qemu-img's command line on the block layer
"""

__version__ = "0.1.0"

"""The PC as a whole.

- :mod:`emu.machine.config`  dataclasses the command line fills (drives, devices, chardevs,
                             monitors) and QEMU's drive naming
- :mod:`emu.machine.pc`      :class:`~emu.machine.pc.Machine`: run states, events, guest
                             requests, ``quiesce()``, the attach points for vCPU and devices
- :mod:`emu.machine.drives`  opens ``-drive``/``-blockdev`` through the block layer into
                             named block devices
- :mod:`emu.machine.hardware` builds clock, board, vCPU, BIOS and disk controllers from the
                             config and attaches them to the Machine (``build_hardware``)
"""

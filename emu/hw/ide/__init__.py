"""PIIX3 IDE: the PCI function, the ATA command set and bus-master DMA.

Which module owns what:

* :mod:`emu.hw.ide.ata` — register bits, opcodes, IDENTIFY DEVICE words and the CHS
  geometry guess, exactly as QEMU 7.2 reports them;
* :mod:`emu.hw.ide.core` — :class:`IdeDrive` (one device's task file and PIO buffer) and
  :class:`IdeChannel` (two devices, the legacy ports, the command table ``@command``);
* :mod:`emu.hw.ide.bmdma` — :class:`DmaMemory` (guest RAM as DMA sees it) and the
  bus-master engine (PRD tables, scatter/gather, interrupt and error bits);
* :mod:`emu.hw.ide.piix` — :class:`PiixIde`, PCI function 8086:7010 with BAR4 and the
  legacy decode rules, and :func:`attach_piix_ide` for the board.

Storage is reached only through :class:`emu.block.api.BlockBackend` ``aio_*`` requests.
"""

from emu.hw.ide.bmdma import DmaMemory
from emu.hw.ide.core import IdeChannel, IdeDrive
from emu.hw.ide.piix import PiixIde, attach_piix_ide, drives_for

__all__ = ["DmaMemory", "IdeChannel", "IdeDrive", "PiixIde", "attach_piix_ide", "drives_for"]

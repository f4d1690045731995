"""virtio devices: split virtqueues, the PCI transport, the block device.

Which module owns what:

* :mod:`emu.hw.virtio.virtqueue` — :class:`GuestMemory` (guest RAM for device DMA, code
  invalidation after writes) and :class:`VirtQueue` (split rings, indirect descriptors,
  event-idx, every hostile-queue check);
* :mod:`emu.hw.virtio.device` — :class:`VirtioDevice`: status state machine, feature
  negotiation, ISR, reset, DEVICE_NEEDS_RESET on guest faults;
* :mod:`emu.hw.virtio.blk` — :class:`VirtioBlk`: virtio-blk requests and configuration as
  QEMU 7.2, host I/O through ``BlockBackend.aio_*``;
* :mod:`emu.hw.virtio.pci` — :class:`VirtioPciFunction`: legacy I/O BAR0 and modern
  capabilities + BAR4 (QEMU's ``disable-legacy`` / ``disable-modern``), INTx, and
  :func:`attach_virtio_blk` for the board, :func:`virtio_blk_pci_options` for ``-device`` properties.
"""

from emu.hw.virtio.blk import VirtioBlk
from emu.hw.virtio.device import VirtioDevice
from emu.hw.virtio.pci import VirtioPciFunction, attach_virtio_blk, virtio_blk_pci_options
from emu.hw.virtio.virtqueue import GuestMemory, VirtQueue, VirtQueueError

__all__ = ["GuestMemory", "VirtQueue", "VirtQueueError", "VirtioBlk", "VirtioDevice",
           "VirtioPciFunction", "attach_virtio_blk", "virtio_blk_pci_options"]

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

Wiring (what the machine does for each ``-device virtio-blk-pci`` / ``-drive if=virtio``)::

    opts = virtio_blk_pci_options(dev.props)          # QEMU's checks and messages
    fn = attach_virtio_blk(board, GuestMemory.from_vcpu(cpu), backend, slot, name=dev_id, **opts)

Where emu differs from QEMU 7.2 on purpose:

* no MSI-X (the board has no local APIC to deliver it): configuration space is QEMU's with
  ``vectors=0``; the device interrupts through INTx;
* a well-formed chain whose data buffers lie outside RAM gets VIRTIO_BLK_S_IOERR (QEMU
  stops the device with DEVICE_NEEDS_RESET); malformed chains need a reset as in QEMU;
* bus mastering is not enforced (QEMU's DMA fails while it is off); legacy DRIVER_OK
  turns it on, as QEMU does;
* a device reset does not wait for requests in flight (QEMU drains them): their
  completions are dropped, so none touches RAM the driver has reused;
* one queue only (``num-queues`` > 1 is refused);
* writes of ring metadata and status bytes do not invalidate translated code (data do).
"""

from emu.hw.virtio.blk import VirtioBlk
from emu.hw.virtio.device import VirtioDevice
from emu.hw.virtio.pci import VirtioPciFunction, attach_virtio_blk, virtio_blk_pci_options
from emu.hw.virtio.virtqueue import GuestMemory, VirtQueue, VirtQueueError

__all__ = ["GuestMemory", "VirtQueue", "VirtQueueError", "VirtioBlk", "VirtioDevice",
           "VirtioPciFunction", "attach_virtio_blk", "virtio_blk_pci_options"]

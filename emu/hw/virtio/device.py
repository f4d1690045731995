"""The transport-independent half of a virtio device (VIRTIO 1.x §2, §3).

:class:`VirtioDevice` holds the device status, the offered and accepted feature bits,
the virtqueues, the interrupt status (ISR) and the device-specific configuration.  A
transport (:mod:`emu.hw.virtio.pci`) maps registers onto these and gives the device an
``irq(level)`` callable for its interrupt pin.

Status state machine (§2.1): 0 (reset) -> ACKNOWLEDGE -> DRIVER -> FEATURES_OK ->
DRIVER_OK; writing 0 resets the device.  Features written after FEATURES_OK are
ignored, and accepted features are the written ones masked by the offered ones, as
QEMU's ``virtio_set_features`` does.

A guest fault that leaves the device unable to go on (QEMU's ``virtio_error``) marks it
broken: queue notifications are ignored until the next reset, and with VIRTIO_F_VERSION_1
negotiated DEVICE_NEEDS_RESET is set in the status and a configuration-change interrupt
raised (§2.1.1).  The machine keeps running.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from emu.hw.virtio.virtqueue import GuestMemory, VirtQueue, VirtQueueError

log = logging.getLogger(__name__)

# Device status bits (§2.1).
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Reserved feature bits (§6).
VIRTIO_F_NOTIFY_ON_EMPTY = 24  # legacy only
VIRTIO_F_ANY_LAYOUT = 27  # legacy only
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_BAD_FEATURE = 30  # legacy: QEMU offers it so a driver that acks everything is caught
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_RESET = 40

# ISR status bits (§4.1.4.5).
VIRTIO_ISR_QUEUE = 0x1
VIRTIO_ISR_CONFIG = 0x2

#: Features every QEMU 7.2 virtio device offers (DEFINE_VIRTIO_COMMON_FEATURES plus the
#: legacy-only ones the PCI transport adds); the transport drops those its interface lacks.
COMMON_FEATURES = (1 << VIRTIO_F_NOTIFY_ON_EMPTY | 1 << VIRTIO_F_ANY_LAYOUT | 1 << VIRTIO_RING_F_INDIRECT_DESC
                   | 1 << VIRTIO_RING_F_EVENT_IDX)
#: bits only a legacy (pre-1.0) driver may see
LEGACY_ONLY_FEATURES = 1 << VIRTIO_F_NOTIFY_ON_EMPTY | 1 << VIRTIO_F_ANY_LAYOUT | 1 << VIRTIO_F_BAD_FEATURE


class VirtioDevice:
    """Base of virtio device models.

    :param device_id: the virtio device ID (2 for block).
    :param memory: guest RAM for the rings and buffers.
    :param num_queues: how many virtqueues.
    :param queue_size: their maximum (offered) size.
    :param config_size: bytes of device-specific configuration.
    """

    def __init__(self, device_id: int, memory: GuestMemory, num_queues: int, queue_size: int,
                 config_size: int) -> None:
        self.device_id = device_id
        self.memory = memory
        self.config_size = config_size
        self.queues = [VirtQueue(memory, queue_size) for _ in range(num_queues)]
        #: held for every state change: the vCPU thread (registers, notify) and block
        #: completion threads (used ring, ISR) meet here
        self.lock = threading.RLock()
        self.irq: Callable[[bool], None] = lambda level: None
        self.host_features = 0
        self.set_interfaces(True, True)  # the transport calls it again with its interfaces
        self.status = 0
        self.guest_features = 0
        self.isr = 0
        self.config_generation = 0
        self.broken = False
        #: bumped at every reset: completions of requests issued before it are dropped
        self.generation = 0

    # ---- features ---------------------------------------------------------------------
    def device_features(self, modern: bool) -> int:
        """Device-specific feature bits (subclasses); ``modern``: VERSION_1 will be offered."""
        return 0

    def set_interfaces(self, legacy: bool, modern: bool) -> None:
        """Fix the offered features for the transport's interfaces (called once by it).

        ``host_features`` holds every bit, as QEMU's ``vdev->host_features``; the modern
        interface hides :data:`LEGACY_ONLY_FEATURES` (see :meth:`modern_features`).
        """
        features = COMMON_FEATURES | 1 << VIRTIO_F_BAD_FEATURE | self.device_features(modern)
        if modern:
            features |= 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_RESET
        self.host_features = features

    def modern_features(self) -> int:
        """The feature bits the modern interface shows."""
        return self.host_features & ~LEGACY_ONLY_FEATURES

    def has_feature(self, bit: int) -> bool:
        """Whether the driver accepted feature ``bit``."""
        return bool(self.guest_features >> bit & 1)

    def set_guest_features(self, value: int) -> None:
        """The driver's accepted features (ignored after FEATURES_OK; unknown bits dropped)."""
        with self.lock:
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                return
            if value >> VIRTIO_F_BAD_FEATURE & 1 and not value >> VIRTIO_F_VERSION_1 & 1:
                value = 0  # QEMU: a legacy driver that acked the bad feature gets none
            self.guest_features = value & self.host_features
            for vq in self.queues:
                vq.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
            self.features_changed()

    def features_changed(self) -> None:
        """Hook: ``guest_features`` changed."""

    # ---- status -------------------------------------------------------------------------
    def set_status(self, value: int) -> None:
        """Driver write of the device status; 0 resets the device."""
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            old = self.status
            self.status = value
            if value & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
                self.driver_ok()

    def driver_ok(self) -> None:
        """Hook: the driver set DRIVER_OK."""

    def reset(self) -> None:
        """Device reset (§2.4): status, features, queues, ISR and INTx back to power-on."""
        with self.lock:
            self.generation += 1
            self.status = 0
            self.guest_features = 0
            self.broken = False
            for vq in self.queues:
                vq.reset()
            self.isr = 0
            self.irq(False)
            self.device_reset()

    def device_reset(self) -> None:
        """Hook: device-specific reset."""

    # ---- interrupts ---------------------------------------------------------------------
    def raise_isr(self, bits: int) -> None:
        """Set ISR ``bits`` and assert the interrupt."""
        with self.lock:
            self.isr |= bits
            self.irq(True)

    def read_isr(self) -> int:
        """Read-and-clear ISR, which lowers the interrupt (§4.1.4.5)."""
        with self.lock:
            value = self.isr
            self.isr = 0
            self.irq(False)
            return value

    def config_changed(self) -> None:
        """Tell the driver the configuration changed (e.g. after a resize)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
                self.raise_isr(VIRTIO_ISR_CONFIG)

    def virtio_error(self, message: str) -> None:
        """A guest fault the device cannot recover from: stop and ask for a reset."""
        with self.lock:
            log.warning("virtio device %d: %s", self.device_id, message)
            self.broken = True
            if self.has_feature(VIRTIO_F_VERSION_1):
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
                self.raise_isr(VIRTIO_ISR_CONFIG)

    def notify_queue(self, vq: VirtQueue) -> None:
        """Interrupt the driver for ``vq`` if it wants one (event-idx / NO_INTERRUPT)."""
        try:
            want = vq.should_notify(self.has_feature(VIRTIO_F_NOTIFY_ON_EMPTY))
        except VirtQueueError as err:
            self.virtio_error(str(err))
            return
        if want:
            self.raise_isr(VIRTIO_ISR_QUEUE)

    # ---- queues -------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index`` (vCPU thread)."""
        with self.lock:
            if self.broken or not 0 <= index < len(self.queues):
                return
            vq = self.queues[index]
            if not vq.ready:
                return
            if not vq.rings_valid():
                self.virtio_error(f"queue {index} rings are outside RAM")
                return
            self.handle_queue(vq)

    def handle_queue(self, vq: VirtQueue) -> None:
        """Process what the driver made available (subclasses; lock held)."""

    def reset_queue(self, index: int) -> None:
        """VIRTIO_F_RING_RESET: forget queue ``index``'s rings (in-flight requests are dropped:
        the generation moves on, so their completions never touch the old rings)."""
        with self.lock:
            if 0 <= index < len(self.queues):
                self.generation += 1  # one generation for all queues: virtio-blk has one
                vq = self.queues[index]
                vq.reset()
                vq.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)

    # ---- configuration ------------------------------------------------------------------
    def get_config(self) -> bytes:
        """The device-specific configuration (``config_size`` bytes)."""
        return bytes(self.config_size)

    def set_config(self, offset: int, data: bytes) -> None:
        """Driver write into the device-specific configuration."""

    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes of configuration; past its end reads all ones (as QEMU)."""
        with self.lock:
            cfg = self.get_config()
        if offset < 0 or offset + size > len(cfg):
            return (1 << (8 * size)) - 1
        return int.from_bytes(cfg[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of configuration (ignored past its end)."""
        if offset < 0 or offset + size > self.config_size:
            return
        with self.lock:
            self.set_config(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

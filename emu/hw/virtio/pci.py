"""virtio over PCI (VIRTIO 1.x §4.1): QEMU 7.2's ``virtio-*-pci`` transport.

Interfaces (QEMU's ``disable-legacy`` / ``disable-modern``; the pc machine's default is
transitional, both on):

* **legacy** (§4.1.4.10): I/O BAR0 (128 bytes for virtio-blk) with the pre-1.0 registers
  below, device configuration at offset 20 (no MSI-X);
* **modern**: 64-bit prefetchable memory BAR4 of 16 KiB holding common configuration
  (0x0000), ISR (0x1000), device configuration (0x2000) and notifications (0x3000,
  ``notify_off_multiplier`` 4, queue N at 4*N), described by vendor capabilities
  (0x40 common, 0x50 ISR, 0x60 device, 0x70 notify, 0x84 PCI configuration access).

IDs as QEMU: transitional 1AF4:1001 revision 0 with subsystem 1AF4:0002 (the virtio
device ID); modern-only 1AF4:1042 revision 1 with subsystem 1AF4:1100; class 0x010000.

Registers decode by offset whatever the access width, like QEMU's
``virtio_ioport_read``/``virtio_pci_common_read``; unknown offsets read 0xFFFFFFFF
(legacy) or 0 (modern).

MSI-X is not implemented (the board has no local APIC to deliver it): the configuration
space is QEMU's with ``vectors=0`` (no MSI-X capability or BAR1), vector registers read
VIRTIO_MSI_NO_VECTOR, and the device interrupts through INTx (ISR bit 0 for queues, bit 1
for configuration changes; reading ISR clears it and lowers the pin).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from emu.errors import ConfigError
from emu.hw.pci.device import PCI_COMMAND, PCI_COMMAND_MASTER, PciFunction
from emu.hw.virtio.device import VIRTIO_CONFIG_S_DRIVER_OK, VirtioDevice

log = logging.getLogger(__name__)

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_DEVICE_ID_VIRTIO_10_BASE = 0x1040
#: transitional device IDs by virtio device ID (block = 2 -> 0x1001)
PCI_LEGACY_DEVICE_ID = {1: 0x1000, 2: 0x1001, 3: 0x1003, 4: 0x1005, 8: 0x1004, 9: 0x1009}
PCI_CLASS_STORAGE_SCSI = 0x0100
PCI_SUBDEVICE_ID_QEMU = 0x1100
VIRTIO_PCI_ABI_VERSION = 0
PCI_CAP_ID_VNDR = 0x09
VIRTIO_QUEUE_MAX = 1024
VIRTIO_NO_VECTOR = 0xFFFF

# Legacy I/O registers (§4.1.4.10, without MSI-X).
VIRTIO_PCI_HOST_FEATURES = 0
VIRTIO_PCI_GUEST_FEATURES = 4
VIRTIO_PCI_QUEUE_PFN = 8
VIRTIO_PCI_QUEUE_NUM = 12
VIRTIO_PCI_QUEUE_SEL = 14
VIRTIO_PCI_QUEUE_NOTIFY = 16
VIRTIO_PCI_STATUS = 18
VIRTIO_PCI_ISR = 19
VIRTIO_PCI_CONFIG_OFF = 20
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12

# Common configuration structure (struct virtio_pci_common_cfg, §4.1.4.3).
VIRTIO_PCI_COMMON_DFSELECT = 0x00
VIRTIO_PCI_COMMON_DF = 0x04
VIRTIO_PCI_COMMON_GFSELECT = 0x08
VIRTIO_PCI_COMMON_GF = 0x0C
VIRTIO_PCI_COMMON_MSIX = 0x10
VIRTIO_PCI_COMMON_NUMQ = 0x12
VIRTIO_PCI_COMMON_STATUS = 0x14
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15
VIRTIO_PCI_COMMON_Q_SELECT = 0x16
VIRTIO_PCI_COMMON_Q_SIZE = 0x18
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E
VIRTIO_PCI_COMMON_Q_DESCLO = 0x20
VIRTIO_PCI_COMMON_Q_DESCHI = 0x24
VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28
VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2C
VIRTIO_PCI_COMMON_Q_USEDLO = 0x30
VIRTIO_PCI_COMMON_Q_USEDHI = 0x34
VIRTIO_PCI_COMMON_Q_RESET = 0x3A

# Capability types (§4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# QEMU's layout of the modern memory BAR.
MODERN_MEM_BAR = 4
MODERN_REGION_SIZE = 0x1000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
MODERN_BAR_SIZE = 0x4000
NOTIFY_OFF_MULTIPLIER = 4
LEGACY_IO_BAR = 0

_CAP = struct.Struct("<BBBBBBBBII")  # vndr, next, len, cfg_type, bar, id, pad, pad, offset, length


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _LegacyBar:
    """BAR0: the legacy register block and device configuration."""

    io_max_size = 4

    def __init__(self, fn: "VirtioPciFunction") -> None:
        self.fn = fn
        self.name = f"{fn.name} legacy"

    def io_read(self, offset: int, size: int) -> int:
        return self.fn.legacy_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.fn.legacy_write(offset, size, value)


class _ModernBar:
    """BAR4: common, ISR, device and notify regions."""

    def __init__(self, fn: "VirtioPciFunction") -> None:
        self.fn = fn
        self.name = f"{fn.name} modern"

    def io_read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.io_read(offset, 4) | self.io_read(offset + 4, 4) << 32
        return self.fn.modern_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.io_write(offset, 4, value & 0xFFFFFFFF)
            self.io_write(offset + 4, 4, value >> 32)
            return
        self.fn.modern_write(offset, size, value)


class VirtioPciFunction(PciFunction):
    """A virtio device behind QEMU's PCI transport.

    :param device: the device model (e.g. :class:`~emu.hw.virtio.blk.VirtioBlk`).
    :param disable_legacy: QEMU's ``disable-legacy`` (False: legacy I/O BAR0 present).
    :param disable_modern: QEMU's ``disable-modern`` (False: modern capabilities + BAR4).
    :param name: label for logs and bus registrations (the device id).
    :raises ConfigError: with both interfaces disabled (QEMU's message).
    """

    def __init__(self, device: VirtioDevice, disable_legacy: bool = False, disable_modern: bool = False,
                 name: str | None = None) -> None:
        legacy, modern = not disable_legacy, not disable_modern
        if not legacy and not modern:
            raise ConfigError("device cannot work as neither modern nor legacy mode is enabled")
        dev_id = device.device_id
        if legacy:
            pci_id, revision, subsys = PCI_LEGACY_DEVICE_ID.get(dev_id, 0x1000), VIRTIO_PCI_ABI_VERSION, dev_id
        else:
            pci_id, revision, subsys = PCI_DEVICE_ID_VIRTIO_10_BASE + dev_id, 1, PCI_SUBDEVICE_ID_QEMU
        super().__init__(PCI_VENDOR_ID_REDHAT_QUMRANET, pci_id, PCI_CLASS_STORAGE_SCSI << 8,
                         revision=revision, interrupt_pin=1,
                         subsystem_vendor_id=PCI_VENDOR_ID_REDHAT_QUMRANET, subsystem_id=subsys,
                         name=name or f"virtio-pci-{dev_id}")
        self.device = device
        self.legacy = legacy
        self.modern = modern
        device.set_interfaces(legacy, modern)
        device.irq = self.set_intx
        self.dfselect = 0
        self.gfselect = 0
        self.guest_features_words = [0, 0]
        self.queue_sel = 0
        if legacy:
            self.add_bar(LEGACY_IO_BAR, _pow2ceil(VIRTIO_PCI_CONFIG_OFF + device.config_size),
                         _LegacyBar(self), io=True)
        self.pci_cfg_cap: int | None = None
        if modern:
            self.add_bar(MODERN_MEM_BAR, MODERN_BAR_SIZE, _ModernBar(self), io=False, mem64=True, prefetch=True)
            for cfg_type, off in ((VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET), (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET),
                                  (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET)):
                self._vendor_cap(cfg_type, MODERN_MEM_BAR, off, MODERN_REGION_SIZE, 16)
            cap = self._vendor_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, MODERN_MEM_BAR, NOTIFY_OFFSET,
                                   NOTIFY_OFF_MULTIPLIER * VIRTIO_QUEUE_MAX, 20)
            struct.pack_into("<I", self.config, cap + 16, NOTIFY_OFF_MULTIPLIER)
            # VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through configuration space
            cap = self._vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 20)
            self.pci_cfg_cap = cap
            for i in list(range(cap + 4, cap + 5)) + list(range(cap + 8, cap + 20)):
                self.wmask[i] = 0xFF  # bar, offset, length, pci_cfg_data

    def _vendor_cap(self, cfg_type: int, bar: int, offset: int, length: int, size: int) -> int:
        cap = self.add_capability(PCI_CAP_ID_VNDR, size)
        nxt = self.config[cap + 1]
        _CAP.pack_into(self.config, cap, PCI_CAP_ID_VNDR, nxt, size, cfg_type, bar, 0, 0, 0, offset, length)
        return cap

    # ---- PCI ----------------------------------------------------------------------------
    def reset(self) -> None:
        """System reset: PCI configuration and the virtio device."""
        super().reset()
        self._transport_reset()
        self.device.reset()

    def _transport_reset(self) -> None:
        self.dfselect = self.gfselect = 0
        self.guest_features_words = [0, 0]
        self.queue_sel = 0

    def config_read_hook(self, offset: int, size: int) -> None:
        cap = self.pci_cfg_cap
        if cap is not None and offset < cap + 20 and offset + size > cap + 16:
            # reading pci_cfg_data performs the access it describes (QEMU's virtio_read_config)
            off, length = struct.unpack_from("<II", self.config, cap + 8)
            if length in (1, 2, 4):
                value = self.modern_read(off, length) if off + length <= MODERN_BAR_SIZE else 0
                struct.pack_into("<I", self.config, cap + 16, value & ((1 << (8 * length)) - 1))

    def config_written(self, offset: int, size: int, value: int) -> None:
        cap = self.pci_cfg_cap
        if cap is not None and offset < cap + 20 and offset + size > cap + 16:
            off, length, data = struct.unpack_from("<III", self.config, cap + 8)
            if length in (1, 2, 4) and off + length <= MODERN_BAR_SIZE:
                self.modern_write(off, length, data & ((1 << (8 * length)) - 1))

    # ---- shared register semantics --------------------------------------------------------
    def _vq(self):  # type: ignore[no-untyped-def]
        q = self.device.queues
        return q[self.queue_sel] if self.queue_sel < len(q) else None

    def _set_status(self, value: int, legacy: bool) -> None:
        dev = self.device
        if legacy and value & VIRTIO_CONFIG_S_DRIVER_OK and not self.command & PCI_COMMAND_MASTER:
            # old Linux drove legacy devices without enabling bus mastering; QEMU sets it for them
            self.config_write(PCI_COMMAND, 2, self.command | PCI_COMMAND_MASTER)
        dev.set_status(value & 0xFF)
        if dev.status == 0:
            self._transport_reset()

    # ---- legacy interface -----------------------------------------------------------------
    def legacy_read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        dev = self.device
        if offset >= VIRTIO_PCI_CONFIG_OFF:
            return dev.config_read(offset - VIRTIO_PCI_CONFIG_OFF, size)
        with dev.lock:
            vq = self._vq()
            if offset == VIRTIO_PCI_HOST_FEATURES:
                val = dev.host_features & 0xFFFFFFFF
            elif offset == VIRTIO_PCI_GUEST_FEATURES:
                val = dev.guest_features & 0xFFFFFFFF
            elif offset == VIRTIO_PCI_QUEUE_PFN:
                val = vq.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT if vq is not None else 0
            elif offset == VIRTIO_PCI_QUEUE_NUM:
                val = vq.size if vq is not None else 0
            elif offset == VIRTIO_PCI_QUEUE_SEL:
                val = self.queue_sel
            elif offset == VIRTIO_PCI_STATUS:
                val = dev.status
            elif offset == VIRTIO_PCI_ISR:
                val = dev.read_isr()
            else:
                val = 0xFFFFFFFF
        return val & mask

    def legacy_write(self, offset: int, size: int, value: int) -> None:
        dev = self.device
        if offset >= VIRTIO_PCI_CONFIG_OFF:
            dev.config_write(offset - VIRTIO_PCI_CONFIG_OFF, size, value)
            return
        with dev.lock:
            vq = self._vq()
            if offset == VIRTIO_PCI_GUEST_FEATURES:
                dev.set_guest_features(value & 0xFFFFFFFF)
            elif offset == VIRTIO_PCI_QUEUE_PFN:
                if value == 0:
                    dev.reset()  # QEMU: a zero PFN resets the whole device
                    self._transport_reset()
                elif vq is not None:
                    vq.set_legacy_pfn(value & 0xFFFFFFFF)
            elif offset == VIRTIO_PCI_QUEUE_SEL:
                if value < VIRTIO_QUEUE_MAX:
                    self.queue_sel = value
            elif offset == VIRTIO_PCI_QUEUE_NOTIFY:
                dev.queue_notify(value & 0xFFFF)
            elif offset == VIRTIO_PCI_STATUS:
                self._set_status(value, legacy=True)

    # ---- modern interface -----------------------------------------------------------------
    def modern_read(self, offset: int, size: int) -> int:
        dev = self.device
        if COMMON_OFFSET <= offset < ISR_OFFSET:
            return self._common_read(offset - COMMON_OFFSET) & ((1 << (8 * size)) - 1)
        if ISR_OFFSET <= offset < DEVICE_OFFSET:
            return dev.read_isr()
        if DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            return dev.config_read(offset - DEVICE_OFFSET, size)
        return 0  # notify region reads as 0

    def modern_write(self, offset: int, size: int, value: int) -> None:
        dev = self.device
        if COMMON_OFFSET <= offset < ISR_OFFSET:
            self._common_write(offset - COMMON_OFFSET, value & ((1 << (8 * size)) - 1))
        elif DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            dev.config_write(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < MODERN_BAR_SIZE:
            queue = (offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER
            dev.queue_notify(queue)

    def _common_read(self, off: int) -> int:
        dev = self.device
        with dev.lock:
            vq = self._vq()
            if off == VIRTIO_PCI_COMMON_DFSELECT:
                return self.dfselect
            if off == VIRTIO_PCI_COMMON_DF:
                return (dev.modern_features() >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
            if off == VIRTIO_PCI_COMMON_GFSELECT:
                return self.gfselect
            if off == VIRTIO_PCI_COMMON_GF:
                return self.guest_features_words[self.gfselect] if self.gfselect < 2 else 0
            if off == VIRTIO_PCI_COMMON_MSIX:
                return VIRTIO_NO_VECTOR
            if off == VIRTIO_PCI_COMMON_NUMQ:
                return len(dev.queues)
            if off == VIRTIO_PCI_COMMON_STATUS:
                return dev.status
            if off == VIRTIO_PCI_COMMON_CFGGENERATION:
                return dev.config_generation
            if off == VIRTIO_PCI_COMMON_Q_SELECT:
                return self.queue_sel
            if vq is None:
                return 0
            if off == VIRTIO_PCI_COMMON_Q_SIZE:
                return vq.size
            if off == VIRTIO_PCI_COMMON_Q_MSIX:
                return VIRTIO_NO_VECTOR
            if off == VIRTIO_PCI_COMMON_Q_ENABLE:
                return int(vq.enabled)
            if off == VIRTIO_PCI_COMMON_Q_NOFF:
                return self.queue_sel
            for base, attr in ((VIRTIO_PCI_COMMON_Q_DESCLO, "desc"), (VIRTIO_PCI_COMMON_Q_AVAILLO, "avail"),
                               (VIRTIO_PCI_COMMON_Q_USEDLO, "used")):
                if off == base:
                    return getattr(vq, attr) & 0xFFFFFFFF
                if off == base + 4:
                    return getattr(vq, attr) >> 32
            if off == VIRTIO_PCI_COMMON_Q_RESET:
                return 0
            return 0

    def _common_write(self, off: int, val: int) -> None:
        dev = self.device
        with dev.lock:
            vq = self._vq()
            if off == VIRTIO_PCI_COMMON_DFSELECT:
                self.dfselect = val
            elif off == VIRTIO_PCI_COMMON_GFSELECT:
                self.gfselect = val
            elif off == VIRTIO_PCI_COMMON_GF:
                if self.gfselect < 2:
                    self.guest_features_words[self.gfselect] = val & 0xFFFFFFFF
                    w = self.guest_features_words
                    dev.set_guest_features((w[1] << 32 | w[0]) & dev.modern_features())
            elif off == VIRTIO_PCI_COMMON_STATUS:
                self._set_status(val, legacy=False)
            elif off == VIRTIO_PCI_COMMON_Q_SELECT:
                if val < VIRTIO_QUEUE_MAX:
                    self.queue_sel = val
            elif vq is None:
                return
            elif off == VIRTIO_PCI_COMMON_Q_SIZE:
                if not vq.enabled:
                    vq.size = val
            elif off == VIRTIO_PCI_COMMON_Q_ENABLE:
                if val != 1:
                    dev.virtio_error(f"wrong value for queue_enable {val:x}")
                    return
                n = vq.size
                if not 0 < n <= vq.max_size or n & (n - 1):
                    dev.virtio_error(f"queue size {n} is not a power of two up to {vq.max_size}")
                    return
                vq.enabled = True
            elif off == VIRTIO_PCI_COMMON_Q_RESET:
                if val == 1:
                    dev.reset_queue(self.queue_sel)
            else:
                for base, attr in ((VIRTIO_PCI_COMMON_Q_DESCLO, "desc"), (VIRTIO_PCI_COMMON_Q_AVAILLO, "avail"),
                                   (VIRTIO_PCI_COMMON_Q_USEDLO, "used")):
                    if off in (base, base + 4) and not vq.enabled:
                        cur = getattr(vq, attr)
                        if off == base:
                            cur = (cur & ~0xFFFFFFFF) | val
                        else:
                            cur = (cur & 0xFFFFFFFF) | val << 32
                        setattr(vq, attr, cur)


def attach_virtio_blk(board: Any, memory: Any, blk: Any, slot: int, *, name: str = "virtio0",
                      serial: str | None = None, disable_legacy: bool = False,
                      disable_modern: bool = False, write_cache: bool = True, queue_size: int = 256,
                      discard: bool = True, write_zeroes: bool = True,
                      on_write_cache: Any = None) -> VirtioPciFunction:
    """Build a virtio-blk-pci function and plug it into ``board`` (a PcBoard) at 00:slot.0.

    ``-device virtio-blk-pci,...`` properties become these keywords through
    :func:`virtio_blk_pci_options`.

    :param memory: a :class:`~emu.hw.virtio.virtqueue.GuestMemory` (``GuestMemory.from_vcpu(vcpu)``).
    :param blk: the drive's :class:`~emu.block.api.BlockBackend`.
    :param slot: the PCI slot (QEMU gives each -device the first free slot, 2 upwards
        with -nodefaults).
    :param name: the device id (``virtio0`` for ``-drive if=virtio``), used in logs.
    :param write_cache: initial guest-visible write cache (``cache=writethrough``: False).
    :param on_write_cache: ``(enabled)`` callback when the guest toggles it (query-block).
    """
    from emu.hw.virtio.blk import VirtioBlk

    dev = VirtioBlk(blk, memory, serial=serial, queue_size=queue_size, write_cache=write_cache,
                    discard=discard, write_zeroes=write_zeroes, on_write_cache=on_write_cache)
    fn = VirtioPciFunction(dev, disable_legacy=disable_legacy, disable_modern=disable_modern, name=name)
    board.pci.add(fn, slot)
    return fn


# ---- -device virtio-blk-pci,... properties ------------------------------------------------------

#: properties the machine layer consumes itself (placement, wiring) and we accept
_PLACEMENT_PROPS = ("driver", "drive", "id", "bus", "addr", "bootindex", "multifunction", "rombar", "romfile",
                    "x-pcie-lnksta-dllla", "failover_pair_id")
_BOOL_TRUE = ("on", "yes", "true", "y")
_BOOL_FALSE = ("off", "no", "false", "n")


def _bool_prop(props: dict, name: str, default: bool) -> bool:
    raw = props.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    v = str(raw).lower()
    if v in _BOOL_TRUE:
        return True
    if v in _BOOL_FALSE:
        return False
    raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")


def _int_prop(props: dict, name: str, default: int) -> int:
    raw = props.get(name)
    if raw is None:
        return default
    try:
        return int(str(raw), 0)
    except ValueError:
        raise ConfigError(f"Parameter '{name}' expects integer") from None


def virtio_blk_pci_options(props: dict) -> dict[str, Any]:
    """Check ``-device virtio-blk-pci`` properties as QEMU 7.2 does; keyword arguments for
    :func:`attach_virtio_blk` (without ``board``/``memory``/``blk``/``slot``).

    Accepted: ``disable-legacy`` (on/off/auto; auto = on a conventional PCI bus, legacy
    on), ``disable-modern``, ``serial``, ``queue-size`` (power of two, 3..1024),
    ``num-queues`` (1; multiqueue is not implemented), ``config-wce``, ``discard``,
    ``write-zeroes``, ``write-cache`` (on/off/auto), ``vectors`` (accepted; emu has no MSI-X,
    so the device always behaves as ``vectors=0``), ``scsi`` (off), plus the placement
    properties the machine handles (``drive``, ``id``, ``bus``, ``addr``, ``bootindex`` ...).

    :raises ConfigError: with QEMU's message for a bad or unknown property.
    """
    known = set(_PLACEMENT_PROPS) | {"disable-legacy", "disable-modern", "serial", "queue-size", "num-queues",
                                     "config-wce", "discard", "write-zeroes", "write-cache", "vectors", "scsi"}
    for key in props:
        if key not in known:
            raise ConfigError(f"Property 'virtio-blk-pci.{key}' not found")
    legacy_raw = str(props.get("disable-legacy", "auto")).lower()
    if legacy_raw == "auto":
        disable_legacy = False
    elif legacy_raw in _BOOL_TRUE or legacy_raw in _BOOL_FALSE:
        disable_legacy = legacy_raw in _BOOL_TRUE
    else:
        raise ConfigError(f"Parameter 'disable-legacy' does not accept value '{props['disable-legacy']}'")
    disable_modern = _bool_prop(props, "disable-modern", False)
    if disable_legacy and disable_modern:
        raise ConfigError("device cannot work as neither modern nor legacy mode is enabled\n"
                          "Set either disable-modern or disable-legacy to off")
    queue_size = _int_prop(props, "queue-size", 256)
    if queue_size <= 2:
        raise ConfigError(f"invalid queue-size property ({queue_size}), must be > 2")
    if queue_size & (queue_size - 1) or queue_size > VIRTIO_QUEUE_MAX:
        raise ConfigError(f"invalid queue-size property ({queue_size}), must be a power of 2 (max 1024)")
    num_queues = _int_prop(props, "num-queues", 1)
    if num_queues < 1:
        raise ConfigError("num-queues property must be larger than 0")
    if num_queues > 1:
        raise ConfigError("num-queues > 1 (multiqueue virtio-blk) is not supported by emu")
    _int_prop(props, "vectors", 0)
    if _bool_prop(props, "scsi", False):
        raise ConfigError("Please set scsi=off for virtio-blk devices in order to use virtio 1.0")
    _bool_prop(props, "config-wce", True)
    wc_raw = str(props.get("write-cache", "auto")).lower()
    if wc_raw != "auto" and wc_raw not in _BOOL_TRUE + _BOOL_FALSE:
        raise ConfigError(f"Parameter 'write-cache' does not accept value '{props['write-cache']}'")
    opts: dict[str, Any] = {
        "disable_legacy": disable_legacy,
        "disable_modern": disable_modern,
        "serial": props.get("serial"),
        "queue_size": queue_size,
        "discard": _bool_prop(props, "discard", True),
        "write_zeroes": _bool_prop(props, "write-zeroes", True),
    }
    if wc_raw != "auto":
        opts["write_cache"] = wc_raw in _BOOL_TRUE
    return opts

"""The PC's hardware, assembled from a :class:`~emu.machine.config.MachineConfig`.

:func:`build_hardware` puts together what :class:`~emu.machine.pc.Machine` drives:

* the virtual clock (:class:`emu.hw.clock.VirtualClock`) — one clock for the PIT, RTC, UART
  timeouts *and* the TSC (``VCPU(clock_ns=clock.now)``), paused with the VM;
* the platform board (:class:`emu.hw.pc.board.PcBoard`): one 16550A per ``-serial`` on its
  chardev, isa-debug-exit for ``-device isa-debug-exit``, CMOS filled as QEMU's pc machine;
* the vCPU (:class:`emu.cpu.vcpu.VCPU`) on the board's buses, the BIOS ROM (``-bios``, by
  default emu's own, :func:`default_bios`) and every PCI memory BAR mapped as it appears;
* the disk controllers: ``-drive if=ide`` / ``-device ide-hd`` on the PIIX3 IDE function
  (00:01.1, always present as on QEMU), ``-drive if=virtio`` / ``-device virtio-blk-pci`` as
  virtio-blk-pci functions from slot 2 up; each on its drive's BlockBackend.

Wiring, and why:

* guest requests (i8042/0xCF9 reset, triple fault, isa-debug-exit) arrive on the vCPU thread.
  They are handed to the machine from a short-lived thread, because the machine may at that
  moment hold its lock while it waits in ``vcpu.pause()`` — taking that lock on the vCPU
  thread would deadlock (the vCPU could never park);
* A20 changes go straight to ``vcpu.set_a20`` (it only posts a request to the vCPU);
* a machine reset resets the board (a reset handler) and then the vCPU (``Machine.reset``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from emu.errors import ConfigError
from emu.machine.config import DeviceConfig
from emu.machine.pc import BlockDevice, Machine, ShutdownCause

__all__ = ["Hardware", "HardwarePlan", "build_hardware", "check_hardware", "default_bios", "load_bios", "VcpuRunner", "SerialLink",
           "BIOS_NAME"]

log = logging.getLogger("emu.machine")

BIOS_NAME = "bios.bin"
FOUR_GIB = 1 << 32
#: ROM sizes QEMU accepts for ``-bios`` on the pc machine: a multiple of 64 KiB, at most 16 MiB
BIOS_ALIGN = 64 * 1024
BIOS_MAX = 16 << 20
#: PIIX3 IDE positions: (bus, unit) -> index in primary master .. secondary slave order
IDE_POSITIONS = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}
VIRTIO_BLK_MODELS = ("virtio-blk-pci", "virtio-blk")


def default_bios() -> Path:
    """emu's own BIOS: ``emu/machine/bios.bin`` (package data in an installed wheel; a link to
    ``firmware/bios.bin`` in a source tree), else ``firmware/bios.bin`` beside the package.

    :raises ConfigError: when neither exists.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / BIOS_NAME, here.parent.parent / "firmware" / BIOS_NAME):
        if candidate.is_file():
            return candidate
    raise ConfigError("could not find emu's BIOS (bios.bin); give one with -bios")


def load_bios(path: str | os.PathLike[str] | None) -> bytes:
    """Read a BIOS image and check it fits below 4 GiB as QEMU's pc machine loads it.

    :raises ConfigError: QEMU's ``could not load PC BIOS`` text (for a missing file the CLI
        has already printed it QEMU's way; this catches empty or misaligned images).
    """
    p = Path(path) if path is not None else default_bios()
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"could not load PC BIOS '{p}'") from err
    if not data or len(data) % BIOS_ALIGN or len(data) > BIOS_MAX:
        raise ConfigError(f"could not load PC BIOS '{p}'")
    return data


class VcpuRunner:
    """The vCPU as :class:`~emu.machine.pc.Machine` drives it: pausing the VM also stops the
    virtual clock (so timers and the TSC stand still while paused, as QEMU's vm clock).

    :param cpu: the :class:`emu.cpu.vcpu.VCPU`.
    :param clock: the machine's :class:`emu.hw.clock.VirtualClock`.
    """

    def __init__(self, cpu: Any, clock: Any) -> None:
        self.cpu = cpu
        self.clock = clock

    def start(self) -> None:
        self.clock.resume()
        self.clock.start()
        self.cpu.start()

    def pause(self) -> None:
        self.cpu.pause()
        self.clock.pause()

    def resume(self) -> None:
        self.clock.resume()
        self.cpu.resume()

    def reset(self) -> None:
        self.cpu.reset()

    def stop(self) -> None:
        self.cpu.stop()
        self.clock.stop()

    def registers(self) -> dict[str, int]:
        """The vCPU's registers (``info registers``)."""
        return self.cpu.registers()


@dataclass
class Hardware:
    """What :func:`build_hardware` built (tests and QMP reach devices through it)."""

    clock: Any
    board: Any
    cpu: Any
    runner: VcpuRunner
    ide: Any = None
    #: virtio-blk-pci functions (``emu.hw.virtio.VirtioPciFunction``) by device name
    virtio: dict[str, Any] = field(default_factory=dict)
    #: exit status the guest asked for through isa-debug-exit (None: not yet)
    exit_status: int | None = None
    #: this machine's idle path (:class:`emu.block.api.IdleQueue`), closed with the machine
    idle_queue: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class SerialLink:
    """A UART's host side on a chardev.

    Output to a ``stdio`` chardev goes straight to file descriptor 1, synchronously as QEMU
    writes it: emu's stdio chardev drops output once stdin reaches EOF (``< /dev/null``, as
    test harnesses run it), which must not silence the guest's console.

    :param chardev: an :class:`emu.chardev.Chardev` (``write``, ``set_receiver``).
    """

    def __init__(self, chardev: Any) -> None:
        self.chardev = chardev
        self._fd = 1 if getattr(chardev, "backend_name", "") == "stdio" else None
        if self._fd is not None:
            _stdin_raw()

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self.chardev.write(data)
            return
        view = memoryview(bytes(data))
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return          # stdout gone (closed pipe): output is dropped, as QEMU
            view = view[n:]

    def set_receiver(self, fn: Callable[[bytes], None]) -> None:
        self.chardev.set_receiver(fn)


def _stdin_raw() -> None:
    """Put a terminal on stdin into QEMU's ``-serial stdio`` mode: bytes reach the guest as
    typed (no line editing, no local echo, CR not turned into LF), Ctrl-C still a signal;
    the previous mode comes back at exit."""
    try:
        import atexit
        import termios

        if not os.isatty(0):
            return
        old = termios.tcgetattr(0)
        new = termios.tcgetattr(0)
    except (ImportError, OSError):
        return
    new[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[1] |= termios.OPOST
    new[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    new[2] = (new[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    new[6][termios.VMIN] = 1
    new[6][termios.VTIME] = 0
    try:
        termios.tcsetattr(0, termios.TCSANOW, new)
    except OSError:
        return

    def restore() -> None:
        try:
            termios.tcsetattr(0, termios.TCSANOW, old)
        except OSError:
            pass

    atexit.register(restore)


def _post(fn: Callable[[], None], name: str) -> None:
    """Run ``fn`` on its own thread (see the module docstring: never on the vCPU thread)."""
    threading.Thread(target=fn, name=name, daemon=True).start()


def _ide_backends(machine: Machine) -> tuple[list[Any], list[bool]]:
    """The BlockBackend and guest-visible write cache at each PIIX3 IDE position, from the
    ``ide-hd`` devices."""
    backends: list[Any] = [None] * 4
    write_cache = [True] * 4
    for dev in machine.config.devices:
        if dev.driver not in ("ide-hd", "ide-cd"):
            continue
        if dev.driver == "ide-cd":
            raise ConfigError("'ide-cd' is not supported by emu (no ATAPI): use media=disk")
        index = _ide_index(dev, backends)
        bdev = _device_bdev(machine, dev)
        if bdev is None or bdev.backend is None:
            raise ConfigError(f"Device needs media, but drive is empty ({dev.spec})")
        backends[index] = bdev.backend
        write_cache[index] = _write_cache(bdev)
    return backends, write_cache


def _device_bdev(machine: Machine, dev: DeviceConfig) -> BlockDevice | None:
    """The block device a ``-device`` is attached to: its own BlockBackend on a node
    (``drive=<node-name>``, :func:`emu.machine.drives.open_drives`) or the ``-drive`` named."""
    for bdev in machine.block_devices:
        if bdev.extra.get("device") is dev:
            return bdev
    drive = dev.props.get("drive")
    return machine.find_block_device(drive) if drive is not None else None


def _write_cache(bdev: BlockDevice) -> bool:
    """The guest-visible write cache QEMU gives a drive: off for ``cache=writethrough`` and
    ``cache=directsync``, on otherwise."""
    drive = bdev.extra.get("drive")
    cache = getattr(drive, "cache", None)
    return cache not in ("writethrough", "directsync")


def _forget_probe_io(machine: Machine) -> None:
    """Clear the I/O accounting the controllers' start-up probes left (IDE and virtio-blk read
    the MBR to guess a geometry): it is not guest I/O, and QEMU does not account it, so
    ``query-blockstats`` starts with no ``idle_time_ns`` as QEMU's."""
    for dev in machine.block_devices:
        acct = getattr(dev.backend, "acct", None)
        if acct is not None and hasattr(acct, "account_invalid"):
            dev.backend.acct = type(acct)(acct.account_invalid, acct.account_failed)


def _pci_slot(addr: str) -> int:
    """``addr=`` of a ``-device`` (QEMU: ``slot[.function]`` in hex) -> slot."""
    try:
        slot = int(addr.split(".", 1)[0], 16)
    except ValueError:
        raise ConfigError(f"Property 'virtio-blk-pci.addr' doesn't take value '{addr}'") from None
    if not 0 <= slot < 32:
        raise ConfigError(f"Property 'virtio-blk-pci.addr' doesn't take value '{addr}'")
    return slot


@dataclass
class _VirtioPlan:
    """One virtio-blk-pci function to plug: its device, options, drive, slot and name."""

    dev: DeviceConfig
    options: dict[str, Any]
    bdev: BlockDevice
    slot: int
    name: str


def _virtio_plan(machine: Machine) -> list[_VirtioPlan]:
    """Each virtio-blk-pci device, in command-line order, at its ``addr=`` or the first free
    slot from 2 (QEMU's rule; emu has no VGA or NIC before them); checks every property.

    :raises ConfigError: QEMU's text for a bad property, a missing or empty drive.
    """
    devices = [d for d in machine.config.devices if d.driver in VIRTIO_BLK_MODELS]
    if not devices:
        return []
    from emu.hw.virtio import virtio_blk_pci_options

    used = {0, 1}                       # i440FX, PIIX3 (ISA + IDE)
    used |= {_pci_slot(d.props["addr"]) for d in devices if "addr" in d.props}
    out: list[_VirtioPlan] = []
    for n, dev in enumerate(devices):
        where = f"-drive {dev.spec}" if dev.implicit else f"-device {dev.spec}"
        try:
            options = virtio_blk_pci_options(dev.props)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        drive = dev.props.get("drive")
        bdev = _device_bdev(machine, dev)
        if bdev is None or bdev.backend is None:
            raise ConfigError(f"{where}: Drive property not set" if drive is None else
                              f"{where}: Device needs media, but drive is empty")
        if "addr" in dev.props:
            slot = _pci_slot(dev.props["addr"])
        else:
            slot = next(s for s in range(2, 32) if s not in used)
            used.add(slot)
        options.setdefault("write_cache", _write_cache(bdev))
        name = dev.id or (drive if dev.implicit else f"virtio-blk{n}")
        out.append(_VirtioPlan(dev, options, bdev, slot, name))
    return out


def _attach_virtio_blk(machine: Machine, board: Any, cpu: Any,
                       plan: list[_VirtioPlan]) -> dict[str, Any]:
    """Plug the planned virtio-blk-pci functions (:func:`_virtio_plan`)."""
    if not plan:
        return {}
    from emu.hw.virtio import GuestMemory, attach_virtio_blk

    memory = GuestMemory.from_vcpu(cpu)
    out: dict[str, Any] = {}
    for p in plan:
        p.bdev.writeback = p.options["write_cache"]

        def on_write_cache(enabled: bool, bdev: BlockDevice = p.bdev) -> None:
            bdev.writeback = enabled        # query-block's write cache follows the guest

        out[p.name] = attach_virtio_blk(board, memory, p.bdev.backend, p.slot, name=p.name,
                                        on_write_cache=on_write_cache, **p.options)
    return out


def _ide_index(dev: DeviceConfig, taken: list[Any]) -> int:
    bus_text = dev.props.get("bus")
    unit_text = dev.props.get("unit")
    buses = [int(bus_text.rsplit(".", 1)[1])] if bus_text else [0, 1]
    for bus in buses:
        units = [int(unit_text, 0)] if unit_text is not None else [0, 1]
        for unit in units:
            index = IDE_POSITIONS.get((bus, unit))
            if index is None:
                raise ConfigError(f"Invalid IDE unit {unit} on bus ide.{bus}")
            if taken[index] is None:
                return index
    raise ConfigError(f"IDE unit already in use ({dev.spec})")


@dataclass
class HardwarePlan:
    """What :func:`check_hardware` validated: the BIOS image and the virtio-blk functions."""

    bios: bytes
    virtio: list[_VirtioPlan]


def check_hardware(machine: Machine) -> HardwarePlan:
    """Every configuration error :func:`build_hardware` could meet, found without importing
    or building the CPU and devices, so that the launcher can start the monitors (and greet)
    while the hardware is being built, as QEMU has already refused a bad configuration by the
    time it greets.

    :raises ConfigError: a device emu lacks, a bad BIOS, a bad device property.
    """
    cfg = machine.config
    if cfg.kernel is not None:
        # the BIOS would boot the disk instead: say so rather than run something else
        raise ConfigError("direct kernel boot (-kernel) is not implemented in emu yet")
    bios = load_bios(cfg.bios)
    _ide_backends(machine)
    return HardwarePlan(bios, _virtio_plan(machine))


def rtc_start_time(cfg: Any) -> float | None:
    """The RTC's start for ``-rtc base=`` (as "UTC" epoch seconds, the RTC shows their UTC
    time of day): None (host time) for ``utc``, the host's local time for ``localtime``, the
    given date for a date.  The RTC then follows VM time whatever ``clock=`` says (emu's
    departure: QEMU's default clock=host keeps host time while the VM is paused)."""
    base = cfg.rtc_base
    if base == "utc":
        return None
    if base == "localtime":
        import time

        now = time.time()
        return now + time.localtime(now).tm_gmtoff
    return float(base)


def build_hardware(machine: Machine, *, start_time: float | None = None,
                   plan: HardwarePlan | None = None) -> Hardware:
    """Build clock, board, vCPU, firmware and disk controllers for ``machine`` and attach them
    (vCPU, reset handler); call after the drives are opened and ``machine.serial_chardevs`` is
    set, before ``machine.start()``.

    :param machine: the machine (its config and block devices are read).
    :param start_time: RTC start (UTC epoch seconds); default host time.
    :param plan: what :func:`check_hardware` returned (checked again when not given).
    :raises ConfigError: a device emu lacks, a bad BIOS, a bad device property.
    """
    if plan is None:
        plan = check_hardware(machine)
    from emu.block.api import IdleQueue
    from emu.cpu.vcpu import VCPU
    from emu.hw.clock import VirtualClock
    from emu.hw.pc.board import PcBoard
    from emu.hw.pc.debugexit import DebugExit

    cfg = machine.config
    ram_size = cfg.memory_mib << 20
    bios = plan.bios

    if start_time is None:
        start_time = rtc_start_time(cfg)
    clock = VirtualClock()
    clock.pause()                       # time starts when the guest first runs
    hw: Hardware | None = None

    def on_reset() -> None:
        _post(lambda: machine.request_reset(ShutdownCause.GUEST_RESET), "emu-guest-reset")

    def on_reset_request(reason: str) -> None:
        log.debug("vCPU asks for a reset: %s", reason)
        on_reset()

    def on_exit(status: int) -> None:
        if hw is not None:
            hw.exit_status = status
        # QEMU calls exit(status) right away: no SHUTDOWN event; the OS keeps the low 8 bits
        _post(lambda: machine.request_exit(status & 0xFF), "emu-guest-exit")

    cpu_ref: list[Any] = []

    def on_a20(enabled: bool) -> None:
        if cpu_ref:
            cpu_ref[0].set_a20(enabled)

    board = PcBoard(clock, on_reset=on_reset, on_a20=on_a20, start_time=start_time,
                    serial_ports=0)
    for chardev in machine.serial_chardevs:
        board.add_serial(SerialLink(chardev))
    for dev in cfg.devices:
        if dev.driver == "isa-debug-exit":
            board.add_debug_exit(DebugExit.from_qemu_props(dev.props, on_exit))
    cpu = VCPU(ram_size, board.iobus.port_read, board.iobus.port_write, board.pic,
               on_reset_request=on_reset_request, clock_ns=clock.now)
    cpu_ref.append(cpu)
    cpu.load_rom(FOUR_GIB - len(bios), bios)
    board.connect_cpu(cpu.interrupt_raised)
    idleq = IdleQueue()             # this machine's idle path: its block requests run on
    cpu.idle_hook = idleq.run_one   # its vCPU while the guest halts, never on another's
    for bdev in machine.block_devices:
        if bdev.backend is not None:
            bdev.backend.idle_queue = idleq
    cpu.timers = clock              # ... and so do device timers (one wake-up per tick)

    def map_region(base: int, size: int) -> None:
        cpu.map_mmio(base, size, lambda off, n: board.mmiobus.read(base + off, n),
                     lambda off, n, v: board.mmiobus.write(base + off, n, v))

    def unmap_region(base: int, size: int) -> None:
        cpu.unmap_mmio(base, size)

    board.mmiobus.add_listener(map_region, unmap_region)

    # QEMU's pc machine always has the PIIX3 IDE function (00:01.1), disks or not
    from emu.hw.ide import attach_piix_ide

    backends, write_cache = _ide_backends(machine)
    # TRIM goes to the backend, whose -drive discard= (default ignore) decides, as in QEMU
    ide = attach_piix_ide(board, cpu.ram, cpu.invalidate_code, backends, write_cache=write_cache,
                          dma_view=cpu.dma_view, discard=[b is not None for b in backends])
    geometry: list[tuple[int, ...] | None] = [None] * 4
    for i, drive in enumerate(ide.drives):
        if drive.present:
            g = drive.geometry
            geometry[i] = (g.cylinders, g.heads, g.sectors, g.translation - 1)
    # -boot once= is the order of the first boot only; QEMU restores order= at the next reset
    board.rtc.set_pc_config(ram_size, geometry, boot_order=cfg.boot_once or cfg.boot_order)
    virtio = _attach_virtio_blk(machine, board, cpu, plan.virtio)

    _forget_probe_io(machine)
    runner = VcpuRunner(cpu, clock)
    hw = Hardware(clock, board, cpu, runner, ide, virtio=virtio, idle_queue=idleq)
    machine.add_reset_handler(board.reset)
    if cfg.boot_once is not None:
        once_pending = [True]

        def restore_boot_order() -> None:
            if once_pending:
                once_pending.clear()
                board.rtc.set_boot_order(cfg.boot_order)

        machine.add_reset_handler(restore_boot_order)
    machine.attach_vcpu(runner)
    machine.hardware = hw          # type: ignore[attr-defined]
    return hw


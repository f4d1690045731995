"""Machine, CPU, memory, PCI and display queries, and guest memory dumps (memsave/pmemsave).

Replies are QEMU 7.2's for ``-machine pc`` with emu's devices (checked against
qemu-system-x86_64 7.2); where emu lacks a feature QEMU's own answer for a machine
without it is given (no balloon, no SEV/SGX, no VNC/SPICE with ``-display none``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, qemu_command
from emu.qmp.errors import DEVICE_NOT_ACTIVE
from emu.qmp.errors import unsupported

#: PCI class code (base << 8 | sub) -> QEMU's pci_class_descriptions text
PCI_CLASS_DESC = {
    0x0100: "SCSI controller", 0x0101: "IDE controller", 0x0106: "SATA controller",
    0x0180: "Storage controller", 0x0200: "Ethernet controller", 0x0300: "VGA controller",
    0x0380: "Display controller", 0x0600: "Host bridge", 0x0601: "ISA bridge",
    0x0604: "PCI bridge", 0x0680: "Bridge", 0x0c03: "USB controller",
    0x0403: "Audio controller", 0x00ff: "Unclassified",
}

CPU_QOM_PATH = "/machine/unattached/device[0]"
CPU_PROPS = {"core-id": 0, "thread-id": 0, "socket-id": 0}
CPU_TYPE = "qemu64-x86_64-cpu"
#: the machine types emu accepts for -machine, as QEMU 7.2 describes them
_MACHINES = [
    {"hotpluggable-cpus": True, "name": "pc-i440fx-7.2", "numa-mem-supported": True,
     "default-cpu-type": CPU_TYPE, "is-default": True, "cpu-max": 255, "deprecated": False,
     "default-ram-id": "pc.ram", "alias": "pc"},
    {"hotpluggable-cpus": True, "name": "pc-i440fx-2.0", "numa-mem-supported": True,
     "default-cpu-type": CPU_TYPE, "cpu-max": 255, "deprecated": False,
     "default-ram-id": "pc.ram"},
    {"hotpluggable-cpus": False, "name": "none", "numa-mem-supported": False,
     "cpu-max": 1, "deprecated": False},
]


def _hw(ctx: CommandContext) -> Any:
    return getattr(ctx.machine, "hardware", None)


def _ram_size(ctx: CommandContext) -> int:
    return ctx.machine.config.memory_mib << 20


@qemu_command("query-uuid", inline=True)
def query_uuid(ctx: CommandContext) -> dict:
    return {"UUID": getattr(ctx.machine.config, "uuid", None)
            or "00000000-0000-0000-0000-000000000000"}


@qemu_command("query-target", inline=True)
def query_target(ctx: CommandContext) -> dict:
    return {"arch": "x86_64"}


@qemu_command("query-kvm", inline=True)
def query_kvm(ctx: CommandContext) -> dict:
    """emu has no KVM accelerator at all (QEMU's Debian build reports ``present: true``)."""
    return {"enabled": False, "present": False}


@qemu_command("query-machines")
def query_machines(ctx: CommandContext) -> list:
    return [dict(m) for m in _MACHINES]


@qemu_command("query-current-machine")
def query_current_machine(ctx: CommandContext) -> dict:
    """emu's PC has no ACPI sleep states, so the guest can never suspend (QEMU's pc: true)."""
    return {"wakeup-suspend-support": False}


def _vcpu_thread_id(ctx: CommandContext) -> int:
    hw = _hw(ctx)
    cpu = getattr(hw, "cpu", None) if hw is not None else None
    t = getattr(cpu, "_thread", None) or getattr(cpu, "thread", None)
    if isinstance(t, threading.Thread) and t.native_id is not None:
        return t.native_id
    return os.getpid()


@qemu_command("query-cpus-fast")
def query_cpus_fast(ctx: CommandContext) -> list:
    if _hw(ctx) is None:
        return []
    return [{"thread-id": _vcpu_thread_id(ctx), "props": dict(CPU_PROPS),
             "qom-path": CPU_QOM_PATH, "cpu-index": 0, "target": "x86_64"}]


@qemu_command("query-hotpluggable-cpus")
def query_hotpluggable_cpus(ctx: CommandContext) -> list:
    if _hw(ctx) is None:
        return []
    return [{"props": dict(CPU_PROPS), "vcpus-count": 1, "qom-path": CPU_QOM_PATH,
             "type": CPU_TYPE}]


@qemu_command("query-memory-size-summary")
def query_memory_size_summary(ctx: CommandContext) -> dict:
    return {"base-memory": _ram_size(ctx), "plugged-memory": 0}


@qemu_command("query-memdev")
def query_memdev(ctx: CommandContext) -> list:
    return [{"share": False, "reserve": True, "prealloc": False, "host-nodes": [],
             "size": _ram_size(ctx), "merge": True, "dump": True, "policy": "default",
             "id": "pc.ram"}]


@qemu_command("query-memory-devices")
def query_memory_devices(ctx: CommandContext) -> list:
    return []


@qemu_command("query-iothreads")
def query_iothreads(ctx: CommandContext) -> list:
    return []


@qemu_command("query-acpi-ospm-status")
def query_acpi_ospm_status(ctx: CommandContext) -> list:
    return []


def _qdev_ids(ctx: CommandContext) -> set[str]:
    return {d.id for d in ctx.machine.config.devices if d.id and not d.implicit}


def pci_device_info(fn: Any, qdev_ids: set[str]) -> dict:
    """One ``PciDeviceInfo`` for a :class:`emu.hw.pci.device.PciFunction`."""
    c = fn.config
    vendor, device = c[0] | c[1] << 8, c[2] | c[3] << 8
    cls = c[0x0A] | c[0x0B] << 8
    info: dict[str, Any] = {"irq_pin": c[0x3D], "bus": 0,
                            "qdev_id": fn.name if fn.name in qdev_ids else ""}
    if c[0x3D]:
        info["irq"] = c[0x3C]
    cinfo: dict[str, Any] = {"class": cls}
    if cls in PCI_CLASS_DESC:
        cinfo["desc"] = PCI_CLASS_DESC[cls]
    info.update({"slot": fn.devfn >> 3, "class_info": cinfo,
                 "id": {"device": device, "subsystem-vendor": c[0x2C] | c[0x2D] << 8,
                        "vendor": vendor, "subsystem": c[0x2E] | c[0x2F] << 8},
                 "function": fn.devfn & 7})
    regions = []
    for bar in fn.bars:
        if bar is None:
            continue
        addr = fn.bar_address(bar)
        r: dict[str, Any] = {"bar": bar.index, "size": bar.size,
                             "address": -1 if addr is None else addr}
        if bar.io:
            r["type"] = "io"
        else:
            r = {"prefetch": bar.prefetch, "mem_type_64": bar.mem64, **r, "type": "memory"}
        regions.append(r)
    info["regions"] = regions
    return info


@qemu_command("query-pci")
def query_pci(ctx: CommandContext) -> list:
    """Bus 0 with every PCI function emu's board has, BARs as they decode now
    (``address: -1`` until the BIOS has assigned them and enabled decoding, as QEMU)."""
    hw = _hw(ctx)
    if hw is None:
        return []
    ids = _qdev_ids(ctx)
    devs = [pci_device_info(fn, ids) for _, fn in sorted(hw.board.pci.devices.items())]
    return [{"bus": 0, "devices": devs}]


@qemu_command("query-mice")
def query_mice(ctx: CommandContext) -> list:
    if _hw(ctx) is None:
        return []
    return [{"index": 2, "name": "QEMU PS/2 Mouse", "current": True, "absolute": False}]


@qemu_command("query-tpm")
def query_tpm(ctx: CommandContext) -> list:
    return []


@qemu_command("query-tpm-types")
def query_tpm_types(ctx: CommandContext) -> list:
    """emu has no TPM backend (QEMU lists the ones it was built with)."""
    return []


@qemu_command("query-tpm-models")
def query_tpm_models(ctx: CommandContext) -> list:
    return []


@qemu_command("query-vnc")
def query_vnc(ctx: CommandContext) -> dict:
    return {"enabled": False}


@qemu_command("query-vnc-servers")
def query_vnc_servers(ctx: CommandContext) -> list:
    return []


@qemu_command("query-spice")
def query_spice(ctx: CommandContext) -> dict:
    return {"migrated": False, "enabled": False, "mouse-mode": "client"}


@qemu_command("query-display-options")
def query_display_options(ctx: CommandContext) -> dict:
    return {"type": "none"}


@qemu_command("inject-nmi")
def inject_nmi(ctx: CommandContext) -> dict:
    """Deliver an NMI to the vCPU if it can take one; without a local APIC QEMU's pc
    raises the CPU's NMI line, which emu's vCPU models as ``inject_nmi``."""
    hw = _hw(ctx)
    cpu = getattr(hw, "cpu", None) if hw is not None else None
    fn = getattr(cpu, "inject_nmi", None)
    if fn is None:
        raise unsupported("inject-nmi", "NMI delivery (the vCPU has no NMI line yet)")
    fn()
    return {}


@qemu_command("system_wakeup")
def system_wakeup(ctx: CommandContext) -> dict:
    raise QmpError("Unable to wake up: guest is not in suspended state")


@qemu_command("query-vm-generation-id")
def query_vm_generation_id(ctx: CommandContext) -> dict:
    raise QmpError("VM Generation ID device not found")


@qemu_command("query-balloon")
def query_balloon(ctx: CommandContext) -> dict:
    raise QmpError("No balloon device has been activated", DEVICE_NOT_ACTIVE)


@qemu_command("balloon")
def balloon(ctx: CommandContext, value: int) -> dict:
    raise QmpError("No balloon device has been activated", DEVICE_NOT_ACTIVE)


@qemu_command("rtc-reset-reinjection")
def rtc_reset_reinjection(ctx: CommandContext) -> dict:
    """emu's RTC never queues lost periodic interrupts, so there is nothing to drop."""
    return {}


@qemu_command("query-cpu-definitions")
def query_cpu_definitions(ctx: CommandContext) -> list:
    """The one CPU model emu implements."""
    return [{"name": "qemu64", "typename": CPU_TYPE, "unavailable-features": [],
             "static": False, "migration-safe": True, "deprecated": False}]


@qemu_command("query-cpu-model-expansion")
def query_cpu_model_expansion(ctx: CommandContext, type: str, model: dict) -> dict:
    if model["name"] != "qemu64":
        raise QmpError(f"CPU model '{model['name']}' not found")
    raise unsupported("query-cpu-model-expansion", "CPU model expansion")


@qemu_command("query-sev")
def query_sev(ctx: CommandContext) -> dict:
    return {"enabled": False, "api-minor": 0, "handle": 0, "state": "uninit", "api-major": 0,
            "build-id": 0, "policy": 0}


def _fixed_error(name: str, desc: str, cls: str = "GenericError") -> None:
    def handler(ctx: CommandContext, args: dict) -> Any:
        raise QmpError(desc, cls)

    handler.__name__ = name.replace("-", "_")
    qemu_command(name, boxed=True)(handler)


for _name, _desc in [
    ("query-sev-launch-measure", "SEV launch measurement is not available"),
    ("query-sev-capabilities", "KVM not enabled"),
    ("sev-inject-launch-secret", "SEV not enabled for guest"),
    ("query-sev-attestation-report", "SEV is not enabled"),
    ("query-sgx", "No EPC regions defined, SGX not available"),
    ("query-sgx-capabilities", "SGX is not enabled in KVM"),
    ("dumpdtb", "This machine doesn't have a FDT"),
    ("set-numa-node", "The command is permitted only before the machine has been created"),
    ("x-query-profile", "Internal profiler not compiled"),
    ("x-query-usb", "USB support not enabled"),
]:
    _fixed_error(_name, _desc)


@qemu_command("x-query-numa")
def x_query_numa(ctx: CommandContext) -> dict:
    return {"human-readable-text": "0 nodes\n"}


@qemu_command("x-query-rdma")
def x_query_rdma(ctx: CommandContext) -> dict:
    return {"human-readable-text": ""}


@qemu_command("x-query-ramblock")
def x_query_ramblock(ctx: CommandContext) -> dict:
    size = _ram_size(ctx)
    head = (f"{'Block Name':>24} {'PSize':>8}  {'Offset':>18} {'Used':>18} {'Total':>18}\n")
    line = f"{'pc.ram':>24} {'4 KiB':>8}  0x{0:016x} 0x{size:016x} 0x{size:016x}\n"
    return {"human-readable-text": head + line}


for _name, _what in [("x-query-irq", "IRQ statistics"), ("x-query-jit", "TCG statistics "
                     "(emu runs on Unicorn)"), ("x-query-opcount", "TCG statistics "
                     "(emu runs on Unicorn)"), ("x-query-roms", "the ROM list")]:
    def _h(ctx: CommandContext, _n: str = _name, _w: str = _what) -> dict:
        raise unsupported(_n, _w)

    _h.__name__ = _name.replace("-", "_")
    qemu_command(_name)(_h)


@qemu_command("query-stats")
def query_stats(ctx: CommandContext, target: str, **kw: Any) -> list:
    """emu has no KVM statistics providers, so every target has none (as QEMU under TCG)."""
    return []


@qemu_command("query-stats-schemas")
def query_stats_schemas(ctx: CommandContext, **kw: Any) -> list:
    return []


@qemu_command("query-dump-guest-memory-capability")
def query_dump_guest_memory_capability(ctx: CommandContext) -> dict:
    """emu writes no dump formats (dump-guest-memory is not supported)."""
    return {"formats": []}


@qemu_command("query-dump")
def query_dump(ctx: CommandContext) -> dict:
    return {"total": 0, "status": "none", "completed": 0}


# ------------------------------------------------------------------ guest memory

def _vcpu(ctx: CommandContext) -> Any:
    hw = _hw(ctx)
    if hw is None:
        raise QmpError("Parameter 'cpu-index' expects a CPU number")
    return hw.cpu


def _phys_read(cpu: Any, addr: int, size: int) -> bytes:
    """Guest-physical bytes; addresses that are not RAM read as all ones (the floating bus
    emu models for unmapped memory; QEMU's pmemsave writes what the address space gives)."""
    out = bytearray()
    page = 4096
    while size > 0:
        n = min(size, page - (addr & (page - 1)))
        view = cpu.dma_view(addr, n)
        out += bytes(view) if view is not None else b"\xff" * n
        addr = (addr + n) & ((1 << 64) - 1)
        size -= n
    return bytes(out)


@qemu_command("pmemsave")
def pmemsave(ctx: CommandContext, val: int, size: int, filename: str) -> dict:
    """Write guest-physical memory ``[val, val + size)`` to ``filename``."""
    cpu = _vcpu(ctx)
    val &= (1 << 64) - 1
    size &= (1 << 64) - 1
    fd = None
    try:
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise QmpError(f"Could not open '{filename}': {e.strerror}") from None
    try:
        done = 0
        while done < size:
            n = min(size - done, 1 << 20)
            os.write(fd, _phys_read(cpu, val + done, n))
            done += n
    finally:
        os.close(fd)
    return {}


@qemu_command("memsave")
def memsave(ctx: CommandContext, val: int, size: int, filename: str,
            cpu_index: int | None = None) -> dict:
    """Write guest-virtual memory (through the vCPU's current paging) to ``filename``."""
    if cpu_index not in (None, 0):
        raise QmpError("Parameter 'cpu-index' expects a CPU number")
    cpu = _vcpu(ctx)
    val &= (1 << 64) - 1
    size &= (1 << 64) - 1
    from emu.cpu.dump import debug_translator

    translate = debug_translator(cpu)
    try:
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise QmpError(f"Could not open '{filename}': {e.strerror}") from None
    try:
        done = 0
        while done < size:
            n = min(size - done, 4096 - ((val + done) & 4095))
            phys = translate(val + done)
            if phys is None:
                raise QmpError(f"Invalid addr 0x{val:016x}/size {size} specified")
            os.write(fd, _phys_read(cpu, phys, n))
            done += n
    finally:
        os.close(fd)
    return {}

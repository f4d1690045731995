"""What the vCPU tells the guest about itself: CPUID, the MSRs we emulate, the TSC.

CPUID starts from what Unicorn's built-in model (a Haswell) reports and keeps only what
emu really implements: no local APIC (there is none yet; Linux then uses the 8259 in
virtual-wire-less PIC mode), no MONITOR/MWAIT, no x2APIC/TSC-deadline, no SVM/VMX, no AVX
(Unicorn cannot run it), XSAVE limited to x87+SSE state.

MSRs: Unicorn itself implements EFER, STAR/LSTAR/CSTAR/FMASK, FS/GS/KERNEL_GS base,
TSC_AUX, SYSENTER_*, MTRRs, MCG_*, MISC_ENABLE and UCODE_REV correctly; those run natively.
Every other RDMSR/WRMSR is intercepted (see vcpu.py) and handled by :class:`MsrFile`:
TSC, APIC_BASE, PAT and FEATURE_CONTROL are emulated, anything else raises #GP(0) as the
hardware does for an MSR it does not have.

TSC: RDTSC/RDTSCP are hooked (the C API offers the hook, the Python binding does not: we
register it through the binding's ctypes layer; RDTSC's hook must stay first in the INSN hook
list, see vcpu.py); the TSC counts ``tsc_hz`` ticks per second
of the machine's virtual clock (the same clock the PIT should use), so a guest calibrating
the TSC against the PIT finds ``tsc_hz``.  It starts at 0 at reset; WRMSR(TSC) moves it.
RDMSR(TSC) is intercepted and reads the same counter.
"""

from __future__ import annotations

from typing import Callable

from emu.cpu.mmu import GuestFault

# --- CPUID feature bits we keep (AND-ed with Unicorn's own model) ------------------------
LEAF1_EDX_KEEP = sum(1 << b for b in (
    0,   # FPU
    1,   # VME
    2,   # DE
    3,   # PSE
    4,   # TSC
    5,   # MSR
    6,   # PAE
    7,   # MCE
    8,   # CX8
    11,  # SEP (SYSENTER/SYSEXIT)
    12,  # MTRR
    13,  # PGE
    14,  # MCA
    15,  # CMOV
    16,  # PAT
    17,  # PSE36
    19,  # CLFSH
    23,  # MMX
    24,  # FXSR
    25,  # SSE
    26,  # SSE2
))
LEAF1_ECX_KEEP = sum(1 << b for b in (
    0,   # SSE3
    1,   # PCLMULQDQ
    9,   # SSSE3
    13,  # CX16
    19,  # SSE4.1
    20,  # SSE4.2
    22,  # MOVBE
    23,  # POPCNT
    25,  # AES
    26,  # XSAVE
    30,  # RDRAND
    31,  # hypervisor (QEMU TCG sets it too)
))
LEAF1_ECX_OSXSAVE = 1 << 27
LEAF7_EBX_KEEP = sum(1 << b for b in (0, 3, 7, 8, 9))  # FSGSBASE BMI1 SMEP BMI2 ERMS
# RDTSCP (bit 27) is not advertised (QEMU's default qemu64 model lacks it too): only
# RDTSC's hook is reliable when a kick lands next to the instruction (vcpu.py
# _install_hooks), so guests that follow CPUID read the TSC through RDTSC.
EXT1_EDX_KEEP = sum(1 << b for b in (11, 20, 26, 29))  # SYSCALL NX 1GB-pages LM
EXT1_ECX_KEEP = sum(1 << b for b in (0, 5, 8))  # LAHF_LM ABM PREFETCHW
XCR0_SUPPORTED = 0x3  # x87 + SSE

# --- MSRs -------------------------------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_FMASK = 0xC0000084
MSR_TSC_AUX = 0xC0000103
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176

APICBASE_BSP = 1 << 8
APIC_DEFAULT_BASE = 0xFEE00000
PAT_RESET = 0x0007040600070406
MISC_ENABLE_DEFAULT = 1 | (1 << 11) | (1 << 12)  # fast strings, BTS and PEBS unavailable

#: MSRs Unicorn implements itself; RDMSR/WRMSR of these are not intercepted.
NATIVE_MSRS: tuple[int, ...] = (
    0x8B,                                      # IA32_UCODE_REV
    0xFE,                                      # MTRRcap
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
    0x179, 0x17A, 0x17B,                       # MCG_CAP/STATUS/CTL
    0x198,                                     # PERF_STATUS
    MSR_IA32_MISC_ENABLE,
    *range(0x200, 0x210),                      # MTRRphysBase/Mask 0-7
    0x250, 0x258, 0x259, *range(0x268, 0x270), 0x2FF,  # fixed MTRRs, MTRRdefType
    MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK,
    0xC0000100, 0xC0000101, 0xC0000102,        # FS_BASE, GS_BASE, KERNEL_GS_BASE
    MSR_TSC_AUX,
)


def msr_permission_map() -> bytes:
    """The SVM MSR permission map: every MSR intercepted except :data:`NATIVE_MSRS`.

    Two bits per MSR (read, write) in three 2 KiB blocks: 0-0x1FFF,
    0xC0000000-0xC0001FFF, 0xC0010000-0xC0011FFF (AMD APM vol. 2, 15.11).
    """
    bitmap = bytearray(b"\xff" * 0x2000)
    for msr in NATIVE_MSRS:
        if msr <= 0x1FFF:
            bit = msr * 2
        elif 0xC0000000 <= msr <= 0xC0001FFF:
            bit = (8192 + msr - 0xC0000000) * 2
        else:
            bit = (16384 + msr - 0xC0010000) * 2
        bitmap[bit // 8] &= ~(3 << (bit % 8)) & 0xFF
    return bytes(bitmap)


class CpuidTable:
    """CPUID answers: Unicorn's model filtered to what we implement.

    :param native: ``native(leaf, subleaf) -> (eax, ebx, ecx, edx)`` from Unicorn's model.
    """

    def __init__(self, native: Callable[[int, int], tuple[int, int, int, int]]) -> None:
        self._native = native
        self.max_leaf = native(0, 0)[0]
        self.max_ext = native(0x80000000, 0)[0]
        self._cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.signature = native(1, 0)[0]

    def lookup(self, leaf: int, subleaf: int, cr4_osxsave: bool) -> tuple[int, int, int, int]:
        """The four registers for ``CPUID(leaf, subleaf)``."""
        key = (leaf, subleaf if leaf in (4, 7, 0xB, 0xD) else 0)
        regs = self._cache.get(key)
        if regs is None:
            regs = self._filtered(*key)
            self._cache[key] = regs
        if leaf == 1 and cr4_osxsave:
            regs = (regs[0], regs[1], regs[2] | LEAF1_ECX_OSXSAVE, regs[3])
        return regs

    def _filtered(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if 0x40000000 <= leaf <= 0x400000FF:
            return (0, 0, 0, 0)       # no paravirtual interface
        if leaf < 0x80000000 and leaf > self.max_leaf:
            leaf = self.max_leaf      # Intel: answers of the highest basic leaf
        a, b, c, d = self._native(leaf, subleaf)
        if leaf == 1:
            b &= 0x0000FFFF           # APIC ID 0, one logical processor
            c &= LEAF1_ECX_KEEP
            d &= LEAF1_EDX_KEEP
        elif leaf in (5, 6, 0xA):     # MONITOR, power management, perfmon: none
            a = b = c = d = 0
        elif leaf == 7:
            if subleaf == 0:
                a, b, c, d = 0, b & LEAF7_EBX_KEEP, 0, 0
            else:
                a = b = c = d = 0
        elif leaf == 0xD:
            if subleaf == 0:
                a, b, c, d = XCR0_SUPPORTED, 512 + 64, 512 + 64, 0
            elif subleaf == 1:
                a, b, c, d = a & 0x1, 0, 0, 0   # XSAVEOPT only
            else:
                a = b = c = d = 0
        elif leaf == 0x80000001:
            c &= EXT1_ECX_KEEP
            d &= EXT1_EDX_KEEP
        elif leaf > self.max_ext and leaf >= 0x80000000:
            a = b = c = d = 0
        return (a & 0xFFFFFFFF, b & 0xFFFFFFFF, c & 0xFFFFFFFF, d & 0xFFFFFFFF)


class MsrFile:
    """The MSRs emulated in Python (those Unicorn does not implement).

    :param tsc: ``tsc() -> int``: the current virtual TSC before the guest's adjustment.
    """

    def __init__(self, tsc: Callable[[], int]) -> None:
        self._tsc = tsc
        self.reset()

    def reset(self) -> None:
        """Power-on values; the TSC counts from 0 again, as after RESET."""
        self.tsc_offset = -self._tsc() & 0xFFFFFFFFFFFFFFFF
        self.apic_base = APIC_DEFAULT_BASE | APICBASE_BSP   # global enable clear: no APIC
        self.pat = PAT_RESET
        self.feature_control = 0

    def read_tsc(self) -> int:
        return (self._tsc() + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF

    def rdmsr(self, msr: int) -> int:
        """Value of ``msr``; :class:`GuestFault` #GP(0) for an MSR we do not have."""
        if msr == MSR_IA32_TSC:
            return self.read_tsc()
        if msr == MSR_IA32_APICBASE:
            return self.apic_base
        if msr == MSR_PAT:
            return self.pat
        if msr == MSR_IA32_FEATURE_CONTROL:
            return self.feature_control
        raise GuestFault(13, 0)

    def wrmsr(self, msr: int, value: int) -> None:
        """Write ``msr``; #GP(0) for unknown MSRs and reserved values."""
        if msr == MSR_IA32_TSC:
            self.tsc_offset = (value - self._tsc()) & 0xFFFFFFFFFFFFFFFF
        elif msr == MSR_IA32_APICBASE:
            if value & ~(0xFFFFFF000 | APICBASE_BSP | (1 << 10) | (1 << 11)) & 0xFFFFFFFFFFFFFFFF:
                raise GuestFault(13, 0)
            # No local APIC: the enable bit never sticks.
            self.apic_base = (value & 0xFFFFFF000) | APICBASE_BSP
        elif msr == MSR_PAT:
            if any(((value >> (8 * i)) & 0xFF) in (2, 3) or ((value >> (8 * i)) & 0xF8)
                   for i in range(8)):
                raise GuestFault(13, 0)
            self.pat = value
        elif msr == MSR_IA32_FEATURE_CONTROL:
            if self.feature_control & 1:          # locked
                raise GuestFault(13, 0)
            self.feature_control = value & 0x1   # only the lock bit: no VMX/SMX
        else:
            raise GuestFault(13, 0)


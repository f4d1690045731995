"""CPUX86State as seen through Unicorn's context blob, and the check that it is the one we know.

``uc_context_save`` copies ``CPUX86State`` up to ``end_reset_fields`` into the blob and
``uc_context_restore`` copies it back (a plain memcpy, no side effects).  Between two
``emu_start`` calls the blob therefore *is* the CPU: interrupt delivery reads and writes the
segment caches, hflags, EFLAGS and RIP there, because ``reg_write(CS, …)`` in
``UC_MODE_64`` changes only the selector.

The offsets below are those of the pinned release (unicorn 2.1.4, x86_64 target,
``target_ulong`` = 8 bytes), taken from ``qemu/target/i386/cpu.h`` of that release.
:func:`verify_layout` proves them on the loaded library at start-up and raises
:class:`~emu.errors.CpuError` on any other build.

One field of Unicorn's own ``struct uc_struct`` is set too: ``no_exit_request``, so that a stop
never rewinds a half-done instruction (:func:`stop_only_between_instructions`, found and proven
by :func:`find_no_exit_request`).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Optional

from emu.cpu.uclib import unicorn
from emu.errors import CpuError

uc_const = unicorn.unicorn_const
x86 = unicorn.x86_const

#: sizeof(struct uc_context): the header before the CPUX86State copy.
CTX_HEADER = 40
#: offsetof(CPUX86State, end_reset_fields): the length of the copy.
CTX_STATE_SIZE = 5568

# --- CPUX86State field offsets (qemu/target/i386/cpu.h, unicorn 2.1.4) -----------------
OFF_REGS = 0            # target_ulong regs[16]
OFF_EIP = 128
OFF_EFLAGS = 136        # complete EFLAGS between runs (cpu_exec_exit folds CC_* back in)
OFF_HFLAGS = 176
OFF_HFLAGS2 = 180
OFF_SEGS = 184          # SegmentCache segs[6] {u32 selector; u64 base; u32 limit; u32 flags}
SEG_SIZE = 24
OFF_LDT = 328
OFF_TR = 352
OFF_GDT = 376
OFF_IDT = 400
OFF_CR = 424            # target_ulong cr[9]
OFF_A20_MASK = 496      # int32
OFF_EFER = 592
OFF_ERROR_CODE = 5384   # int
OFF_EXC_IS_INT = 5388   # int
OFF_EXC_NEXT_EIP = 5392
OFF_OLD_EXCEPTION = 5496  # int: QEMU's #DF detection; only do_interrupt resets it
OFF_VM_VMCB = 5504      # u64: physical address of the SVM VMCB
OFF_INTERCEPT = 5520    # u64: SVM intercept bits (1 << (exit code - SVM_EXIT_INTR))

R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI = range(8)

# hflags (cpu.h HF_*)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ_MASK = 1 << 3   # interrupt shadow after STI / MOV SS / POP SS
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_PE_MASK = 1 << 7
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15
HF_GUEST_MASK = 1 << 21        # SVM intercepts active (see vcpu.py: how we use them)

# Segment descriptor bits as QEMU keeps them in SegmentCache.flags (= descriptor dword 2).
DESC_TYPE_SHIFT = 8
DESC_A_MASK = 1 << 8
DESC_W_MASK = 1 << 9           # data: writable
DESC_R_MASK = 1 << 9           # code: readable
DESC_C_MASK = 1 << 10          # code: conforming
DESC_CS_MASK = 1 << 11         # code segment
DESC_S_MASK = 1 << 12          # code/data (not system)
DESC_DPL_SHIFT = 13
DESC_P_MASK = 1 << 15
DESC_L_MASK = 1 << 21
DESC_B_MASK = 1 << 22
DESC_G_MASK = 1 << 23

# EFLAGS
CF = 1 << 0
TF = 1 << 8
IF = 1 << 9
IOPL_MASK = 3 << 12
NT = 1 << 14
RF = 1 << 16
VM = 1 << 17
AC = 1 << 18

CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_OSXSAVE = 1 << 18
EFER_SCE = 1 << 0
EFER_LMA = 1 << 10

# SVM exit codes (qemu/target/i386/svm.h) we intercept; Unicorn reports them to
# UC_HOOK_INTR as EXCP_VMEXIT (0x100) + code.
EXCP_VMEXIT = 0x100
SVM_EXIT_INTR = 0x060
SVM_EXIT_CPUID = 0x072
SVM_EXIT_HLT = 0x078
SVM_EXIT_MSR = 0x07C
SVM_EXIT_ICEBP = 0x088
SVM_EXIT_MONITOR = 0x08A
SVM_EXIT_MWAIT = 0x08B
#: struct vmcb: offsetof(control.msrpm_base_pa)
VMCB_MSRPM_BASE_PA = 72

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_SEG = struct.Struct("<IxxxxQII")


class CpuState:
    """A writable view of the CPU state held in one Unicorn context blob.

    ``load()`` copies the live CPU into the blob (``context_update``), ``store()`` copies
    it back (``context_restore``).  Call both only on the vCPU thread, outside
    ``emu_start``.

    :param uc: the Unicorn instance.
    """

    def __init__(self, uc: "unicorn.Uc") -> None:
        self.uc = uc
        self.ctx = uc.context_save()
        if self.ctx.size != CTX_HEADER + CTX_STATE_SIZE:
            raise CpuError(f"unexpected Unicorn context size {self.ctx.size}")
        raw = (ctypes.c_char * self.ctx.size).from_address(self.ctx.context.value)
        self.mv = memoryview(raw).cast("B")[CTX_HEADER:]

    def load(self) -> "CpuState":
        """Copy the live CPU state into the blob."""
        self.uc.context_update(self.ctx)
        return self

    def store(self) -> None:
        """Make the blob the live CPU state."""
        self.uc.context_restore(self.ctx)

    def snapshot(self) -> bytes:
        """The blob's bytes (for saving and restoring the whole state)."""
        return bytes(self.mv)

    def restore_bytes(self, data: bytes) -> None:
        """Overwrite the blob with ``data`` (from :meth:`snapshot`); call :meth:`store` after."""
        self.mv[:] = data

    # raw accessors
    def u32(self, off: int) -> int:
        return _U32.unpack_from(self.mv, off)[0]

    def i32(self, off: int) -> int:
        return _I32.unpack_from(self.mv, off)[0]

    def u64(self, off: int) -> int:
        return _U64.unpack_from(self.mv, off)[0]

    def w32(self, off: int, value: int) -> None:
        _U32.pack_into(self.mv, off, value & 0xFFFFFFFF)

    def w64(self, off: int, value: int) -> None:
        _U64.pack_into(self.mv, off, value & 0xFFFFFFFFFFFFFFFF)

    # registers
    def reg(self, index: int) -> int:
        return self.u64(OFF_REGS + 8 * index)

    def set_reg(self, index: int, value: int) -> None:
        self.w64(OFF_REGS + 8 * index, value)

    @property
    def rip(self) -> int:
        return self.u64(OFF_EIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self.w64(OFF_EIP, value)

    @property
    def eflags(self) -> int:
        return self.u64(OFF_EFLAGS)

    @eflags.setter
    def eflags(self, value: int) -> None:
        self.w64(OFF_EFLAGS, value)

    @property
    def hflags(self) -> int:
        return self.u32(OFF_HFLAGS)

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.w32(OFF_HFLAGS, value)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return self.u64(OFF_CR + 8 * n)

    def set_cr(self, n: int, value: int) -> None:
        self.w64(OFF_CR + 8 * n, value)

    @property
    def efer(self) -> int:
        return self.u64(OFF_EFER)

    def seg(self, index: int) -> tuple[int, int, int, int]:
        """``(selector, base, limit, flags)`` of segment register ``index`` (R_ES…R_GS)."""
        return _SEG.unpack_from(self.mv, OFF_SEGS + index * SEG_SIZE)

    def table(self, off: int) -> tuple[int, int, int, int]:
        """``(selector, base, limit, flags)`` of LDTR/TR/GDTR/IDTR (OFF_LDT … OFF_IDT)."""
        return _SEG.unpack_from(self.mv, off)

    def load_seg_cache(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Fill a segment cache and update hflags, as QEMU's ``cpu_x86_load_seg_cache``."""
        _SEG.pack_into(self.mv, OFF_SEGS + index * SEG_SIZE, selector & 0xFFFF,
                       base & 0xFFFFFFFFFFFFFFFF, limit & 0xFFFFFFFF, flags & 0xFFFFFFFF)
        hf = self.hflags
        if index == R_CS:
            if (hf & HF_LMA_MASK) and (flags & DESC_L_MASK):
                hf |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
            else:
                hf = (hf & ~(HF_CS32_MASK | HF_CS64_MASK)) | ((flags & DESC_B_MASK) >> (22 - 4))
        if index == R_SS:
            hf = (hf & ~HF_CPL_MASK) | ((flags >> DESC_DPL_SHIFT) & 3)
        new = (self.seg(R_SS)[3] & DESC_B_MASK) >> (22 - 5)
        if hf & HF_CS64_MASK:
            pass
        elif not (self.cr(0) & CR0_PE) or (self.eflags & VM) or not (hf & HF_CS32_MASK):
            new |= HF_ADDSEG_MASK
        else:
            nonzero = self.seg(R_DS)[1] | self.seg(R_ES)[1] | self.seg(R_SS)[1]
            new |= int(nonzero != 0) << 6
        self.hflags = (hf & ~(HF_SS32_MASK | HF_ADDSEG_MASK)) | new


_verified = False


def verify_layout() -> None:
    """Prove the offsets above on the loaded libunicorn; raise CpuError if any is wrong.

    Uses scratch instances only: known register values must appear at their offsets, an
    ``INT 0x21`` must leave ``exception_is_int``/``exception_next_eip`` where we read them,
    and an SVM HLT intercept must be reported exactly as the run loop expects.
    """
    global _verified
    if _verified:
        return
    try:
        _verify_layout()
        _verified = True
    except CpuError:
        raise
    except Exception as err:  # a different build may fail anywhere in here
        raise CpuError(f"unicorn build does not match the expected CPU state layout: {err}") from err


def _verify_layout() -> None:
    uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    st = CpuState(uc)

    def expect(what: str, got: int, want: int) -> None:
        if got != want:
            raise CpuError(f"unicorn context layout check failed: {what} = {got:#x}, expected {want:#x}")

    uc.reg_write(x86.UC_X86_REG_RBX, 0x1111222233334444)
    uc.reg_write(x86.UC_X86_REG_RIP, 0xABCDEF12345)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x7000)
    uc.reg_write(x86.UC_X86_REG_FS_BASE, 0x5555AAAA0000)
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0x12340000, 0x7FF, 0))
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x56780000, 0x3F, 0))
    uc.msr_write(0xC0000080, 0xD01)
    st.load()
    expect("RBX", st.reg(R_EBX), 0x1111222233334444)
    expect("RIP", st.rip, 0xABCDEF12345)
    expect("CR3", st.cr(3), 0x7000)
    expect("FS.base", st.seg(R_FS)[1], 0x5555AAAA0000)
    expect("IDTR", st.table(OFF_IDT)[1] << 16 | st.table(OFF_IDT)[2], 0x12340000 << 16 | 0x7FF)
    expect("GDTR.base", st.table(OFF_GDT)[1], 0x56780000)
    expect("EFER", st.efer & 0xD01, 0xD01)
    expect("hflags.LMA", st.hflags & HF_LMA_MASK, HF_LMA_MASK)
    expect("a20_mask", st.u32(OFF_A20_MASK), 0xFFFFFFFF)

    # INT 0x21 at 0x1000 and an SVM-intercepted HLT at 0x1002.
    uc.mem_map(0, 0x10000)
    uc.mem_map(0x20000, 0x4000)
    uc.mem_write(0x1000, b"\xcd\x21\xf4")
    uc.mem_write(0x20000 + VMCB_MSRPM_BASE_PA, _U64.pack(0x21000))
    seen: list[tuple[int, int, int, int]] = []

    def on_intr(u: "unicorn.Uc", intno: int, _ud: object) -> None:
        s = CpuState(u).load()
        seen.append((intno, s.i32(OFF_EXC_IS_INT), s.u64(OFF_EXC_NEXT_EIP), s.rip))
        u.emu_stop()

    uc.hook_add(uc_const.UC_HOOK_INTR, on_intr)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    st.load()
    st.hflags = st.hflags | HF_GUEST_MASK
    st.w64(OFF_VM_VMCB, 0x20000)
    st.w64(OFF_INTERCEPT, 1 << (SVM_EXIT_HLT - SVM_EXIT_INTR))
    st.store()
    uc.emu_start(0x1000, 0)
    expect("INT 0x21 event", len(seen) and seen[0][0], 0x21)
    expect("exception_is_int", seen[0][1], 1)
    expect("exception_next_eip", seen[0][2], 0x1002)
    st.load()
    st.w32(OFF_EXC_IS_INT, 0)
    st.store()
    uc.emu_start(0x1002, 0)
    expect("HLT intercept event", len(seen) > 1 and seen[1][0], EXCP_VMEXIT + SVM_EXIT_HLT)
    expect("HLT intercept RIP", seen[1][3], 0x1002)


# --- stops only between instructions ------------------------------------------------------
#
# Unicorn 2.1.4 emits, after every guest load and store, a call to helper_check_exit_request
# (tcg-op.c: check_exit_request()).  When a stop is pending (uc_emu_stop -> cpu_exit) it leaves
# through cpu_loop_exit_restore(), which rewinds RIP to the *start* of the current instruction:
# whatever that instruction already did is done again when the CPU resumes.  REP INSW calls the
# IN hook, stores the word, hits the check, and restarts with RDI/RCX not yet advanced: the
# device sees an extra read, the guest loses a word.  The same happens to an MMIO read or write
# followed by the instruction's own store (MOVS, ADD [mmio]) and to a load-op-store on RAM.
# A kick from another thread lands there whenever it arrives during the callback; a kick from
# inside the callback (a device raising its IRQ line) always does.
#
# QEMU itself checks for exits only at the start of a translation block (and a REP string
# instruction is its own block, re-entered per iteration), so an exit there is always at an
# instruction boundary.  Unicorn keeps a flag to omit the per-access checks (uc_struct's
# ``bool no_exit_request``, used for ARM IT blocks and never touched on x86); it is read when a
# block is translated.  We set it on the vCPU's engine before it translates anything: a stop
# then takes effect at the next block boundary, which is also what the run loop assumed.
# The flag has no API, so its offset is found next to a known neighbour and proven by running
# the failing case (see find_no_exit_request).

#: ``bool no_exit_request`` follows ``int cpu_context_size`` (= CTX_STATE_SIZE), 4 bytes of
#: padding, ``uint64_t next_pc``, ``bool hook_insert``, ``bool first_tb``; then ``bool init_done``.
#: Observed at 2034 in the PyPI wheel and at 2050 in emu's patched build.
UC_NO_EXIT_AFTER_CONTEXT_SIZE = 18
_UC_SCAN = 4096          # sizeof(struct uc_struct) is ~15 KiB; the field is near 2 KiB

_no_exit_offset: Optional[int] = None


def _uc_bytes(uc: "unicorn.Uc", n: int) -> bytes:
    return ctypes.string_at(uc._uch.value, n)


def _set_no_exit_request(uc: "unicorn.Uc", offset: int) -> None:
    ctypes.c_bool.from_address(uc._uch.value + offset).value = True


def _candidates(raw: bytes) -> list[int]:
    """Offsets where ``no_exit_request`` may be: after the context size, with init_done set."""
    out = []
    for off in range(0, len(raw) - 24, 8):
        if _I32.unpack_from(raw, off)[0] != CTX_STATE_SIZE:
            continue
        flag = off + UC_NO_EXIT_AFTER_CONTEXT_SIZE
        if raw[flag] == 0 and raw[flag + 1] == 1 and raw[flag - 2] in (0, 1):
            out.append(flag)
    return out


def rep_insw_stop_probe(uc: "unicorn.Uc") -> tuple[int, int, int]:
    """Run ``REP INSW`` (RCX=3) on a scratch engine whose IN hook calls ``emu_stop`` at once.

    :returns: (IN hook calls, RCX, RDI - buffer) after ``emu_start`` returns: ``(1, 2, 2)``
        when the stop waits for the instruction boundary, ``(1, 3, 0)`` when the IN would be
        replayed (stock behaviour).
    """
    calls = [0]

    def on_in(u: "unicorn.Uc", port: int, size: int, _ud: object) -> int:
        calls[0] += 1
        u.emu_stop()
        return 0x1234

    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, b"\xf3\x66\x6d\xf4")          # rep insw; hlt
    uc.hook_add(uc_const.UC_HOOK_INSN, on_in, None, 1, 0, x86.UC_X86_INS_IN)
    uc.reg_write(x86.UC_X86_REG_RDI, 0x2000)
    uc.reg_write(x86.UC_X86_REG_RCX, 3)
    uc.reg_write(x86.UC_X86_REG_RDX, 0x1F0)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.emu_start(0x1000, 0)
    return (calls[0], uc.reg_read(x86.UC_X86_REG_RCX),
            uc.reg_read(x86.UC_X86_REG_RDI) - 0x2000)


def find_no_exit_request() -> int:
    """The offset of ``no_exit_request`` in the loaded library's ``struct uc_struct``.

    Found on a scratch engine and proven there: with the flag set, a stop requested inside the
    IN hook of ``REP INSW`` must end the run after that iteration, with RCX and RDI advanced.

    :raises CpuError: when the field cannot be found or setting it does not have that effect.
    """
    global _no_exit_offset
    if _no_exit_offset is not None:
        return _no_exit_offset
    try:
        uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
        uc.reg_read(x86.UC_X86_REG_RAX)       # the engine is built lazily, at its first use
        found = _candidates(_uc_bytes(uc, _UC_SCAN))
        if len(found) != 1:
            raise CpuError(f"found {len(found)} places for uc_struct.no_exit_request")
        _set_no_exit_request(uc, found[0])
        got = rep_insw_stop_probe(uc)
    except CpuError as err:
        raise CpuError(f"unicorn build not supported: {err}") from err
    except Exception as err:  # a different build may fail anywhere in here
        raise CpuError(f"unicorn build not supported: no_exit_request probe failed: {err}") from err
    if got != (1, 2, 2):
        raise CpuError(f"unicorn build not supported: a stop inside REP INSW still rewinds the "
                       f"instruction with no_exit_request set (IN calls, RCX, RDI delta = {got})")
    _no_exit_offset = found[0]
    return _no_exit_offset


def stop_only_between_instructions(uc: "unicorn.Uc") -> None:
    """Make ``emu_stop`` on ``uc`` take effect only at a translation-block boundary, never in
    the middle of an instruction (see the comment above :data:`UC_NO_EXIT_AFTER_CONTEXT_SIZE`).

    Call it before ``uc`` translates any code: blocks translated earlier keep the checks.

    :raises CpuError: on a libunicorn where this cannot be done (see :func:`find_no_exit_request`).
    """
    offset = find_no_exit_request()
    uc.reg_read(x86.UC_X86_REG_RAX)
    raw = _uc_bytes(uc, offset + 2)
    if _I32.unpack_from(raw, offset - UC_NO_EXIT_AFTER_CONTEXT_SIZE)[0] != CTX_STATE_SIZE:
        raise CpuError("uc_struct layout differs between two engines of the same library")
    _set_no_exit_request(uc, offset)

"""Event delivery as the processor does it (Intel SDM vol. 3, chapter 6; QEMU seg_helper.c).

One entry point, :meth:`Delivery.deliver`, takes an event — a hardware interrupt, a
software interrupt (INT n, INT3, INTO) or a CPU exception — and performs what the CPU
would: through the real-mode IVT, the 32-bit IDT (interrupt/trap gates, 16- and 32-bit,
privilege change with the stack from the TSS, virtual-8086 exit) or the 64-bit IDT (RSP0-2,
IST).  Faults found on the way (#GP/#NP/#TS/#SS with the selector error codes, #PF from the
stack pushes) are delivered in turn; two of them in a row become #DF, and a fault while
delivering #DF is a triple fault, which :meth:`deliver` reports to its caller.

SYSCALL and SYSENTER are here too, because Unicorn only reports them: the hook records the
event and :meth:`Delivery.syscall` / :meth:`Delivery.sysenter` do the rest.  SYSRET,
SYSEXIT and IRET run natively in Unicorn.

Error codes are QEMU 7.2's where it differs from the SDM: no EXT bit, and vector * 16 + 2
for a 64-bit IDT entry (the SDM: vector * 8 + 2), because test guests compare emu's verdicts
with QEMU's (guest-images/cpu/lm-exceptions checks 0x812 for INT 0x81 through a DPL0 gate).

Not implemented: task gates and hardware task switches (they give #GP here).  16-bit gates
follow QEMU's code but are not covered by tests.
"""

from __future__ import annotations

import enum
import struct
from typing import Optional

from emu.cpu.layout import (AC, CR0_PE, DESC_A_MASK, DESC_B_MASK, DESC_C_MASK, DESC_CS_MASK,
                            DESC_DPL_SHIFT, DESC_G_MASK, DESC_L_MASK, DESC_P_MASK, DESC_R_MASK,
                            DESC_S_MASK, DESC_W_MASK, EFER_SCE, HF_INHIBIT_IRQ_MASK,
                            HF_LMA_MASK, HF_CS64_MASK, IF, NT, OFF_EXC_IS_INT, OFF_GDT, OFF_IDT,
                            OFF_LDT, OFF_OLD_EXCEPTION, OFF_TR, R_CS, R_DS, R_ECX, R_ES, R_ESP,
                            R_FS, R_GS, R_SS, RF, TF, VM, CpuState)
from emu.cpu.mmu import GuestFault, LinearMem, PhysMem, WalkCache

#: Vectors that push an error code (when raised as exceptions).
EXC_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
#: "Contributory" exceptions for the double-fault rules (SDM table 6-5).
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
DF, TS, NP, SS, GP, PF = 8, 10, 11, 12, 13, 14


class Kind(enum.Enum):
    """What raised the event: it decides the return address, DPL checks and EXT bits."""

    HARDWARE = "hardware"   # external interrupt (PIC): return to the current RIP, EXT=1
    SOFTWARE = "software"   # INT n / INT3 / INTO: gate DPL checked against CPL
    EXCEPTION = "exception"  # CPU exception: error code for some vectors, EXT=1 on nested faults


class DeliveryResult(enum.Enum):
    DELIVERED = "delivered"
    TRIPLE_FAULT = "triple-fault"


def _desc_cache(e1: int, e2: int) -> tuple[int, int, int]:
    """``(base, limit, flags)`` of a segment descriptor given as its two dwords."""
    base = (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF000000)
    limit = (e1 & 0xFFFF) | (e2 & 0x000F0000)
    if e2 & DESC_G_MASK:
        limit = (limit << 12) | 0xFFF
    return base, limit, e2 & 0x00F0FF00


class Delivery:
    """Delivers events into the CPU state held by ``st``.

    :param st: the CPU state blob (loaded by the caller; stored here on success).
    :param phys: guest physical memory.
    """

    def __init__(self, st: CpuState, phys: PhysMem) -> None:
        self.st = st
        self.phys = phys
        #: Page walks kept between deliveries (IDT, GDT, TSS, stack pages), each re-checked
        #: before use (see :class:`~emu.cpu.mmu.WalkCache`); the vCPU shares it for code reads.
        self.walks = WalkCache()

    # ------------------------------------------------------------------ entry points
    def deliver(self, vector: int, kind: Kind, error_code: Optional[int] = None,
                cr2: Optional[int] = None, insn_length: int = 0) -> DeliveryResult:
        """Deliver one event, following the double-fault rules for faults on the way.

        The state must be loaded; RIP in it is the return address (the faulting
        instruction for faults, the next one for traps and INT n).  On success the
        state is stored into the CPU.

        :param vector: 0-255.
        :param kind: what raised it.
        :param error_code: for exceptions that push one.
        :param cr2: for #PF: the faulting address, written to CR2.
        :param insn_length: for software interrupts, the length of the INT instruction
            (RIP is after it): a fault while delivering points at the instruction itself.
        :returns: :attr:`DeliveryResult.TRIPLE_FAULT` when the CPU must shut down.
        """
        st = self.st
        saved = st.snapshot()
        for _attempt in range(6):
            try:
                if vector == PF and cr2 is not None:
                    st.set_cr(2, cr2)
                self._deliver_one(vector, kind, error_code)
            except GuestFault as fault:
                # Nothing of the failed attempt stays in the registers (memory writes do).
                st.restore_bytes(saved)
                if kind is Kind.SOFTWARE:
                    st.rip = st.rip - insn_length   # the fault is the INT instruction's
                if fault.vector == PF and fault.cr2 is not None:
                    st.set_cr(2, fault.cr2)         # a page fault loads CR2 when it happens
                saved = st.snapshot()
                if kind is Kind.EXCEPTION and vector == DF:
                    return DeliveryResult.TRIPLE_FAULT
                first_contrib = kind is Kind.EXCEPTION and vector in CONTRIBUTORY
                first_pf = kind is Kind.EXCEPTION and vector == PF
                second_contrib = fault.vector in CONTRIBUTORY
                if (first_contrib and second_contrib) or (first_pf and (second_contrib or fault.vector == PF)):
                    vector, kind, error_code, cr2 = DF, Kind.EXCEPTION, 0, None
                else:
                    vector, kind, error_code, cr2 = fault.vector, Kind.EXCEPTION, fault.error_code, fault.cr2
                continue
            # Unicorn never runs do_interrupt, which is what resets these in QEMU.
            st.w32(OFF_OLD_EXCEPTION, 0xFFFFFFFF)
            st.w32(OFF_EXC_IS_INT, 0)
            st.store()
            return DeliveryResult.DELIVERED
        return DeliveryResult.TRIPLE_FAULT

    def can_take_interrupt(self) -> bool:
        """EFLAGS.IF=1 and no interrupt shadow (STI, MOV SS, POP SS)."""
        st = self.st
        return bool(st.eflags & IF) and not (st.hflags & HF_INHIBIT_IRQ_MASK)

    # ------------------------------------------------------------------ helpers
    def _descriptor(self, mem: LinearMem, selector: int, ext: int, exc: int = GP) -> tuple[int, int]:
        """Read the GDT/LDT descriptor of ``selector``; ``exc`` (with the selector) if outside the table."""
        st = self.st
        if selector & 4:
            _sel, base, limit, _f = st.table(OFF_LDT)
        else:
            _sel, base, limit, _f = st.table(OFF_GDT)
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(exc, (selector & 0xFFFC) | ext)
        e1, e2 = struct.unpack("<II", mem.read(base + index, 8))
        return e1, e2

    def _tss_stack(self, mem: LinearMem, dpl: int, ext: int) -> tuple[int, int]:
        """``(ss, esp)`` for privilege ``dpl`` from the current 32- or 16-bit TSS."""
        sel, base, limit, flags = self.st.table(OFF_TR)
        if not (flags & DESC_P_MASK):
            raise GuestFault(TS, (sel & 0xFFFC) | ext)
        shift = (flags >> 11) & 1  # type bit 3: 32-bit TSS
        index = (dpl * 4 + 2) << shift
        if index + (4 << shift) - 1 > limit:
            raise GuestFault(TS, (sel & 0xFFFC) | ext)
        if shift:
            esp, ss = struct.unpack("<IH", mem.read(base + index, 6))
        else:
            esp, ss = struct.unpack("<HH", mem.read(base + index, 4))
        return ss, esp

    # ------------------------------------------------------------------ one delivery
    def _deliver_one(self, vector: int, kind: Kind, error_code: Optional[int]) -> None:
        st = self.st
        mem = LinearMem(st, self.phys, self.walks)
        has_error = kind is Kind.EXCEPTION and vector in EXC_WITH_ERROR_CODE
        if has_error and error_code is None:
            error_code = 0
        # QEMU 7.2 never sets the EXT bit in these error codes (the SDM sets it for events
        # external to the program); we give what QEMU gives, see the module docstring.
        ext = 0
        self._idt_unit = 16 if st.hflags & HF_LMA_MASK else 8
        if not (st.cr(0) & CR0_PE):
            self._real_mode(mem, vector)
        elif st.hflags & HF_LMA_MASK:
            self._long_mode(mem, vector, kind, error_code if has_error else None, ext)
        else:
            self._protected_mode(mem, vector, kind, error_code if has_error else None, ext)

    def _real_mode(self, mem: LinearMem, vector: int) -> None:
        st = self.st
        _s, idt_base, idt_limit, _f = st.table(OFF_IDT)
        if vector * 4 + 3 > idt_limit:
            raise GuestFault(GP, vector * 8 + 2)
        offset, segment = struct.unpack("<HH", mem.read(idt_base + vector * 4, 4))
        flags = st.eflags
        cs = st.seg(R_CS)[0]
        ss_base = st.seg(R_SS)[1]
        rsp = st.reg(R_ESP)
        sp = rsp & 0xFFFF
        for value in (flags, cs, st.rip):
            sp = (sp - 2) & 0xFFFF
            mem.write(ss_base + sp, struct.pack("<H", value & 0xFFFF))
        st.set_reg(R_ESP, (rsp & ~0xFFFF) | sp)
        st.load_seg_cache(R_CS, segment, segment << 4, 0xFFFF, st.seg(R_CS)[3] & ~DESC_B_MASK)
        st.rip = offset
        st.eflags = flags & ~(IF | TF | AC | RF)

    def _idt_error(self, vector: int) -> int:
        """Error code naming an IDT entry: index * 8 + 2 (IDT bit).  QEMU 7.2's 64-bit path
        uses vector * 16 + 2 (the gate's byte offset); we match QEMU, as the guests'
        verdicts are compared with it."""
        return vector * self._idt_unit + 2

    def _gate_checks(self, vector: int, kind: Kind, e2: int, ext: int) -> int:
        """Common IDT gate checks; returns the gate type."""
        gate_type = (e2 >> 8) & 0x1F
        dpl = (e2 >> DESC_DPL_SHIFT) & 3
        if kind is Kind.SOFTWARE and dpl < self.st.cpl:
            raise GuestFault(GP, self._idt_error(vector))
        if not (e2 & DESC_P_MASK):
            raise GuestFault(NP, self._idt_error(vector) + ext)
        return gate_type

    def _code_segment(self, mem: LinearMem, selector: int, ext: int) -> tuple[int, int, int]:
        """Checks of the gate's target code segment; returns ``(e1, e2, dpl)``."""
        if (selector & 0xFFFC) == 0:
            raise GuestFault(GP, ext)
        e1, e2 = self._descriptor(mem, selector, ext)
        dpl = (e2 >> DESC_DPL_SHIFT) & 3
        if not (e2 & DESC_S_MASK) or not (e2 & DESC_CS_MASK) or dpl > self.st.cpl:
            raise GuestFault(GP, (selector & 0xFFFC) | ext)
        if not (e2 & DESC_P_MASK):
            raise GuestFault(NP, (selector & 0xFFFC) | ext)
        return e1, e2, dpl

    def _protected_mode(self, mem: LinearMem, vector: int, kind: Kind,
                        error_code: Optional[int], ext: int) -> None:
        st = self.st
        _s, idt_base, idt_limit, _f = st.table(OFF_IDT)
        if vector * 8 + 7 > idt_limit:
            raise GuestFault(GP, self._idt_error(vector) + ext)
        e1, e2 = struct.unpack("<II", mem.read(idt_base + vector * 8, 8))
        gate_type = (e2 >> 8) & 0x1F
        if gate_type not in (6, 7, 14, 15):
            # 5 = task gate: hardware task switching is not implemented (documented).
            raise GuestFault(GP, self._idt_error(vector) + ext)
        self._gate_checks(vector, kind, e2, ext)
        selector = e1 >> 16
        offset = (e2 & 0xFFFF0000) | (e1 & 0xFFFF)
        c1, c2, dpl = self._code_segment(mem, selector, ext)
        cpl = st.cpl
        flags = st.eflags
        vm86 = bool(flags & VM)
        if not (c2 & DESC_C_MASK) and dpl < cpl:
            ss, esp = self._tss_stack(mem, dpl, ext)
            if (ss & 0xFFFC) == 0:
                raise GuestFault(TS, ext)
            if (ss & 3) != dpl:
                raise GuestFault(TS, (ss & 0xFFFC) | ext)
            s1, s2 = self._descriptor(mem, ss, ext, exc=TS)
            ss_dpl = (s2 >> DESC_DPL_SHIFT) & 3
            if ss_dpl != dpl or not (s2 & DESC_S_MASK) or (s2 & DESC_CS_MASK) or not (s2 & DESC_W_MASK):
                raise GuestFault(TS, (ss & 0xFFFC) | ext)
            if not (s2 & DESC_P_MASK):
                raise GuestFault(SS, (ss & 0xFFFC) | ext)
            new_stack = True
            ss_base, ss_limit, ss_flags = _desc_cache(s1, s2)
            new_cpl = dpl
        else:
            if vm86:
                raise GuestFault(GP, (selector & 0xFFFC) | ext)
            new_stack = False
            ss = st.seg(R_SS)[0]
            ss_base, ss_limit, ss_flags = st.seg(R_SS)[1:]
            esp = st.reg(R_ESP)
            new_cpl = cpl
        if vm86 and new_cpl != 0:
            raise GuestFault(GP, (selector & 0xFFFC) | ext)
        sp_mask = 0xFFFFFFFF if ss_flags & DESC_B_MASK else 0xFFFF
        size = 4 if gate_type & 8 else 2
        frame: list[int] = []
        if new_stack:
            if vm86:
                frame += [st.seg(R_GS)[0], st.seg(R_FS)[0], st.seg(R_DS)[0], st.seg(R_ES)[0]]
            frame += [st.seg(R_SS)[0], st.reg(R_ESP) & 0xFFFFFFFF]
        frame += [flags & 0xFFFFFFFF, st.seg(R_CS)[0], st.rip & 0xFFFFFFFF]
        if error_code is not None:
            frame.append(error_code)
        sp = mem.push(ss_base, esp, sp_mask, frame, size, user=new_cpl == 3)
        if new_stack:
            if vm86:
                for seg in (R_ES, R_DS, R_FS, R_GS):
                    st.load_seg_cache(seg, 0, 0, 0, 0)
            st.load_seg_cache(R_SS, (ss & 0xFFFC) | new_cpl, ss_base, ss_limit, ss_flags)
        rsp = st.reg(R_ESP) if not new_stack else 0
        st.set_reg(R_ESP, (rsp & ~sp_mask) | sp)
        base, limit, cflags = _desc_cache(c1, c2)
        st.eflags = flags & ~(TF | VM | RF | NT | (IF if not gate_type & 1 else 0))
        st.load_seg_cache(R_CS, (selector & 0xFFFC) | new_cpl, base, limit, cflags)
        st.rip = offset if size == 4 else offset & 0xFFFF

    def _long_mode(self, mem: LinearMem, vector: int, kind: Kind,
                   error_code: Optional[int], ext: int) -> None:
        st = self.st
        _s, idt_base, idt_limit, _f = st.table(OFF_IDT)
        if vector * 16 + 15 > idt_limit:
            raise GuestFault(GP, self._idt_error(vector) + ext)
        raw = mem.read(idt_base + vector * 16, 16)
        e1, e2, e3 = struct.unpack_from("<III", raw)
        gate_type = (e2 >> 8) & 0x1F
        if gate_type not in (14, 15):
            raise GuestFault(GP, self._idt_error(vector) + ext)
        self._gate_checks(vector, kind, e2, ext)
        selector = e1 >> 16
        offset = (e2 & 0xFFFF0000) | (e1 & 0xFFFF) | (e3 << 32)
        ist = e2 & 7
        c1, c2, dpl = self._code_segment(mem, selector, ext)
        if not (c2 & DESC_L_MASK) or (c2 & DESC_B_MASK):
            raise GuestFault(GP, (selector & 0xFFFC) | ext)
        cpl = st.cpl
        flags = st.eflags
        if not (c2 & DESC_C_MASK) and dpl < cpl:
            new_cpl = dpl
        else:
            new_cpl = cpl
        if ist or new_cpl != cpl:
            tr_sel, tr_base, tr_limit, _tf = st.table(OFF_TR)
            index = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
            if index + 7 > tr_limit:
                raise GuestFault(TS, (tr_sel & 0xFFFC) | ext)
            rsp = struct.unpack("<Q", mem.read(tr_base + index, 8))[0]
        else:
            rsp = st.reg(R_ESP)
        rsp &= ~0xF
        frame = [st.seg(R_SS)[0], st.reg(R_ESP), flags, st.seg(R_CS)[0], st.rip]
        if error_code is not None:
            frame.append(error_code)
        rsp = mem.push(0, rsp, 0xFFFFFFFFFFFFFFFF, frame, 8, user=new_cpl == 3)
        if new_cpl != cpl:
            # A ring change in long mode loads SS with a NULL selector whose RPL is the new CPL.
            st.load_seg_cache(R_SS, new_cpl, 0, 0, new_cpl << DESC_DPL_SHIFT)
        st.set_reg(R_ESP, rsp)
        base, limit, cflags = _desc_cache(c1, c2)
        st.eflags = flags & ~(TF | VM | RF | NT | (IF if not gate_type & 1 else 0))
        st.load_seg_cache(R_CS, (selector & 0xFFFC) | new_cpl, base, limit, cflags)
        st.rip = offset

    # ------------------------------------------------------------------ fast system calls
    def syscall(self, star: int, lstar: int, cstar: int, fmask: int) -> None:
        """Complete a SYSCALL that Unicorn skipped (RIP already after the instruction).

        As QEMU's ``helper_syscall``: #UD without EFER.SCE; in long mode RCX/R11 get the
        return RIP/RFLAGS and CS:RIP comes from STAR/LSTAR (CSTAR from compatibility mode);
        in legacy mode ECX gets EIP and CS:EIP comes from STAR.
        """
        st = self.st
        if not (st.efer & EFER_SCE):
            raise GuestFault(6)
        selector = (star >> 32) & 0xFFFF
        flags = st.eflags
        code = DESC_G_MASK | DESC_P_MASK | DESC_S_MASK | DESC_CS_MASK | DESC_R_MASK | DESC_A_MASK
        data = DESC_G_MASK | DESC_B_MASK | DESC_P_MASK | DESC_S_MASK | DESC_W_MASK | DESC_A_MASK
        if st.hflags & HF_LMA_MASK:
            code64 = bool(st.hflags & HF_CS64_MASK)
            st.set_reg(R_ECX, st.rip)
            st.set_reg(11, flags & ~RF)
            st.eflags = flags & ~(fmask | RF)
            st.load_seg_cache(R_CS, selector & 0xFFFC, 0, 0xFFFFFFFF, code | DESC_L_MASK)
            st.load_seg_cache(R_SS, (selector + 8) & 0xFFFC, 0, 0xFFFFFFFF, data)
            st.rip = lstar if code64 else cstar
        else:
            st.set_reg(R_ECX, st.rip & 0xFFFFFFFF)
            st.eflags = flags & ~(IF | RF | VM)
            st.load_seg_cache(R_CS, selector & 0xFFFC, 0, 0xFFFFFFFF, code | DESC_B_MASK)
            st.load_seg_cache(R_SS, (selector + 8) & 0xFFFC, 0, 0xFFFFFFFF, data)
            st.rip = star & 0xFFFFFFFF
        st.w32(OFF_EXC_IS_INT, 0)
        st.store()

    def sysenter(self, cs: int, esp: int, eip: int) -> None:
        """Complete a SYSENTER that Unicorn skipped, as QEMU's ``helper_sysenter``.

        :param cs: IA32_SYSENTER_CS (0 gives #GP(0)).
        """
        st = self.st
        if cs & 0xFFFC == 0:
            raise GuestFault(GP, 0)
        code = DESC_G_MASK | DESC_P_MASK | DESC_S_MASK | DESC_CS_MASK | DESC_R_MASK | DESC_A_MASK
        data = DESC_G_MASK | DESC_B_MASK | DESC_P_MASK | DESC_S_MASK | DESC_W_MASK | DESC_A_MASK
        st.eflags = st.eflags & ~(VM | IF | RF)
        if st.hflags & HF_LMA_MASK:
            st.load_seg_cache(R_CS, cs & 0xFFFC, 0, 0xFFFFFFFF, code | DESC_L_MASK)
        else:
            st.load_seg_cache(R_CS, cs & 0xFFFC, 0, 0xFFFFFFFF, code | DESC_B_MASK)
        st.load_seg_cache(R_SS, (cs + 8) & 0xFFFC, 0, 0xFFFFFFFF, data)
        st.set_reg(R_ESP, esp)
        st.rip = eip
        st.w32(OFF_EXC_IS_INT, 0)
        st.store()

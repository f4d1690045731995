"""The vCPU's state as QEMU 7.2 prints it: HMP ``info registers`` (``x86_cpu_dump_state``
with ``CPU_DUMP_FPU``, target/i386/cpu-dump.c), and the register values HMP address
expressions name (``x /10xb $eip``).

The state is read where calling Unicorn is safe (:meth:`emu.cpu.vcpu.VCPU._with_cpu_stopped`:
a running vCPU is parked for the read, as QEMU's ``cpu_synchronize_state`` stops a KVM vCPU).
General registers, segment caches, descriptor tables, control registers, EFER and hflags come
from the CPUX86State copy (:class:`emu.cpu.layout.CpuState`); debug, x87 and SSE registers
through Unicorn's register interface.
"""

from __future__ import annotations

from typing import Any, Callable

from emu.cpu import layout as L

x86 = L.x86

HF_SMM_SHIFT = 19
#: segment descriptor flag bits (cpu.h DESC_*), as QEMU keeps them in SegmentCache.flags
DESC_P = 1 << 15
DESC_S = 1 << 12
DESC_CS = 1 << 11
DESC_C = 1 << 10        # code: conforming / data: expand-down (DESC_E)
DESC_R = 1 << 9         # code: readable / data: writable (DESC_W)
DESC_A = 1 << 8
DESC_B = 1 << 22
DESC_L = 1 << 21
_SYS_TYPES = (
    ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
     "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved",
     "IntGate32", "TrapGate32"),
    ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
     "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64",
     "TrapGate64"))
_GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGS = ("es", "cs", "ss", "ds", "fs", "gs")


def read_state(cpu: Any) -> dict[str, Any]:
    """Everything ``info registers`` shows, read in one stop of the vCPU."""
    out: dict[str, Any] = {}

    def read() -> None:
        uc = cpu._uc
        st = L.CpuState(uc).load()
        for i, name in enumerate(_GPR):
            out[name] = st.reg(i)
        out.update(rip=st.rip, eflags=st.eflags, hflags=st.hflags, efer=st.efer,
                   cr=[st.cr(n) for n in range(5)])
        out["segs"] = [st.seg(i) for i in range(6)]
        out["ldt"] = st.table(L.OFF_LDT)
        out["tr"] = st.table(L.OFF_TR)
        out["gdt"] = st.table(L.OFF_GDT)
        out["idt"] = st.table(L.OFF_IDT)
        out["dr"] = [uc.reg_read(getattr(x86, f"UC_X86_REG_DR{n}")) & (2**64 - 1) for n in range(8)]
        out["fpuc"] = uc.reg_read(x86.UC_X86_REG_FPCW)
        out["fpus"] = uc.reg_read(x86.UC_X86_REG_FPSW)
        out["fptag"] = uc.reg_read(x86.UC_X86_REG_FPTAG)
        out["fpregs"] = [uc.reg_read(getattr(x86, f"UC_X86_REG_FP{n}")) for n in range(8)]
        out["mxcsr"] = uc.reg_read(x86.UC_X86_REG_MXCSR)
        out["xmm"] = [uc.reg_read(getattr(x86, f"UC_X86_REG_XMM{n}")) for n in range(16)]

    cpu._with_cpu_stopped(read)
    out["a20"] = int(bool(getattr(cpu, "a20_enabled", True)))
    out["halted"] = int(bool(getattr(cpu, "halted", False)))
    return out


def named_registers(s: dict[str, Any]) -> dict[str, int]:
    """:func:`read_state`'s result as flat names: ``rax`` .. ``r15``, ``rip``, ``rflags``,
    ``cpl``, ``es`` .. ``gs`` (selectors) with ``cs_base``/``cs_limit``/``cs_flags`` and so on,
    ``ldtr``/``tr`` likewise, ``gdt_base``/``gdt_limit``, ``idt_base``/``idt_limit``,
    ``cr0`` .. ``cr4``, ``dr0`` .. ``dr7``, ``efer``, ``fpcw``, ``fpsw``, ``fptag``, ``st0``
    .. ``st7`` (80-bit values of the physical x87 registers as ints), ``mxcsr``, ``xmm0`` ..
    ``xmm15``, ``a20``, ``halted``, ``interrupt_shadow``."""
    out: dict[str, int] = {name: s[name] for name in _GPR}
    out.update(rip=s["rip"], rflags=s["eflags"], cpl=s["hflags"] & L.HF_CPL_MASK,
               interrupt_shadow=(s["hflags"] >> 3) & 1, efer=s["efer"], a20=s["a20"],
               halted=s["halted"], fpcw=s["fpuc"], fpsw=s["fpus"], fptag=s["fptag"],
               mxcsr=s["mxcsr"])
    for name, cache in [*zip(_SEGS, s["segs"]), ("ldtr", s["ldt"]), ("tr", s["tr"])]:
        sel, base, limit, flags = cache
        out[name] = sel & 0xFFFF
        out[name + "_base"], out[name + "_limit"], out[name + "_flags"] = base, limit, flags
    for name in ("gdt", "idt"):
        _sel, base, limit, _flags = s[name]
        out[name + "_base"], out[name + "_limit"] = base, limit
    for n in (0, 2, 3, 4):
        out[f"cr{n}"] = s["cr"][n]
    for n in range(8):
        out[f"dr{n}"] = s["dr"][n]
        mant, exp = s["fpregs"][n]
        out[f"st{n}"] = ((exp & 0xFFFF) << 64) | (mant & (2**64 - 1))
    for n in range(16):
        out[f"xmm{n}"] = s["xmm"][n]
    return out


def _seg_line(s: dict[str, Any], name: str, cache: tuple[int, int, int, int]) -> str:
    sel, base, limit, flags = cache
    hf = s["hflags"]
    if hf & L.HF_CS64_MASK:
        line = f"{name:<3}={sel & 0xFFFF:04x} {base:016x} {limit & 0xFFFFFFFF:08x} {flags & 0x00FFFF00:08x}"
    else:
        line = (f"{name:<3}={sel & 0xFFFF:04x} {base & 0xFFFFFFFF:08x} {limit & 0xFFFFFFFF:08x} "
                f"{flags & 0x00FFFF00:08x}")
    if not (hf & L.HF_PE_MASK) or not (flags & DESC_P):
        return line
    line += f" DPL={(flags >> 13) & 3} "
    if flags & DESC_S:
        if flags & DESC_CS:
            line += "CS64" if flags & DESC_L else ("CS32" if flags & DESC_B else "CS16")
            line += f" [{'C' if flags & DESC_C else '-'}{'R' if flags & DESC_R else '-'}"
        else:
            line += "DS  " if (flags & DESC_B or hf & L.HF_LMA_MASK) else "DS16"
            line += f" [{'E' if flags & DESC_C else '-'}{'W' if flags & DESC_R else '-'}"
        line += f"{'A' if flags & DESC_A else '-'}]"
    else:
        line += _SYS_TYPES[1 if hf & L.HF_LMA_MASK else 0][(flags >> 8) & 15]
    return line


def format_state(s: dict[str, Any]) -> str:
    """``x86_cpu_dump_state(cs, f, CPU_DUMP_FPU)`` of QEMU 7.2 for the state :func:`read_state`
    returned (no ``CPU#n`` header)."""
    hf, fl = s["hflags"], s["eflags"]
    flag_text = "".join(c if fl & bit else "-" for c, bit in (
        ("D", 0x400), ("O", 0x800), ("S", 0x80), ("Z", 0x40), ("A", 0x10), ("P", 0x4), ("C", 0x1)))
    tail = (f"[{flag_text}] CPL={hf & L.HF_CPL_MASK} II={(hf >> 3) & 1} A20={s['a20']} "
            f"SMM={(hf >> HF_SMM_SHIFT) & 1} HLT={s['halted']}")
    lines = []
    if hf & L.HF_CS64_MASK:
        q = {k: s[k] for k in _GPR}
        lines += [f"RAX={q['rax']:016x} RBX={q['rbx']:016x} RCX={q['rcx']:016x} RDX={q['rdx']:016x}",
                  f"RSI={q['rsi']:016x} RDI={q['rdi']:016x} RBP={q['rbp']:016x} RSP={q['rsp']:016x}",
                  f"R8 ={q['r8']:016x} R9 ={q['r9']:016x} R10={q['r10']:016x} R11={q['r11']:016x}",
                  f"R12={q['r12']:016x} R13={q['r13']:016x} R14={q['r14']:016x} R15={q['r15']:016x}",
                  f"RIP={s['rip']:016x} RFL={fl & 0xFFFFFFFF:08x} {tail}"]
    else:
        d = {k: s[k] & 0xFFFFFFFF for k in _GPR[:8]}
        lines += [f"EAX={d['rax']:08x} EBX={d['rbx']:08x} ECX={d['rcx']:08x} EDX={d['rdx']:08x}",
                  f"ESI={d['rsi']:08x} EDI={d['rdi']:08x} EBP={d['rbp']:08x} ESP={d['rsp']:08x}",
                  f"EIP={s['rip'] & 0xFFFFFFFF:08x} EFL={fl & 0xFFFFFFFF:08x} {tail}"]
    for i, name in enumerate(_SEGS):
        lines.append(_seg_line(s, name.upper(), s["segs"][i]))
    lines.append(_seg_line(s, "LDT", s["ldt"]))
    lines.append(_seg_line(s, "TR", s["tr"]))
    cr, dr = s["cr"], s["dr"]
    _gsel, gbase, glimit, _gf = s["gdt"]
    _isel, ibase, ilimit, _if = s["idt"]
    if hf & L.HF_LMA_MASK:
        lines += [f"GDT=     {gbase:016x} {glimit & 0xFFFFFFFF:08x}",
                  f"IDT=     {ibase:016x} {ilimit & 0xFFFFFFFF:08x}",
                  f"CR0={cr[0] & 0xFFFFFFFF:08x} CR2={cr[2]:016x} CR3={cr[3]:016x} "
                  f"CR4={cr[4] & 0xFFFFFFFF:08x}"]
    else:
        lines += [f"GDT=     {gbase & 0xFFFFFFFF:08x} {glimit & 0xFFFFFFFF:08x}",
                  f"IDT=     {ibase & 0xFFFFFFFF:08x} {ilimit & 0xFFFFFFFF:08x}",
                  f"CR0={cr[0] & 0xFFFFFFFF:08x} CR2={cr[2] & 0xFFFFFFFF:08x} "
                  f"CR3={cr[3] & 0xFFFFFFFF:08x} CR4={cr[4] & 0xFFFFFFFF:08x}"]
    lines.append("".join(f"DR{n}={dr[n]:016x} " for n in range(4)))
    lines.append(f"DR6={dr[6]:016x} DR7={dr[7]:016x}")
    lines.append(f"EFER={s['efer']:016x}")
    fpus = s["fpus"]
    ftw = sum(1 << i for i in range(8) if (s["fptag"] >> (2 * i)) & 3 != 3)
    lines.append(f"FCW={s['fpuc']:04x} FSW={fpus:04x} [ST={(fpus >> 11) & 7}] FTW={ftw:02x} "
                 f"MXCSR={s['mxcsr']:08x}")
    fpr = [f"FPR{i}={m & (2**64 - 1):016x} {e & 0xFFFF:04x}" for i, (m, e) in enumerate(s["fpregs"])]
    lines += [f"{fpr[i]} {fpr[i + 1]}" for i in range(0, 8, 2)]
    nb = 16 if hf & L.HF_CS64_MASK else 8
    xmm = [f"XMM{i:02d}={(s['xmm'][i] >> 64) & (2**64 - 1):016x} {s['xmm'][i] & (2**64 - 1):016x}"
           for i in range(nb)]
    lines += [f"{xmm[i]} {xmm[i + 1]}" for i in range(0, nb, 2)]
    return "\n".join(lines) + "\n"


#: HMP's ``$name`` registers (target/i386/monitor.c ``monitor_defs``): name -> GPR index
_MONITOR_GPRS = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "sp": 4, "ebp": 5, "fp": 5,
                 "esi": 6, "edi": 7, **{f"r{n}": n for n in range(8, 16)}}


def _i32(v: int) -> int:
    """An ``MD_I32`` field: an int32 widened to the 64-bit target_long."""
    v &= 0xFFFFFFFF
    return (v - (1 << 32)) & (2**64 - 1) if v & 0x80000000 else v


def register_value(s: dict[str, Any], name: str) -> int | None:
    """The value HMP gives ``$name`` in an expression, or None for an unknown name.

    QEMU's x86_64 ``monitor_defs``: ``eax``..``edi`` (``sp``, ``fp``) and ``r8``..``r15``
    are the whole 64-bit registers, ``eflags`` and ``eip`` too, ``cs``..``gs`` the selectors,
    ``cs.base`` the base and ``cs.limit`` the limit (an int32, so 0xffffffff reads as -1),
    ``pc`` is CS base + EIP.  Names are case-sensitive.
    """
    if name in _MONITOR_GPRS:
        return s[_GPR[_MONITOR_GPRS[name]]] & (2**64 - 1)
    if name == "eflags":
        return s["eflags"] & (2**64 - 1)
    if name == "eip":
        return s["rip"] & (2**64 - 1)
    if name == "pc":
        return (s["segs"][1][1] + s["rip"]) & (2**64 - 1)
    for i, seg in enumerate(_SEGS):
        if name == seg:
            return _i32(s["segs"][i][0] & 0xFFFF)
        if name == seg + ".base":
            return s["segs"][i][1] & (2**64 - 1)
        if name == seg + ".limit":
            return _i32(s["segs"][i][2])
    return None


def debug_translator(cpu: Any) -> Callable[[int], int | None]:
    """Linear -> physical through the vCPU's paging as it is now, as a debugger walks it
    (QEMU's ``cpu_get_phys_page_debug``, behind HMP ``x`` and QMP ``memsave``): no Accessed or
    Dirty bit set, no fault raised; None where nothing is mapped."""
    from emu.cpu.mmu import GuestFault, LinearMem

    box: list[Any] = []
    cpu._with_cpu_stopped(lambda: box.append(L.CpuState(cpu._uc).load()))
    lm = LinearMem(box[0], cpu._phys)

    def translate(lin: int) -> int | None:
        if not lm.lma and lin >= (1 << 32):
            return None
        try:
            return lm.debug_translate(lin)
        except GuestFault:
            return None
    return translate


def read_physical(cpu: Any, address: int, length: int) -> bytes | None:
    """Guest-physical RAM/ROM bytes as a debugger reads them (the vCPU's own buffers, no
    device access); None if any byte of the range is neither."""
    out = bytearray()
    while length > 0:
        if address >= 2**64:
            return None
        hit = cpu._lookup(address)
        if hit is None:
            return None
        buf, off, avail, _is_ram = hit
        n = min(length, avail)
        out += bytes(buf[off:off + n])
        address += n
        length -= n
    return bytes(out)


def virtual_reader(cpu: Any) -> Callable[[int, int], bytes | None]:
    """``read(address, length)`` of guest-virtual memory through the paging as it is when
    this is called (:func:`debug_translator`); None where a page is not mapped."""
    translate = debug_translator(cpu)

    def read(address: int, length: int) -> bytes | None:
        out = bytearray()
        while length > 0:
            n = min(length, 4096 - (address & 4095))
            pa = translate(address & (2**64 - 1))
            data = read_physical(cpu, pa, n) if pa is not None else None
            if data is None:
                return None
            out += data
            address += n
            length -= n
        return bytes(out)
    return read

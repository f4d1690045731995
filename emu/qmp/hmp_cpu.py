"""HMP commands that look at the vCPU and guest memory, as QEMU 7.2 prints them:
``info registers [-a|vcpu]``, ``x /fmt addr`` (guest-virtual, through the vCPU's paging) and
``xp /fmt addr`` (guest-physical).

``/fmt`` is ``/[count][format][size]``: format ``x`` (hex), ``d``, ``u``, ``o``, ``c``
(characters) or ``i`` (disassembly, which emu lacks: it says so); size ``b``, ``h``, ``w``,
``g``/``L``.  Format and size left out are the last ones given, for the whole process, as in
QEMU (``x`` and 4 bytes at first).  The address is an HMP expression (monitor/hmp.c
``get_expr``): numbers in C notation, ``'c'`` characters, ``$reg`` registers
(:func:`emu.cpu.dump.register_value`), ``+ - * / % & | ^ ~`` and parentheses.

Memory is read where RAM and ROM are (the vCPU's own buffers, no Unicorn call); an MMIO or
unassigned address reads as "Cannot access memory" (QEMU would read a device register).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from emu.qmp.hmp import hmp

#: QEMU's process-wide defaults for /fmt (monitor/hmp.c default_fmt_format/_size)
_fmt_lock = threading.Lock()
_default_format = "x"
_default_size = 4


class HmpExprError(Exception):
    """An HMP expression or argument error: its text, then ``Try "help <cmd>" ...``."""


def _cpu(machine: Any) -> Any:
    hw = getattr(machine, "hardware", None)
    return getattr(hw, "cpu", None) if hw is not None else None


# ------------------------------------------------------------------ info registers

@hmp("registers", info=True, raw=True)
def info_registers(machine: Any, rest: str) -> str:
    """``info registers [-a|vcpu]``: QEMU's ``x86_cpu_dump_state`` with the FPU part."""
    from emu.cpu.dump import format_state, read_state

    help_hint = 'Try "help info registers" for more information\n'
    pos = 0
    while pos < len(rest) and rest[pos].isspace():
        pos += 1
    vcpu = -1
    if rest.startswith("-a", pos) and (pos + 2 == len(rest) or rest[pos + 2].isspace()):
        pos += 2
        while pos < len(rest) and rest[pos].isspace():
            pos += 1
    if pos < len(rest):
        e = _Expr(rest, pos, lambda _name: None)
        try:
            vcpu = _signed(e.sum())
        except HmpExprError as err:
            return f"{err}\n{help_hint}"
        if e.p < len(rest):
            return f"registers: extraneous characters at the end of line\n{help_hint}"
    cpu = _cpu(machine)
    if cpu is None or vcpu > 0:
        return f"CPU#{vcpu} not available\n" if vcpu >= 0 else "No CPU available\n"
    return "\nCPU#0\n" + format_state(read_state(cpu))


# ------------------------------------------------------------------ expressions

class _Expr:
    """monitor/hmp.c's recursive-descent ``get_expr`` over ``text`` from ``pos``."""

    def __init__(self, text: str, pos: int, regs: Callable[[str], int | None]) -> None:
        self.s = text
        self.p = pos
        self.regs = regs

    def _skip(self) -> None:
        while self.p < len(self.s) and self.s[self.p].isspace():
            self.p += 1

    def _peek(self) -> str:
        return self.s[self.p] if self.p < len(self.s) else ""

    def sum(self) -> int:
        v = self.prod()
        while self._peek() in ("+", "-"):
            op = self._peek()
            self.p += 1
            self._skip()
            w = self.prod()
            v = v + w if op == "+" else v - w
        return v & (2**64 - 1)

    def prod(self) -> int:
        v = self.logic()
        while self._peek() in ("*", "/", "%"):
            op = self._peek()
            self.p += 1
            self._skip()
            w = self.logic()
            if op == "*":
                v = v * w
            else:
                if w == 0:
                    raise HmpExprError("division by zero")
                # int64 arithmetic, truncating towards zero
                a, b = _signed(v), _signed(w)
                q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)
                v = q if op == "/" else a - q * b
            v &= 2**64 - 1
        return v

    def logic(self) -> int:
        v = self.unary()
        while self._peek() in ("&", "|", "^"):
            op = self._peek()
            self.p += 1
            self._skip()
            w = self.unary()
            v = v & w if op == "&" else (v | w if op == "|" else v ^ w)
        return v

    def unary(self) -> int:
        c = self._peek()
        if c == "+":
            self.p += 1
            self._skip()
            return self.unary()
        if c == "-":
            self.p += 1
            self._skip()
            return -self.unary() & (2**64 - 1)
        if c == "~":
            self.p += 1
            self._skip()
            return ~self.unary() & (2**64 - 1)
        if c == "(":
            self.p += 1
            self._skip()
            v = self.sum()
            if self._peek() != ")":
                raise HmpExprError("')' expected")
            self.p += 1
            self._skip()
            return v
        if c == "'":
            self.p += 1
            if self.p >= len(self.s):
                raise HmpExprError("character constant expected")
            v = ord(self.s[self.p]) & 0xFF
            self.p += 1
            if self._peek() != "'":
                raise HmpExprError("missing terminating ' character")
            self.p += 1
            self._skip()
            return v
        if c == "$":
            self.p += 1
            start = self.p
            while self.p < len(self.s) and (self.s[self.p].isascii() and
                                            (self.s[self.p].isalnum() or self.s[self.p] in "_.")):
                self.p += 1
            name = self.s[start:self.p][:127]
            self._skip()
            v = self.regs(name)
            if v is None:
                raise HmpExprError("unknown register")
            return v & (2**64 - 1)
        if c == "":
            raise HmpExprError("unexpected end of expression")
        return self._number()

    def _number(self) -> int:
        """strtoull(..., 0): 0x hex, leading 0 octal, else decimal (with an optional sign)."""
        s, p = self.s, self.p
        neg = False
        if p < len(s) and s[p] in "+-":
            neg = s[p] == "-"
            p += 1
        if s[p:p + 2].lower() == "0x" and p + 2 < len(s) and s[p + 2] in "0123456789abcdefABCDEF":
            base, p = 16, p + 2
            digits = "0123456789abcdefABCDEF"
        elif s[p:p + 1] == "0":
            base, digits = 8, "01234567"
        else:
            base, digits = 10, "0123456789"
        start = p
        while p < len(s) and s[p] in digits:
            p += 1
        if p == start:
            raise HmpExprError(f"invalid char '{s[self.p]}' in expression")
        v = int(s[start:p], base)
        if v >= 2**64:
            raise HmpExprError("number too large")
        self.p = p
        self._skip()
        return -v & (2**64 - 1) if neg else v


def _signed(v: int) -> int:
    return v - 2**64 if v & 2**63 else v


# ------------------------------------------------------------------ x / xp

def _parse_fmt(text: str, pos: int) -> tuple[int, str, int, int]:
    """The ``/fmt`` argument at ``pos``: (count, format, size, new pos), updating the
    process-wide defaults as QEMU's monitor_parse_arguments does."""
    global _default_format, _default_size
    while pos < len(text) and text[pos].isspace():
        pos += 1
    with _fmt_lock:
        if pos < len(text) and text[pos] == "/":
            pos += 1
            count = 1
            if pos < len(text) and text[pos].isdigit():
                start = pos
                while pos < len(text) and text[pos].isdigit():
                    pos += 1
                count = int(text[start:pos]) & 0xFFFFFFFF
                count = count - 2**32 if count & 2**31 else count
            size, fmt = -1, ""
            while pos < len(text):
                ch = text[pos]
                if ch in "oduxic":
                    fmt = ch
                elif ch in "bhwgL":
                    size = {"b": 1, "h": 2, "w": 4, "g": 8, "L": 8}[ch]
                else:
                    break
                pos += 1
            if pos < len(text) and not text[pos].isspace():
                raise HmpExprError(f"invalid char in format: '{text[pos]}'")
            if not fmt:
                fmt = _default_format
            if fmt != "i":
                if size < 0:
                    size = _default_size
                _default_size = size
            _default_format = fmt
        else:
            count, fmt = 1, _default_format
            size = _default_size if fmt != "i" else -1
    return count, fmt, size, pos


def _memory_reader(machine: Any, physical: bool) -> Callable[[int, int], bytes | None]:
    from emu.cpu.dump import read_physical, virtual_reader

    cpu = _cpu(machine)
    if physical:
        return lambda address, length: read_physical(cpu, address, length)
    return virtual_reader(cpu)


def _printc(v: int) -> str:
    """monitor_printc: 'c' with \\n \\r \\\\ \\' escapes, \\xNN outside printable ASCII."""
    esc = {ord("'"): "\\'", ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r"}
    if v in esc:
        return "'" + esc[v] + "'"
    if 32 <= v <= 126:
        return "'" + chr(v) + "'"
    return f"'\\x{v:02x}'"


def _memory_dump(machine: Any, count: int, fmt: str, wsize: int, addr: int, physical: bool) -> str:
    """monitor/misc.c ``memory_dump``."""
    if _cpu(machine) is None:
        return "Can not dump without CPU\n"
    if fmt == "i":
        return "emu does not support disassembly (the i format)\n"
    length = wsize * count
    line_size = 8 if wsize == 1 else 16
    if fmt == "o":
        digits = -(-wsize * 8 // 3)
    elif fmt in ("u", "d"):
        digits = -(-wsize * 8 * 10 // 33)
    else:
        digits = wsize * 8 // 4
    if fmt == "c":
        wsize = 1
    read = _memory_reader(machine, physical)
    out = []
    addr &= 2**64 - 1
    while length > 0:
        line = f"{addr:016x}:"
        n = min(length, line_size)
        buf = read(addr, n)
        if buf is None:
            out.append(line + " Cannot access memory\n")
            break
        for i in range(0, n, wsize):
            v = int.from_bytes(buf[i:i + wsize].ljust(wsize, b"\0"), "little")
            if fmt == "o":
                text = ("0" + format(v, "o")) if v else "0"
                line += " " + text.rjust(digits)
            elif fmt == "x":
                line += " 0x" + format(v, "x").zfill(digits)
            elif fmt == "u":
                line += " " + str(v).rjust(digits)
            elif fmt == "d":
                line += " " + str(_signed(v) if wsize == 8 else v).rjust(digits)
            elif fmt == "c":
                line += " " + _printc(v)
        out.append(line + "\n")
        addr = (addr + n) & (2**64 - 1)
        length -= n
    return "".join(out)


def _x_command(name: str, physical: bool) -> Callable[[Any, str], str]:
    def run(machine: Any, rest: str) -> str:
        from emu.cpu.dump import read_state, register_value

        state: list[dict] = []

        def regs(reg: str) -> int | None:
            cpu = _cpu(machine)
            if cpu is None:
                return None
            if not state:
                state.append(read_state(cpu))
            return register_value(state[0], reg)

        try:
            count, fmt, size, pos = _parse_fmt(rest, 0)
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
            e = _Expr(rest, pos, regs)
            addr = e.sum()
            if e.p < len(rest):
                raise HmpExprError(f"{name}: extraneous characters at the end of line")
        except HmpExprError as err:
            return f"{err}\nTry \"help {name}\" for more information\n"
        if count <= 0:
            return ""
        return _memory_dump(machine, count, fmt, size if size > 0 else 1, addr, physical)
    run.__doc__ = f"``{name} /fmt addr``: QEMU's memory_dump of guest-{'physical' if physical else 'virtual'} memory."
    return run


hmp("x", raw=True)(_x_command("x", False))
hmp("xp", raw=True)(_x_command("xp", True))

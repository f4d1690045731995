"""QEMU's JSON dialect, byte for byte: lexer, message streamer, parser and writer.

Modelled on QEMU 7.2's ``qobject/json-lexer.c``, ``json-streamer.c``, ``json-parser.c``
and ``qjson.c`` (written anew here, not copied), because QMP clients see every quirk:

* the lexer is a table-driven state machine over *bytes*; on a lexical error it reports
  ``JSON parse error, stray '<token so far>'`` and skips input until a structural
  character (``{}[],:``), a control character or an impossible UTF-8 byte (0xFE/0xFF);
* the streamer counts braces/brackets and hands a token list to the parser as soon as
  the top level is balanced (or a closer underflows it), so two objects on one line give
  two messages and one object split over lines gives one;
* the parser keeps only its *first* error; single-quoted strings are accepted;
* numbers become ``int`` when they fit int64 or uint64, else ``float`` (``strtod``);
* the writer emits ``", "``/``": "`` separators, ``\\uXXXX`` (upper-case hex) for every
  non-ASCII or control character, ``%.17g`` for doubles, and dictionary members in the
  iteration order of QEMU's ``QDict`` (tdb hash into 512 buckets, newest first inside a
  bucket) — which is why QEMU's replies have their "hash-like" member orders.  Build
  dictionaries in QAPI schema order and :func:`to_json` reproduces QEMU's order exactly.

Limits are QEMU's: a token may not exceed 64 MiB, a message 2 Mi tokens, nesting 1024.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterator

__all__ = ["JsonMessageParser", "to_json", "qdict_order", "decode_mod_utf8", "JsonError"]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
# Legal nesting (1024 levels) recurses about twice per level in the parser and writer.
if sys.getrecursionlimit() < 20000:
    sys.setrecursionlimit(20000)

# Lexer states (json-lexer.c numbering is irrelevant; only the table matters).
IN_RECOVERY = 1
IN_DQ_STRING_ESCAPE = 2
IN_DQ_STRING = 3
IN_SQ_STRING_ESCAPE = 4
IN_SQ_STRING = 5
IN_ZERO = 6
IN_EXP_DIGITS = 7
IN_EXP_SIGN = 8
IN_EXP_E = 9
IN_MANTISSA = 10
IN_MANTISSA_DIGITS = 11
IN_DIGITS = 12
IN_SIGN = 13
IN_KEYWORD = 14
IN_START = 15

# Token types; JSON_ERROR must be 0 (an unset table entry is an error).
JSON_ERROR = 0
JSON_LCURLY = 100
JSON_RCURLY = 101
JSON_LSQUARE = 102
JSON_RSQUARE = 103
JSON_COLON = 104
JSON_COMMA = 105
JSON_INTEGER = 106
JSON_FLOAT = 107
JSON_KEYWORD = 108
JSON_STRING = 109
JSON_END_OF_INPUT = 110

LOOKAHEAD = 0x100


def _build_table() -> list[list[int]]:
    t = [[0] * 256 for _ in range(IN_START + 1)]

    def terminal(state: int, tok: int) -> None:
        for c in range(256):
            t[state][c] = tok | LOOKAHEAD

    def rng(state: int, lo: int, hi: int, val: int) -> None:
        for c in range(lo, hi + 1):
            t[state][c] = val

    # error recovery: skip to a structural char, a control char or 0xFE/0xFF
    rng(IN_RECOVERY, 0, 0x1F, IN_START | LOOKAHEAD)
    rng(IN_RECOVERY, 0x20, 0xFD, IN_RECOVERY)
    rng(IN_RECOVERY, 0xFE, 0xFF, IN_START | LOOKAHEAD)
    t[IN_RECOVERY][ord("\t")] = IN_RECOVERY
    for ch in "[]{}:,":
        t[IN_RECOVERY][ord(ch)] = IN_START | LOOKAHEAD
    # strings
    rng(IN_DQ_STRING_ESCAPE, 0x20, 0xFD, IN_DQ_STRING)
    rng(IN_DQ_STRING, 0x20, 0xFD, IN_DQ_STRING)
    t[IN_DQ_STRING][ord("\\")] = IN_DQ_STRING_ESCAPE
    t[IN_DQ_STRING][ord('"')] = JSON_STRING
    rng(IN_SQ_STRING_ESCAPE, 0x20, 0xFD, IN_SQ_STRING)
    rng(IN_SQ_STRING, 0x20, 0xFD, IN_SQ_STRING)
    t[IN_SQ_STRING][ord("\\")] = IN_SQ_STRING_ESCAPE
    t[IN_SQ_STRING][ord("'")] = JSON_STRING
    # numbers
    terminal(IN_ZERO, JSON_INTEGER)
    rng(IN_ZERO, ord("0"), ord("9"), JSON_ERROR)
    t[IN_ZERO][ord(".")] = IN_MANTISSA
    terminal(IN_EXP_DIGITS, JSON_FLOAT)
    rng(IN_EXP_DIGITS, ord("0"), ord("9"), IN_EXP_DIGITS)
    rng(IN_EXP_SIGN, ord("0"), ord("9"), IN_EXP_DIGITS)
    t[IN_EXP_E][ord("-")] = IN_EXP_SIGN
    t[IN_EXP_E][ord("+")] = IN_EXP_SIGN
    rng(IN_EXP_E, ord("0"), ord("9"), IN_EXP_DIGITS)
    terminal(IN_MANTISSA_DIGITS, JSON_FLOAT)
    rng(IN_MANTISSA_DIGITS, ord("0"), ord("9"), IN_MANTISSA_DIGITS)
    t[IN_MANTISSA_DIGITS][ord("e")] = IN_EXP_E
    t[IN_MANTISSA_DIGITS][ord("E")] = IN_EXP_E
    rng(IN_MANTISSA, ord("0"), ord("9"), IN_MANTISSA_DIGITS)
    terminal(IN_DIGITS, JSON_INTEGER)
    rng(IN_DIGITS, ord("0"), ord("9"), IN_DIGITS)
    t[IN_DIGITS][ord("e")] = IN_EXP_E
    t[IN_DIGITS][ord("E")] = IN_EXP_E
    t[IN_DIGITS][ord(".")] = IN_MANTISSA
    t[IN_SIGN][ord("0")] = IN_ZERO
    rng(IN_SIGN, ord("1"), ord("9"), IN_DIGITS)
    # keywords
    terminal(IN_KEYWORD, JSON_KEYWORD)
    rng(IN_KEYWORD, ord("a"), ord("z"), IN_KEYWORD)
    # start (no '%' interpolation on QMP)
    s = t[IN_START]
    s[ord('"')] = IN_DQ_STRING
    s[ord("'")] = IN_SQ_STRING
    s[ord("0")] = IN_ZERO
    rng(IN_START, ord("1"), ord("9"), IN_DIGITS)
    s[ord("-")] = IN_SIGN
    s[ord("{")] = JSON_LCURLY
    s[ord("}")] = JSON_RCURLY
    s[ord("[")] = JSON_LSQUARE
    s[ord("]")] = JSON_RSQUARE
    s[ord(",")] = JSON_COMMA
    s[ord(":")] = JSON_COLON
    rng(IN_START, ord("a"), ord("z"), IN_KEYWORD)
    for ch in " \t\r\n":
        s[ord(ch)] = IN_START
    return t


_TABLE = _build_table()
_TOKEN_TYPES = frozenset(range(JSON_LCURLY, JSON_STRING + 1))

# Runs of bytes that keep the lexer in the same state; consumed in one step for speed.
_RUNS = {
    IN_DQ_STRING: re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]+'),
    IN_SQ_STRING: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    IN_RECOVERY: re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
    IN_START: re.compile(rb"[ \t\r\n]+"),
    IN_DIGITS: re.compile(rb"[0-9]+"),
    IN_KEYWORD: re.compile(rb"[a-z]+"),
}


class JsonError(Exception):
    """A JSON parse error; ``str()`` is QEMU's complete text (``JSON parse error, …``).

    The text is kept as *bytes* because QEMU quotes raw input bytes in it; the writer
    turns invalid UTF-8 into U+FFFD exactly as QEMU does.
    """

    def __init__(self, raw: bytes) -> None:
        super().__init__(decode_mod_utf8(raw))
        self.raw = raw


class _ParseError(Exception):
    pass


def decode_mod_utf8(data: bytes) -> str:
    """Decode bytes as QEMU's writer does: invalid sequences become U+FFFD.

    QEMU's ``mod_utf8_codepoint`` consumes a whole (possibly truncated) multi-byte
    sequence per replacement character, accepts the overlong ``C0 80`` as U+0000 and
    rejects surrogates and non-characters.
    """
    try:
        s = data.decode("utf-8")
        if not _NONCHAR.search(s):
            return s
    except UnicodeDecodeError:
        pass
    out = []
    i, n = 0, len(data)
    while i < n:
        cp, i = _mod_utf8_codepoint(data, i)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)


_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                      "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff"
                      "\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
                      "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff"
                      "\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
                      "\U000ffffe\U000fffff\U0010fffe\U0010ffff]")
_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if (cp & 0xFFFFF800) == 0xD800:      # surrogate
        return False
    if 0xFDD0 <= cp <= 0xFDEF:            # non-character
        return False
    if (cp & 0xFFFE) == 0xFFFE:           # non-character
        return False
    return True


def _mod_utf8_codepoint(s: bytes, i: int) -> tuple[int, int]:
    """One code point of modified UTF-8 starting at ``s[i]``: (cp or -1, next index)."""
    byte = s[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = s[i] if i < len(s) else 0
        if (nxt & 0xC0) != 0x80:
            return -1, i
        i += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_codepoint(cp):
        return -1, i
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, i
    return cp, i


# ---------------------------------------------------------------------------- parser

_HEX = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                   ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_PLAIN_ASCII = re.compile(rb"[\x20-\x7f]*")


def _cvt4hex(s: bytes, i: int) -> int:
    if i + 4 > len(s) or not all(c in _HEX for c in s[i:i + 4]):
        return -1
    return int(s[i:i + 4], 16)


def _parse_string(tok: bytes) -> str:
    quote = tok[0]
    body = tok[1:-1]
    if b"\\" not in body and _PLAIN_ASCII.fullmatch(body):
        return body.decode("ascii")
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c == 0x5C:  # backslash
            beg = i
            i += 1
            e = body[i] if i < n else quote
            i += 1
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                continue
            if e != ord("u"):
                raise _ParseError(b"invalid escape sequence in string")
            cp = _cvt4hex(body, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and body[i:i + 2] == b"\\u":
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(body, i + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    i += 6
                else:
                    cp = -1
            if not (cp == 0 or _valid_codepoint(cp)):
                # QEMU quotes the escape as written (clipped at the token's end)
                span = (body + bytes([quote]))[beg:i]
                raise _ParseError(span + b" is not a valid Unicode character")
            out.append(chr(cp))
            continue
        j = i
        while j < n and body[j] != 0x5C:
            j += 1
        seg = body[i:j]
        i = j
        try:
            text = seg.replace(b"\xc0\x80", b"\x00").decode("utf-8")
            if _NONCHAR.search(text):
                raise UnicodeDecodeError("utf-8", seg, 0, 1, "non-character")
        except UnicodeDecodeError:
            raise _ParseError(b"invalid UTF-8 sequence in string") from None
        out.append(text)
    return "".join(out)


def _parse_number(tok: bytes, is_int: bool) -> int | float:
    if is_int:
        v = int(tok)
        if -(1 << 63) <= v < (1 << 63):
            return v
        if not tok.startswith(b"-") and v < (1 << 64):
            return v
    return float(tok)


class _Parser:
    """Recursive descent over one balanced token list; the first error wins."""

    __slots__ = ("toks", "pos")

    def __init__(self, toks: list[tuple[int, bytes]]) -> None:
        self.toks = toks
        self.pos = 0

    def peek(self) -> tuple[int, bytes] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def pop(self) -> tuple[int, bytes]:
        if self.pos >= len(self.toks):
            raise _ParseError(b"premature EOI")
        t = self.toks[self.pos]
        self.pos += 1
        return t

    def value(self) -> Any:
        t = self.peek()
        if t is None:
            raise _ParseError(b"premature EOI")
        typ, text = t
        if typ == JSON_LCURLY:
            return self.obj()
        if typ == JSON_LSQUARE:
            return self.array()
        if typ == JSON_STRING:
            self.pos += 1
            return _parse_string(text)
        if typ == JSON_INTEGER or typ == JSON_FLOAT:
            self.pos += 1
            return _parse_number(text, typ == JSON_INTEGER)
        if typ == JSON_KEYWORD:
            self.pos += 1
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"null":
                return None
            raise _ParseError(b"invalid keyword '" + text + b"'")
        raise _ParseError(b"expecting value")

    def pair(self, d: dict) -> None:
        if self.peek() is None:
            raise _ParseError(b"premature EOI")
        key = self.value()
        if not isinstance(key, str):
            raise _ParseError(b"key is not a string in object")
        if self.pop()[0] != JSON_COLON:
            raise _ParseError(b"missing : in object pair")
        val = self.value()
        if key in d:
            raise _ParseError(b"duplicate key")
        d[key] = val

    def obj(self) -> dict:
        self.pos += 1
        d: dict = {}
        t = self.peek()
        if t is None:
            raise _ParseError(b"premature EOI")
        if t[0] == JSON_RCURLY:
            self.pos += 1
            return d
        self.pair(d)
        typ = self.pop()[0]
        while typ != JSON_RCURLY:
            if typ != JSON_COMMA:
                raise _ParseError(b"expected separator in dict")
            self.pair(d)
            typ = self.pop()[0]
        return d

    def array(self) -> list:
        self.pos += 1
        out: list = []
        t = self.peek()
        if t is None:
            raise _ParseError(b"premature EOI")
        if t[0] == JSON_RSQUARE:
            self.pos += 1
            return out
        out.append(self.value())
        typ = self.pop()[0]
        while typ != JSON_RSQUARE:
            if typ != JSON_COMMA:
                raise _ParseError(b"expected separator in list")
            out.append(self.value())
            typ = self.pop()[0]
        return out


def _parse_tokens(toks: list[tuple[int, bytes]]) -> Any:
    try:
        return _Parser(toks).value()
    except _ParseError as e:
        # QEMU formats the message into a 1024-byte buffer
        raise JsonError(b"JSON parse error, " + e.args[0][:1023]) from None


# -------------------------------------------------------------------- lexer + streamer

class JsonMessageParser:
    """Feed raw bytes, get complete messages: QEMU's lexer + streamer + parser.

    :meth:`feed` returns a list of ``(value, None)`` for each parsed JSON value and
    ``(None, JsonError)`` for each error, in input order.
    """

    def __init__(self) -> None:
        self.state = IN_START
        self.token = bytearray()
        self.tokens: list[tuple[int, bytes]] = []
        self.brace = 0
        self.bracket = 0
        self.token_size = 0
        self._out: list[tuple[Any, JsonError | None]] = []

    def feed(self, data: bytes) -> list[tuple[Any, JsonError | None]]:
        """Lex and parse ``data``; return every message it completed."""
        out = self._out = []
        table = _TABLE
        runs = _RUNS
        i, n = 0, len(data)
        while i < n:
            state = self.state
            run = runs.get(state)
            if run is not None:
                m = run.match(data, i)
                if m is not None:
                    j = m.end()
                    if state == IN_START:
                        i = j
                        continue
                    if state != IN_RECOVERY:
                        room = MAX_TOKEN_SIZE + 1 - len(self.token)
                        if j - i > room:
                            j = i + room
                        self.token += data[i:j]
                        i = j
                        if len(self.token) > MAX_TOKEN_SIZE:
                            self._oversize()
                    else:
                        i = j
                    continue
            ch = data[i]
            i += 1
            consumed = False
            while not consumed:
                nxt = table[self.state][ch]
                consumed = not nxt & LOOKAHEAD
                nxt &= ~LOOKAHEAD
                if consumed:
                    self.token.append(ch)
                if nxt in _TOKEN_TYPES:
                    self._token(nxt, bytes(self.token))
                    self.token.clear()
                    nxt = IN_START
                elif nxt == IN_START:
                    self.token.clear()
                elif nxt == JSON_ERROR:
                    self._token(JSON_ERROR, bytes(self.token))
                    self.token.clear()
                    nxt = IN_RECOVERY
                elif nxt == IN_RECOVERY:
                    self.token.clear()
                self.state = nxt
            if len(self.token) > MAX_TOKEN_SIZE:
                self._oversize()
        self._out = []
        return out

    def _oversize(self) -> None:
        self._token(self.state, bytes(self.token))
        self.token.clear()
        self.state = IN_START

    def _emit(self, value: Any, err: JsonError | None) -> None:
        self.brace = self.bracket = 0
        self.tokens = []
        self.token_size = 0
        self._out.append((value, err))

    def _token(self, typ: int, text: bytes) -> None:
        if typ == JSON_LCURLY:
            self.brace += 1
        elif typ == JSON_RCURLY:
            self.brace -= 1
        elif typ == JSON_LSQUARE:
            self.bracket += 1
        elif typ == JSON_RSQUARE:
            self.bracket -= 1
        elif typ == JSON_ERROR:
            # QEMU formats the token as a C string: it ends at the first NUL byte
            text = text.split(b"\0", 1)[0]
            self._emit(None, JsonError(b"JSON parse error, stray '" + text + b"'"))
            return
        if self.token_size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._emit(None, JsonError(b"JSON token size limit exceeded"))
            return
        if len(self.tokens) + 1 > MAX_TOKEN_COUNT:
            self._emit(None, JsonError(b"JSON token count limit exceeded"))
            return
        if self.bracket + self.brace > MAX_NESTING:
            self._emit(None, JsonError(b"JSON nesting depth limit exceeded"))
            return
        self.tokens.append((typ, text))
        self.token_size += len(text)
        if (self.brace > 0 or self.bracket > 0) and self.brace >= 0 and self.bracket >= 0:
            return
        toks = self.tokens
        try:
            value = _parse_tokens(toks)
        except JsonError as e:
            self._emit(None, e)
        else:
            self._emit(value, None)

    def reset(self) -> None:
        """Forget partial input (a new client connection starts clean)."""
        self.__init__()


def loads(text: str | bytes) -> Any:
    """Parse exactly one JSON value in QEMU's dialect (helper for tests and the CLI)."""
    data = text.encode() if isinstance(text, str) else text
    msgs = JsonMessageParser().feed(data + b"\n")
    if len(msgs) != 1:
        raise ValueError(f"expected one JSON value, got {len(msgs)}")
    value, err = msgs[0]
    if err is not None:
        raise err
    return value


# ---------------------------------------------------------------------------- writer

def _tdb_bucket(key: str) -> int:
    b = key.encode("utf-8", "surrogatepass")
    v = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


_BUCKETS: dict[str, int] = {}


def qdict_order(keys: list[str]) -> list[str]:
    """The order in which QEMU's QDict iterates ``keys`` (given in insertion order)."""
    buckets = _BUCKETS
    decorated = []
    for idx, k in enumerate(keys):
        b = buckets.get(k)
        if b is None:
            b = buckets[k] = _tdb_bucket(k)
        decorated.append((b, -idx, k))
    decorated.sort()
    return [k for _, _, k in decorated]


_ESC = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESC = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _esc_char(m: re.Match) -> str:
    c = m.group()
    e = _ESC.get(c)
    if e is not None:
        return e
    cp = ord(c)
    if 0xD800 <= cp <= 0xDFFF:        # lone surrogate: not representable
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _str(s: str) -> str:
    return '"' + _NEEDS_ESC.sub(_esc_char, s) + '"'


def _write(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(_str(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append("%.17g" % obj)
    elif isinstance(obj, dict):
        if not obj:
            out.append("{}")
            return
        out.append("{")
        first = True
        for k in qdict_order(list(obj)):
            if not first:
                out.append(", ")
            first = False
            out.append(_str(k))
            out.append(": ")
            _write(obj[k], out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        if not obj:
            out.append("[]")
            return
        out.append("[")
        first = True
        for v in obj:
            if not first:
                out.append(", ")
            first = False
            _write(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot serialise {type(obj).__name__} as QMP JSON")


def to_json(obj: Any) -> str:
    """Serialise ``obj`` exactly as QEMU's ``qobject_to_json`` (compact form)."""
    out: list[str] = []
    _write(obj, out)
    return "".join(out)


def iter_ordered(d: dict) -> Iterator[tuple[str, Any]]:
    """Items of ``d`` in QDict iteration order (used where QEMU walks a QDict)."""
    for k in qdict_order(list(d)):
        yield k, d[k]

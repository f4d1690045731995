"""Character devices: query-chardev(-backends), chardev-add/-remove/-change/-send-break and
the ringbuf (memory) backend with ringbuf-write/-read.

The command line's chardevs are the monitors' and the serial ports'; ``chardev-add``
creates ``ringbuf``/``memory`` and ``null`` chardevs at run time (other backends need the
I/O thread's sockets and files: not supported at run time).
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any

from emu.errors import QmpError
from emu.qmp.commands import CommandContext, qemu_command
from emu.qmp.errors import unsupported

#: backends emu has (command line and chardev-add)
BACKENDS = ("socket", "stdio", "file", "null", "ringbuf", "memory")


class RingBuf:
    """QEMU's ringbuf chardev: a power-of-two byte ring; writes past the size overwrite
    the oldest bytes."""

    backend_name = "ringbuf"

    def __init__(self, id: str, size: int) -> None:
        self.id = id
        self.size = size
        self.buf = bytearray(size)
        self.prod = 0
        self.cons = 0
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            for b in data:
                self.buf[self.prod & (self.size - 1)] = b
                self.prod += 1
                if self.prod - self.cons > self.size:
                    self.cons = self.prod - self.size

    def read(self, n: int) -> bytes:
        with self.lock:
            out = bytearray()
            while len(out) < n and self.cons != self.prod:
                out.append(self.buf[self.cons & (self.size - 1)])
                self.cons += 1
            return bytes(out)


class NullDev:
    backend_name = "null"

    def __init__(self, id: str) -> None:
        self.id = id


def _runtime(ctx: CommandContext) -> dict[str, Any]:
    m = ctx.machine
    d = getattr(m, "qmp_chardevs", None)
    if d is None:
        d = {}
        m.qmp_chardevs = d
    return d


def _static(ctx: CommandContext) -> dict[str, Any]:
    """Command-line chardevs by id (the objects where the monitor server or the serial
    ports hold them; otherwise the config entry)."""
    out: dict[str, Any] = {c.id: c for c in ctx.machine.config.chardevs}
    objs = list(getattr(ctx.server, "chardevs", ()) or ()) + list(
        getattr(ctx.machine, "serial_chardevs", ()) or ())
    for ch in objs:
        out[getattr(ch, "id", "")] = ch
    return out


def _find(ctx: CommandContext, id: str) -> Any:
    rt = _runtime(ctx)
    if id in rt:
        return rt[id]
    return _static(ctx).get(id)


def _filename(ch: Any) -> str:
    if isinstance(ch, RingBuf):
        return "ringbuf"
    if isinstance(ch, NullDev):
        return "null"
    describe = getattr(ch, "describe", None)
    if describe is not None:
        text = describe()
        if getattr(ch, "_writer", None) is not None and text.startswith("disconnected:"):
            text = text[len("disconnected:"):]
        return text
    return getattr(ch, "backend_name", "") or getattr(ch, "backend", "")


@qemu_command("query-chardev")
def query_chardev(ctx: CommandContext) -> list:
    monitors = {id(c) for c in getattr(ctx.server, "chardevs", ()) or ()}
    serials = {id(c) for c in getattr(ctx.machine, "serial_chardevs", ()) or ()}
    out = []
    for cid, ch in list(_static(ctx).items()) + list(_runtime(ctx).items()):
        out.append({"frontend-open": id(ch) in monitors or id(ch) in serials,
                    "filename": _filename(ch), "label": cid})
    return out


@qemu_command("query-chardev-backends")
def query_chardev_backends(ctx: CommandContext) -> list:
    return [{"name": b} for b in BACKENDS]


@qemu_command("chardev-add")
def chardev_add(ctx: CommandContext, id: str, backend: dict) -> dict:
    if _find(ctx, id) is not None:
        raise QmpError(f"Chardev with id '{id}' already exists")
    kind = backend["type"]
    data = backend.get("data", {})
    if kind in ("ringbuf", "memory"):
        size = data.get("size", 65536)
        if size <= 0 or size & (size - 1):
            raise QmpError(f"Failed to add chardev '{id}': size of ringbuf chardev must be "
                           "power of two")
        _runtime(ctx)[id] = RingBuf(id, size)
        return {}
    if kind == "null":
        _runtime(ctx)[id] = NullDev(id)
        return {}
    raise unsupported("chardev-add", f"adding '{kind}' chardevs at run time")


@qemu_command("chardev-change")
def chardev_change(ctx: CommandContext, id: str, backend: dict) -> dict:
    if _find(ctx, id) is None:
        raise QmpError(f"Chardev '{id}' does not exist")
    raise unsupported("chardev-change", "changing a chardev's backend")


def _in_use(ctx: CommandContext, ch: Any) -> bool:
    objs = list(getattr(ctx.server, "chardevs", ()) or ()) + list(
        getattr(ctx.machine, "serial_chardevs", ()) or ())
    return any(o is ch for o in objs)


@qemu_command("chardev-remove")
def chardev_remove(ctx: CommandContext, id: str) -> dict:
    ch = _find(ctx, id)
    if ch is None:
        raise QmpError(f"Chardev '{id}' not found")
    rt = _runtime(ctx)
    if id in rt:
        del rt[id]
        return {}
    if _in_use(ctx, ch):
        raise QmpError(f"Chardev '{id}' is busy")
    raise unsupported("chardev-remove", "removing command-line chardevs")


@qemu_command("chardev-send-break")
def chardev_send_break(ctx: CommandContext, id: str) -> dict:
    if _find(ctx, id) is None:
        raise QmpError(f"Chardev '{id}' not found")
    return {}               # no emu backend carries a break condition (as QEMU's null)


def _ringbuf(ctx: CommandContext, device: str) -> RingBuf:
    ch = _find(ctx, device)
    if ch is None:
        raise QmpError(f"Device '{device}' not found")
    if not isinstance(ch, RingBuf):
        raise QmpError(f"{device} is not a ringbuf device")
    return ch


@qemu_command("ringbuf-write")
def ringbuf_write(ctx: CommandContext, device: str, data: str,
                  format: str = "utf8") -> dict:
    rb = _ringbuf(ctx, device)
    if format == "base64":
        try:
            raw = base64.b64decode(data, validate=False) if _b64_ok(data) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None:
            raise QmpError("Base64 data contains invalid characters")
    else:
        raw = data.encode("utf-8", "surrogatepass")
    rb.write(raw)
    return {}


def _b64_ok(data: str) -> bool:
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    return all(c in alphabet for c in data)


@qemu_command("ringbuf-read")
def ringbuf_read(ctx: CommandContext, device: str, size: int, format: str = "utf8") -> str:
    rb = _ringbuf(ctx, device)
    if size <= 0:
        raise QmpError("size must be greater than zero")
    raw = rb.read(size)
    if format == "base64":
        return base64.b64encode(raw).decode("ascii")
    # QEMU returns the bytes as a C string: a NUL ends it, invalid UTF-8 becomes U+FFFD
    raw = raw.split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace")

"""``blkdebug``: a filter for tests — inject errors, delay requests, hold them at breakpoints.

Two ways to open it, as in QEMU:

- ``blkdebug:CONFIG:FILE`` (CONFIG may be empty: ``blkdebug::FILE``), CONFIG being QEMU's
  blkdebug config file (``[inject-error]``, ``[set-state]`` sections with ``event``,
  ``errno``, ``sector``, ``once``, ``immediately``, ``state``, ``new_state`` keys);
- ``driver=blkdebug`` with ``image`` (or ``file``), ``config``, ``inject-error`` (list of
  dicts with QEMU's keys), ``set-state``.

Events are QEMU's names for the filter's own requests: ``read_aio``, ``write_aio``,
``flush_to_os``, ``flush_to_disk``, ``discard``, ``write_zeroes``.
Breakpoints: :meth:`BlkdebugDriver.break_on` (``break EVENT TAG``),
:meth:`resume` (``resume TAG``), :meth:`remove_break`, :meth:`wait_break` — a request
reaching a breakpoint is suspended (its thread waits) until resumed.
Delays: ``delay_ns`` per event (extension for tests: ``delay`` option as ``{event: ns}``).
"""

from __future__ import annotations

import configparser
import errno as errno_mod
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from emu.block.node import BlockDriver, register_driver
from emu.errors import BlockError

EVENTS = ("read_aio", "write_aio", "flush_to_os", "flush_to_disk", "discard", "write_zeroes")


class InjectedError(BlockError):
    """An error blkdebug injected; ``errno`` as configured."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass
class InjectRule:
    event: str
    errno: int = errno_mod.EIO
    sector: int = -1
    once: bool = False
    immediately: bool = False
    state: int = 0


@dataclass
class StateRule:
    event: str
    state: int
    new_state: int


def _parse_config(path: str) -> tuple[list[InjectRule], list[StateRule]]:
    cp = configparser.ConfigParser(strict=False)
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as err:
        raise BlockError(f"Could not read blkdebug config file: {os.strerror(err.errno)}") from err
    # Sections may repeat in QEMU's format: number them for configparser.
    out, n = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            n += 1
            out.append(f"[{s[1:-1].strip()}#{n}]")
        else:
            out.append(line)
    try:
        cp.read_string("\n".join(out))
    except configparser.Error as err:
        raise BlockError(f"Could not parse blkdebug config file: {err}") from err
    inj, st = [], []
    for sec in cp.sections():
        kind = sec.split("#", 1)[0]
        d = {k: v.strip().strip('"') for k, v in cp.items(sec)}
        if kind == "inject-error":
            inj.append(_inject_from(d))
        elif kind == "set-state":
            st.append(StateRule(d["event"], int(d.get("state", 0)), int(d["new_state"])))
        else:
            raise BlockError(f"Unknown blkdebug config section '{kind}'")
    return inj, st


def _inject_from(d: dict[str, Any]) -> InjectRule:
    ev = str(d.get("event", ""))
    if ev not in EVENTS and not ev:
        raise BlockError("Missing event name for rule")
    truth = lambda v: str(v).lower() in ("on", "true", "1", "yes")  # noqa: E731
    return InjectRule(ev, int(d.get("errno", errno_mod.EIO)), int(d.get("sector", -1)),
                      truth(d.get("once", False)), truth(d.get("immediately", False)),
                      int(d.get("state", 0)))


@register_driver("blkdebug")
class BlkdebugDriver(BlockDriver):
    """The blkdebug filter; a node whose ``file`` child holds the data."""

    is_filter = True

    def open(self, options: dict[str, Any]) -> None:
        bs = self.bs
        self.rules: list[InjectRule] = []
        self.state_rules: list[StateRule] = []
        self.state = 1
        self.delays: dict[str, int] = dict(options.get("delay", {}) or {})
        self.breakpoints: dict[str, str] = {}  # tag -> event
        self.suspended: dict[str, threading.Event] = {}  # tag -> resume event
        self.cond = threading.Condition()
        fname = options.get("filename")
        config = options.get("config")
        if fname and fname.startswith("blkdebug:") and bs.file is None:
            rest = fname[len("blkdebug:"):]
            config, _, image = rest.partition(":")
            if not image:
                raise BlockError("Could not parse blkdebug filename")
            child = bs.graph.open_protocol(image, read_only=bs.read_only, force_share=bs.force_share,
                                           cache=None)
            child.cache_direct, child.cache_no_flush = bs.cache_direct, bs.cache_no_flush
            bs.file = child
            child.auto = True
            child.parents += 1
            bs.filename = fname
        if bs.file is None:
            raise BlockError("Parameter 'image' is missing")
        self.can_grow = bs.file.impl.can_grow
        if config:
            inj, st = _parse_config(config)
            self.rules += inj
            self.state_rules += st
        for r in options.get("inject-error", []) or []:
            self.rules.append(_inject_from(r))
        for r in options.get("set-state", []) or []:
            new = r.get("new_state", r.get("new-state"))  # QAPI spells it new_state
            if new is None:
                raise BlockError("Parameter 'new_state' is missing")
            self.state_rules.append(StateRule(r["event"], int(r.get("state", 0)), int(new)))

    # --- test controls (qemu-io's break / resume / remove_break / wait_break) -------------
    def break_on(self, event: str, tag: str) -> None:
        """Suspend the next request that reaches ``event`` under ``tag``."""
        if event not in EVENTS:
            raise BlockError(f"Invalid event name \"{event}\"")
        with self.cond:
            self.breakpoints[tag] = event

    def remove_break(self, tag: str) -> None:
        """Remove breakpoint ``tag`` and resume anything suspended at it."""
        with self.cond:
            if tag not in self.breakpoints and tag not in self.suspended:
                raise BlockError(f"Could not remove breakpoint {tag}")
            self.breakpoints.pop(tag, None)
            ev = self.suspended.pop(tag, None)
            if ev:
                ev.set()
            self.cond.notify_all()

    def resume(self, tag: str) -> None:
        """Resume the request suspended at ``tag``."""
        with self.cond:
            ev = self.suspended.pop(tag, None)
            if ev is None:
                raise BlockError(f"Could not resume request {tag}")
            ev.set()
            self.cond.notify_all()

    def wait_break(self, tag: str, timeout: float = 10.0) -> bool:
        """Wait until a request is suspended at ``tag``; ``False`` on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: tag in self.suspended, timeout)

    def is_suspended(self, tag: str) -> bool:
        with self.cond:
            return tag in self.suspended

    # --- request path -------------------------------------------------------------------
    def _event(self, event: str, offset: int, length: int) -> None:
        for r in self.state_rules:
            if r.event == event and (r.state == 0 or r.state == self.state):
                self.state = r.new_state
        hit = None
        with self.cond:
            for tag, ev in list(self.breakpoints.items()):
                if ev == event:
                    del self.breakpoints[tag]
                    hit = threading.Event()
                    self.suspended[tag] = hit
                    self.cond.notify_all()
                    break
        if hit is not None:
            hit.wait()
        d = self.delays.get(event)
        if d:
            time.sleep(d / 1e9)
        for r in list(self.rules):
            if r.event != event or (r.state and r.state != self.state):
                continue
            if r.sector >= 0 and not (offset // 512 <= r.sector < (offset + max(length, 1) + 511) // 512):
                continue
            if r.once:
                self.rules.remove(r)
            raise InjectedError(r.errno)

    @property
    def size(self) -> int:
        return self.bs.file.size

    def read(self, offset: int, length: int) -> bytes:
        self._event("read_aio", offset, length)
        return self.bs.file.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._event("write_aio", offset, len(data))
        self.bs.file.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._event("write_zeroes", offset, length)
        self.bs.file.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._event("discard", offset, length)
        self.bs.file.discard(offset, length)

    def flush(self) -> None:
        self._event("flush_to_disk", 0, 0)
        self.bs.file.flush()

    def drain_metadata(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        self.bs.file.truncate(size)

    def block_status(self, offset: int, length: int):
        return self.bs.file.block_status(offset, length)

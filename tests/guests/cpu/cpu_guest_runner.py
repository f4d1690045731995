"""Boot the CPU/platform test guests (guest-images/cpu) on an emulator and parse their report.

The same image runs on every emulator in :data:`EMULATORS` with the same command line (QEMU's
``-machine pc`` with COM1 on stdio and isa-debug-exit at 0x501), so a guest's verdict on emu can
be compared line by line with QEMU's.  :func:`emu_readiness` is the one switch that decides how
emu's runs count while emu's machine is being built:

- ``python -m emu -version`` fails, or emu cannot boot the ``serial`` guest: emu runs are skipped
  with the reason (the probe result is cached for the session);
- emu boots ``serial``: emu runs execute; a guest listed in :data:`EMU_CONFORMANT` (or every guest
  when ``EMU_GUESTS_STRICT=1``) must pass, the others are ``xfail(strict=False)`` until they are
  added there.

A third entry boots the same images on QEMU with emu's own BIOS (``-bios firmware/bios.bin``), a
cross-check of the firmware with real guests; it must pass like the others.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, requires_qemu_system

GUESTS_DIR = REPO / "guest-images" / "cpu"
#: isa-debug-exit turns the value v the guest writes into exit status (v << 1) | 1.
STATUS_PASS = (0 << 1) | 1
STATUS_FAIL = (1 << 1) | 1
STATUS_DISK = (2 << 1) | 1      #: the MBR could not read the payload
#: First line every guest prints from its payload; printed twice means the machine reset.
BANNER = "emu-guest cpu/{name} start"
#: Seconds the serial guest gets to boot on emu before emu counts as not booting yet.
PROBE_TIMEOUT = 15.0
#: Guests that must pass on emu (not xfail) once emu boots; grow this as emu's layers land.
#: (unassigned is in: its test checks emu's deliberate all-ones reads instead of QEMU's zeros.)
EMU_CONFORMANT: frozenset[str] = frozenset({"serial", "pic-pit", "rtc", "pm-exceptions", "lm-exceptions",
                                            "bench", "reset", "unassigned"})


@dataclass(frozen=True)
class Emulator:
    """An emulator binary that takes QEMU's command line."""

    name: str
    argv: tuple[str, ...]       #: the binary and any options before the machine's
    timeout: float


#: emu's own BIOS (firmware/), also run on QEMU as a cross-check of firmware + guests.
OUR_BIOS = REPO / "firmware" / "bios.bin"
# TCG explicitly: the guests expect QEMU's emulated CPU (e.g. its long-mode IDT error codes),
# which is what qemu-system-x86_64 picks by default anyway.
QEMU = Emulator("qemu", ("qemu-system-x86_64", "-accel", "tcg"), timeout=30.0)
QEMU_OUR_BIOS = Emulator("qemu-ourbios", ("qemu-system-x86_64", "-accel", "tcg", "-bios", str(OUR_BIOS)),
                         timeout=30.0)
EMU = Emulator("emu", (sys.executable, "-m", "emu"), timeout=40.0)
#: After this many emu runs killed at the timeout, the remaining emu runs are skipped, so a
#: machine that hangs costs the suite minutes, not ten timeouts.
EMU_MAX_TIMEOUTS = 2
_emu_timeouts = 0
EMULATORS = [pytest.param(QEMU, marks=requires_qemu_system, id="qemu"),
             pytest.param(QEMU_OUR_BIOS, marks=requires_qemu_system, id="qemu-ourbios"),
             pytest.param(EMU, id="emu")]


def machine_args(image: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The machine every guest runs on (the brief's reference command line, minus the binary).

    :param image: raw disk image to boot from (opened read-write, as QEMU's default).
    :param extra: further options, placed before the machine's (e.g. ``-no-reboot``).
    """
    return [*extra, "-machine", "pc", "-m", "64", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-drive", f"file={image},format=raw,if=ide",
            "-device", "isa-debug-exit,iobase=0x501,iosize=2"]


@dataclass
class GuestRun:
    """What one boot of a guest produced."""

    emulator: str
    guest: str
    status: int | None          #: exit status; None when the run was killed at the timeout
    output: str                 #: COM1 output (stdout), CR LF normalised
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The guest's lines from its banner on (firmware chatter before it is dropped)."""
        banner = BANNER.format(name=self.guest)
        lines = self.output.split("\n")
        for i, line in enumerate(lines):
            if line.strip() == banner:
                return [line.rstrip() for line in lines[i + 1:] if line.strip()]
        return []

    def results(self) -> dict[str, str]:
        """``{test: rest of its line}`` for every ``<test>: ...`` result line."""
        found = {}
        for line in self.lines:
            m = re.match(r"^(\w[\w -]*?):(.*)$", line)
            if m:
                found[m.group(1)] = m.group(2).strip()
        return found

    def fields(self, test: str) -> dict[str, int]:
        """The ``field=hex`` values a result line printed (``want=`` values are not included)."""
        rest = self.results()[test]
        values: dict[str, int] = {}
        for name, value in re.findall(r"(\w+)=([0-9a-f]+)\b", rest):
            if name != "want":
                values[name] = int(value, 16)
        return values

    def describe(self) -> str:
        """Everything needed to diagnose a failed run, for assertion messages."""
        status = "timed out" if self.status is None else f"exit status {self.status}"
        return (f"{self.guest} on {self.emulator}: {status}\n--- COM1 ---\n{self.output}"
                f"\n--- stderr ---\n{self.stderr[-2000:]}")


def run_guest(emulator: Emulator, guest: str, workdir: Path, timeout: float | None = None,
              patch: dict[int, bytes] | None = None, size: int | None = None,
              extra: tuple[str, ...] = ()) -> GuestRun:
    """Boot ``guest-images/cpu/<guest>.img`` (a private copy, so runs never share a lock) to its end.

    :param emulator: which emulator to run.
    :param guest: image name without ``.img``.
    :param workdir: scratch directory for the image copy.
    :param timeout: seconds before the run is killed (default: the emulator's).
    :param patch: ``{offset: bytes}`` written into the copy first (e.g. the bench parameters).
    :param size: cut the copy to this many bytes (e.g. to make the payload unreadable).
    :param extra: further emulator options (e.g. ``-no-reboot``).
    """
    image = workdir / f"{guest}-{emulator.name}.img"
    data = bytearray((GUESTS_DIR / f"{guest}.img").read_bytes())
    for offset, blob in (patch or {}).items():
        data[offset:offset + len(blob)] = blob
    if size is not None:
        del data[size:]
    image.write_bytes(bytes(data))
    cmd = [*emulator.argv, *machine_args(image, extra)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout or emulator.timeout, cwd=workdir)
    except subprocess.TimeoutExpired as exc:
        if emulator is EMU:
            global _emu_timeouts
            _emu_timeouts += 1
        return GuestRun(emulator.name, guest, None, _text(exc.stdout), _text(exc.stderr))
    return GuestRun(emulator.name, guest, proc.returncode, _text(proc.stdout), _text(proc.stderr))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data.replace("\r\n", "\n")
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


_readiness: tuple[bool, str] | None = None


def emu_readiness(workdir: str) -> tuple[bool, str]:
    """Whether emu's machine boots test guests yet, and why not: ``(ready, reason)``.

    Probed once per session (the first caller's scratch directory holds the probe's files).

    :param workdir: scratch directory for the probe.
    """
    global _readiness
    if _readiness is None:
        _readiness = _probe_emu(Path(workdir))
    return _readiness


def _probe_emu(workdir: Path) -> tuple[bool, str]:
    try:
        version = subprocess.run([*EMU.argv, "-version"], stdin=subprocess.DEVNULL,
                                 capture_output=True, timeout=30, cwd=str(workdir))
    except subprocess.TimeoutExpired:
        return False, "`python -m emu -version` did not finish in 30 s"
    if version.returncode != 0:
        err = _text(version.stderr).strip().splitlines()
        return False, (f"emu has no machine yet: `python -m emu -version` exited {version.returncode}"
                       f" ({err[-1] if err else 'no message'})")
    probe = run_guest(EMU, "serial", workdir, timeout=PROBE_TIMEOUT)
    if probe.status != STATUS_PASS or "PASS" not in probe.lines:
        status = "timed out" if probe.status is None else f"exit status {probe.status}"
        tail = (probe.lines or probe.output.strip().splitlines() or ["no COM1 output"])[-1]
        return False, f"emu's machine does not boot the serial guest yet ({status}, last line: {tail!r})"
    return True, ""


def prepare(emulator: Emulator, guest: str, request: pytest.FixtureRequest, workdir: Path) -> None:
    """Skip or mark a test for ``emulator`` according to :func:`emu_readiness`.

    :param emulator: the emulator the test is about to run.
    :param guest: the guest it boots.
    :param request: the test's request, to apply the xfail marker.
    :param workdir: scratch directory for the readiness probe.
    """
    strict = os.environ.get("EMU_GUESTS_STRICT") == "1"
    if emulator is QEMU_OUR_BIOS:
        if not OUR_BIOS.is_file():
            pytest.skip("firmware/bios.bin is not built")
        return
    if emulator is not EMU:
        return
    ready, reason = emu_readiness(str(workdir))
    if not ready:
        pytest.skip(reason)
    if _emu_timeouts >= EMU_MAX_TIMEOUTS:
        pytest.skip(f"emu already timed out on {_emu_timeouts} guests in this session")
    if guest not in EMU_CONFORMANT and not strict:
        request.applymarker(pytest.mark.xfail(
            strict=False, reason=f"{guest} is not yet in EMU_CONFORMANT (emu's machine is new)"))


def assert_passed(run: GuestRun, tests: list[str], boots: int = 1) -> None:
    """The verdict every guest must reach: each named check line ends ``ok``, then ``PASS``,
    exit status 1, and exactly ``boots`` boots (no reset the guest did not ask for).

    :param run: the finished run.
    :param tests: names of the result lines the guest must print, in order.
    :param boots: how many times the guest's banner must appear.
    """
    banner = BANNER.format(name=run.guest)
    seen = run.output.count(banner)
    assert seen == boots, f"banner seen {seen} times, expected {boots}\n{run.describe()}"
    results = run.results()
    for test in tests:
        assert test in results, f"no {test!r} line\n{run.describe()}"
        assert results[test].endswith(" ok") or results[test] == "ok", f"{test}: {results[test]}\n{run.describe()}"
    order = [t for t in results if t in tests]
    assert order == tests, f"result lines out of order: {order}\n{run.describe()}"
    assert run.lines[-1] == "PASS", run.describe()
    assert run.status == STATUS_PASS, run.describe()

"""The one place the product imports Unicorn from.

Other modules write ``from emu.cpu.uclib import unicorn`` (then ``unicorn.x86_const`` and so on).

Stock libunicorn 2.1.4 sends every guest store to RAM through its slow path (~10-25x slower than
QEMU's TCG), because its code-dirty tracking is a stub.  ``scripts/build-unicorn`` builds the same
pinned release with emu's patches (``patches/unicorn/``) into a cache directory outside the git
tree; this module loads that build when it exists for the current patches, and otherwise the
stock library from the PyPI wheel, with one :class:`SlowUnicornWarning`.

Choice of library, before the first ``import unicorn`` in the process:

- ``EMU_UNICORN=stock``: the PyPI wheel's library, silently;
- ``EMU_UNICORN=patched``: the patched build, or :class:`~emu.errors.CpuError` if it is missing;
- unset / ``auto``: ``LIBUNICORN_PATH`` if the user set it, else the patched build if present,
  else the stock library with a warning.

The patched build lives in ``$EMU_UNICORN_DIR`` if set, else
``${XDG_CACHE_HOME:-~/.cache}/emu/unicorn-2.1.4-<patch-hash>``, and counts only with a
``build-id`` file holding the current patch hash (``scripts/build-unicorn --print-hash``).
If ``unicorn`` was imported before this module, nothing can be changed: :func:`library_info`
reports what was loaded.  Whether a library is the patched one is read off the library itself
(its ``emu_uc_patches`` symbol), never guessed from paths.

After host code writes guest RAM behind the CPU's back (device DMA into a ``mem_map_ptr`` buffer,
or ``uc.mem_write``, which does not invalidate translated code either), call
:func:`invalidate_code` on the vCPU thread.

``python -m emu.cpu.uclib`` prints which library a process would load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from emu.errors import CpuError

#: The pinned Unicorn release; interrupt delivery depends on its context layout.
UNICORN_VERSION = "2.1.4"
#: Must equal RECIPE in scripts/build-unicorn: part of the patch hash.
BUILD_RECIPE = "1"
#: The library file name the unicorn binding loads from ``LIBUNICORN_PATH`` (a directory).
LIB_NAME = "libunicorn.so.2"

_PATCH_DIR = Path(__file__).resolve().parents[2] / "patches" / "unicorn"
_CR0_PG = 1 << 31


class SlowUnicornWarning(RuntimeWarning):
    """The stock libunicorn is loaded: guest stores run about ten times slower."""


@dataclass(frozen=True)
class UnicornLibrary:
    """Which libunicorn this process loaded.

    :param path: file the binding loaded
    :param patched: True when it is emu's patched build (it exports ``emu_uc_patches``)
    :param patches: the patch names the library reports (empty for stock)
    :param reason: why this library was chosen, for logs and ``which_library()``
    """

    path: str
    patched: bool
    patches: tuple[str, ...]
    reason: str


def patch_hash(patch_dir: Path = _PATCH_DIR) -> str | None:
    """The hash naming a patched build: the same value as ``scripts/build-unicorn --print-hash``.

    :param patch_dir: directory of ``*.patch`` files
    :return: 12 hex digits, or None when the patch directory is absent (non-editable install)
    """
    if not patch_dir.is_dir():
        return None
    h = hashlib.sha256(f"unicorn-{UNICORN_VERSION} recipe-{BUILD_RECIPE}\n".encode())
    for p in sorted(patch_dir.glob("*.patch"), key=lambda q: q.name.encode()):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def patched_dir() -> Path:
    """The directory where ``scripts/build-unicorn`` installs the patched library by default."""
    env = os.environ.get("EMU_UNICORN_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "emu" / f"unicorn-{UNICORN_VERSION}-{patch_hash() or 'unknown'}"


def patched_build_available() -> bool:
    """True when :func:`patched_dir` holds a complete build for the current patches."""
    d = patched_dir()
    if not (d / LIB_NAME).is_file():
        return False
    try:
        build_id = (d / "build-id").read_text().strip()
    except OSError:
        return False
    want = patch_hash()
    # Without the patch sources (installed package) any complete build is accepted; the loaded
    # library is checked for the patch marker anyway.
    return want is None or build_id == want


def _mode() -> str:
    mode = os.environ.get("EMU_UNICORN", "").strip().lower() or "auto"
    if mode not in ("auto", "stock", "patched"):
        warnings.warn(f"EMU_UNICORN={mode!r} is not one of auto, stock, patched; using auto",
                      RuntimeWarning, stacklevel=3)
        mode = "auto"
    return mode


def _import_unicorn(mode: str):
    """Import unicorn with ``LIBUNICORN_PATH`` set for *mode*.

    :return: (module, reason, the patched library file asked for or None)
    """
    if "unicorn" in sys.modules:
        return sys.modules["unicorn"], "unicorn was imported before emu.cpu.uclib", None
    saved = os.environ.get("LIBUNICORN_PATH")
    wanted = None
    if mode == "stock":
        os.environ.pop("LIBUNICORN_PATH", None)
        reason = "EMU_UNICORN=stock"
    elif mode == "auto" and saved:
        reason = "LIBUNICORN_PATH set by the user"
    elif patched_build_available():
        os.environ["LIBUNICORN_PATH"] = str(patched_dir())
        wanted = str(patched_dir() / LIB_NAME)
        reason = "patched build found"
    elif mode == "patched":
        raise CpuError(f"EMU_UNICORN=patched but there is no patched libunicorn in {patched_dir()} "
                       f"for the current patches: run scripts/build-unicorn")
    else:
        reason = f"no patched build in {patched_dir()}"
    try:
        import unicorn as module
    finally:
        # The binding reads the variable once, at import; do not leak our choice to children.
        if saved is None:
            os.environ.pop("LIBUNICORN_PATH", None)
        else:
            os.environ["LIBUNICORN_PATH"] = saved
    return module, reason, wanted


def _inspect(reason: str, wanted: str | None) -> UnicornLibrary:
    from unicorn.unicorn_py3 import unicorn as binding

    lib = binding.uclib
    if wanted is not None and str(lib._name) != wanted:
        # The binding silently falls back to its own copy when a library fails to load.
        reason = f"the patched build {wanted} failed to load"
    try:
        marker = lib.emu_uc_patches
    except AttributeError:
        return UnicornLibrary(str(lib._name), False, (), reason)
    marker.restype = ctypes.c_char_p
    marker.argtypes = []
    patches = tuple(marker().decode("ascii", "replace").split())
    return UnicornLibrary(str(lib._name), True, patches, reason)


_MODE = _mode()
unicorn, _reason, _wanted = _import_unicorn(_MODE)

if unicorn.__version__ != UNICORN_VERSION:
    raise CpuError(f"emu needs unicorn=={UNICORN_VERSION}, found {unicorn.__version__}")
if unicorn.uc_version()[:2] != (2, 1):
    raise CpuError(f"libunicorn {unicorn.uc_version()[:2]} does not match the 2.1 binding")

_LIBRARY = _inspect(_reason, _wanted)

#: True when the patched (fast guest store) libunicorn is loaded.
PATCHED: bool = _LIBRARY.patched

if _MODE == "patched" and not PATCHED:
    raise CpuError(f"EMU_UNICORN=patched but the stock libunicorn was loaded from {_LIBRARY.path} "
                   f"({_LIBRARY.reason})")
if _MODE == "stock" and PATCHED:
    warnings.warn(f"EMU_UNICORN=stock ignored: the patched libunicorn was already loaded "
                  f"({_LIBRARY.reason})", RuntimeWarning, stacklevel=2)
elif _MODE == "auto" and not PATCHED:
    warnings.warn(f"emu: using the stock libunicorn {UNICORN_VERSION} ({_LIBRARY.reason}): guest "
                  f"stores run ~10x slower. Build the fast one once with scripts/build-unicorn "
                  f"(needs cmake and gcc); EMU_UNICORN=stock silences this.",
                  SlowUnicornWarning, stacklevel=2)


def library_info() -> UnicornLibrary:
    """Which libunicorn is loaded in this process, and why."""
    return _LIBRARY


def which_library() -> str:
    """One line telling which libunicorn is loaded, e.g. for ``emu --version`` or test reports."""
    lib = _LIBRARY
    kind = f"patched ({' '.join(lib.patches)})" if lib.patched else "stock"
    return f"libunicorn {UNICORN_VERSION} {kind} from {lib.path} [{lib.reason}]"


def _ram_exec_spans(uc: "unicorn.Uc", begin: int, end: int) -> list[tuple[int, int]]:
    """The parts of [begin, end) that are mapped executable (only they can hold translated code)."""
    spans = []
    for rbegin, rlast, perms in uc.mem_regions():
        lo, hi = max(begin, rbegin), min(end, rlast + 1)
        if lo < hi and perms & unicorn.UC_PROT_EXEC:
            spans.append((lo, hi))
    return spans


def invalidate_code(uc: "unicorn.Uc", address: int, size: int) -> None:
    """Drop translated code for the guest-physical range [address, address + size).

    Call it after host code wrote guest RAM that the CPU may have executed (device DMA, loading
    a kernel, ``uc.mem_write``): neither path invalidates translations by itself.  Call it on the
    thread that owns *uc*, between ``emu_start`` runs (the stock fallback may flush the whole
    translation cache, which must not happen under a running block).

    With the patched library this is exact.  With the stock one it is exact while paging is off
    (where linear = physical) and a flush of all translated code while paging is on, because the
    stock API only takes virtual addresses.

    :param uc: the engine
    :param address: guest-physical start
    :param size: length in bytes; 0 does nothing
    :raises ValueError: on a negative size or a range outside 64 bits
    """
    if size == 0:
        return
    if size < 0 or address < 0 or address + size >= 1 << 64:
        raise ValueError(f"bad guest-physical range {address:#x}+{size:#x}")
    if PATCHED:
        err = _emu_invalidate_phys(uc._uch, address, size)
        if err != unicorn.UC_ERR_OK:
            raise unicorn.UcError(err)
        return
    if uc.reg_read(unicorn.x86_const.UC_X86_REG_CR0) & _CR0_PG:
        uc.ctl_flush_tb()
        return
    for lo, hi in _ram_exec_spans(uc, address, address + size):
        uc.ctl_remove_cache(lo, hi)


if PATCHED:
    from unicorn.unicorn_py3 import unicorn as _binding

    _emu_invalidate_phys = _binding.uclib.emu_uc_invalidate_phys
    _emu_invalidate_phys.restype = ctypes.c_int
    _emu_invalidate_phys.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]

#: ``int ack(void *opaque)``: the INTA cycle libunicorn calls when it takes an external interrupt
#: (patch 0003): the vector, or -1 when nothing is to be delivered after all.
IRQ_ACK_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)

#: True when the loaded library takes external interrupts itself (patch 0003, "native-irq"):
#: :func:`irq_raise` and an ack callback instead of stopping the CPU for every IRQ.
NATIVE_IRQ: bool = PATCHED and "native-irq" in _LIBRARY.patches

if NATIVE_IRQ:
    # Through a PyDLL handle of the same library: these calls are a few stores, so they keep the
    # GIL (a CDLL call releases and re-takes it, which costs more than the call).
    _pylib = ctypes.PyDLL(_LIBRARY.path)
    _emu_raise_irq = _pylib.emu_uc_raise_irq
    _emu_raise_irq.restype = None
    _emu_raise_irq.argtypes = [ctypes.c_void_p]
    _emu_clear_irq = _pylib.emu_uc_clear_irq
    _emu_clear_irq.restype = None
    _emu_clear_irq.argtypes = [ctypes.c_void_p]
    _emu_set_irq_ack = _pylib.emu_uc_set_irq_ack
    _emu_set_irq_ack.restype = ctypes.c_int
    _emu_set_irq_ack.argtypes = [ctypes.c_void_p, IRQ_ACK_CB, ctypes.c_void_p]


def irq_set_ack(uc: "unicorn.Uc", ack: object) -> None:
    """Install ``ack`` (an :data:`IRQ_ACK_CB`; the caller keeps it alive) as *uc*'s INTA cycle.

    :raises CpuError: when the library has no native interrupts (:data:`NATIVE_IRQ` is False)
    """
    if not NATIVE_IRQ:
        raise CpuError("this libunicorn cannot take external interrupts itself")
    err = _emu_set_irq_ack(uc._uch, ack, None)
    if err != unicorn.UC_ERR_OK:
        raise unicorn.UcError(err)


def irq_raise(uc: "unicorn.Uc") -> None:
    """INTR rose: *uc* takes the interrupt at the next block boundary with IF=1 and no shadow,
    calling the ack callback for the vector.  Any thread; also while ``emu_start`` runs."""
    _emu_raise_irq(uc._uch)


def irq_clear(uc: "unicorn.Uc") -> None:
    """Drop a request made by :func:`irq_raise` that has not been taken."""
    _emu_clear_irq(uc._uch)


#: ``int halt(void *opaque)``: called by libunicorn (patch 0004) on the emulating thread when the
#: guest executes HLT with IF=1, RIP already past it; > 0: an interrupt is pending, take it now
#: without leaving ``emu_start``; 0: the HLT goes on as without the callback.
HALT_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)

#: True when the loaded library lets a halted guest wait inside ``emu_start`` (patch 0004).
NATIVE_HALT: bool = NATIVE_IRQ and "native-halt" in _LIBRARY.patches

if NATIVE_HALT:
    _emu_set_halt_cb = _pylib.emu_uc_set_halt_cb
    _emu_set_halt_cb.restype = ctypes.c_int
    _emu_set_halt_cb.argtypes = [ctypes.c_void_p, HALT_CB, ctypes.c_void_p]


def halt_set_callback(uc: "unicorn.Uc", cb: object) -> None:
    """Install ``cb`` (a :data:`HALT_CB`; the caller keeps it alive) as *uc*'s HLT wait.

    :raises CpuError: when the library has no such hook (:data:`NATIVE_HALT` is False)
    """
    if not NATIVE_HALT:
        raise CpuError("this libunicorn cannot wait in HLT itself")
    err = _emu_set_halt_cb(uc._uch, cb, None)
    if err != unicorn.UC_ERR_OK:
        raise unicorn.UcError(err)


#: True when the loaded library runs a halted guest's timer tick in C (patch 0008,
#: ``emu_hot_attach``): the 8259 pair, 8254 channel 0 and clock state then live in
#: :mod:`emu.hw.hot`'s shared structures for devices created from now on.
NATIVE_TICK: bool = False
if NATIVE_HALT:
    from emu.hw import hot as _hot

    NATIVE_TICK = _hot.install(_LIBRARY.path)


__all__ = [
    "NATIVE_TICK", "IRQ_ACK_CB", "NATIVE_IRQ", "irq_set_ack", "irq_raise", "irq_clear",
    "HALT_CB", "NATIVE_HALT", "halt_set_callback",
    "unicorn", "PATCHED", "UNICORN_VERSION", "SlowUnicornWarning", "UnicornLibrary",
    "library_info", "which_library", "invalidate_code", "patch_hash", "patched_dir",
    "patched_build_available",
]

if __name__ == "__main__":
    print(which_library())

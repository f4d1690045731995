"""The ``rbd`` protocol driver: a Ceph RBD image through librbd.

Why cffi in ABI mode over Debian's ``librbd.so.1``/``librados.so.2``: emu is a pip-installed
package; python3-rbd is bound to Debian's own interpreter (not the one emu runs on), and
API mode would need a compiler and librbd-dev at install time.  ABI mode needs neither:
the few dozen C declarations below are librbd's stable C API (librbd/librbd.h,
rados/librados.h), and the libraries are loaded lazily, so emu works without Ceph until an
``rbd`` node is opened.

Naming follows QEMU's block/rbd.c:

* legacy filename ``rbd:pool[/namespace]/image[@snap][:opt=val[:opt=val...]]``, with
  ``\\`` escaping ``:``/``@``/``/``; ``conf=`` (config file, ``none`` for no file),
  ``id=`` (user), ``keyring=``/``mon_host=``/any other key passed to ``rados_conf_set``;
* ``blockdev-add`` options ``pool``, ``namespace``, ``image``, ``conf``, ``user``,
  ``snapshot``, ``key-secret`` (refused: no secret objects here);
* error texts: ``error reading conf file X``, ``error connecting``, ``error opening pool P``,
  ``error reading header from IMAGE`` (each followed by ``: strerror``).

I/O uses librbd's asynchronous calls (``rbd_aio_*``).  :meth:`RbdDriver.aio_submit` returns
at once and calls back on completion from the image's completion thread, which takes
finished completions off librbd's event queue in batches, in the order they finish
(:class:`_Completions`; librbd's own threads never run Python), or from the thread of a
loop that polls them itself (:meth:`RbdDriver.inline_completions`, emu-img bench); the
synchronous :class:`~emu.block.node.BlockDriver` methods wait on the calling thread.

Snapshots have RBD's semantics as QEMU presents them: no ids (``id`` = ``name``), an id
given on create is refused, the date and VM clock are zero, ``vm-state-size`` is the
snapshot's image size.  An image opened at ``@snap`` (or ``snapshot=``) is read-only.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Callable

from emu.block.node import BlockDriver, register_driver
from emu.errors import BlockError, ImageOpenError

log = logging.getLogger(__name__)

_CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
typedef struct { uint64_t id; uint64_t size; const char *name; } rbd_snap_info_t;
typedef struct {
    uint64_t size; uint64_t obj_size; uint64_t num_objs; int order;
    char block_name_prefix[24]; int64_t parent_pool; char parent_name[96];
} rbd_image_info_t;
int  rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize);
int  rados_create(rados_t *cluster, const char * const id);
int  rados_conf_read_file(rados_t cluster, const char *path);
int  rados_conf_set(rados_t cluster, const char *option, const char *value);
int  rados_conf_get(rados_t cluster, const char *option, char *buf, size_t len);
int  rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int  rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);
int  rbd_create(rados_ioctx_t io, const char *name, uint64_t size, int *order);
int  rbd_remove(rados_ioctx_t io, const char *name);
int  rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int  rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int  rbd_close(rbd_image_t image);
int  rbd_get_size(rbd_image_t image, uint64_t *size);
int  rbd_resize(rbd_image_t image, uint64_t size);
int  rbd_snap_create(rbd_image_t image, const char *snapname);
int  rbd_snap_remove(rbd_image_t image, const char *snapname);
int  rbd_snap_rollback(rbd_image_t image, const char *snapname);
int  rbd_snap_list(rbd_image_t image, rbd_snap_info_t *snaps, int *max_snaps);
void rbd_snap_list_end(rbd_snap_info_t *snaps);
int  rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
int  rbd_aio_wait_for_complete(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int  rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c);
int  rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
int  rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int  rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                          int zero_flags, int op_flags);
int  rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
"""

#: QEMU's QEMUSnapshotInfo.id_str size: an RBD snapshot name must fit in it (id = name).
RBD_SNAP_ID_MAX = 128
#: Object size QEMU reports as cluster-size when librbd gives none (RBD's default order 22).
RBD_DEFAULT_OBJECT_SIZE = 1 << 22

#: librados's own client_mount_timeout (seconds), and the one emu uses when nothing set it.
LIBRADOS_MOUNT_TIMEOUT = 300.0
DEFAULT_MOUNT_TIMEOUT = 30
#: A LUKS header's magic; the version (0x0001 or 0x0002) follows (QEMU's rbd LUKS probe).
_LUKS_MAGIC = b"LUKS\xba\xbe"

_lib_lock = threading.Lock()
_libs: tuple[Any, Any, Any] | None = None   # (ffi, librados, librbd)


class RbdUnavailable(BlockError):
    """librbd/librados cannot be loaded on this host."""


def load_libs() -> tuple[Any, Any, Any]:
    """``(ffi, librados, librbd)``, loaded once.

    :raises RbdUnavailable: cffi or the Ceph client libraries are missing.
    """
    global _libs
    with _lib_lock:
        if _libs is None:
            try:
                from cffi import FFI
                ffi = FFI()
                ffi.cdef(_CDEF)
                rados = ffi.dlopen("librados.so.2")
                rbd = ffi.dlopen("librbd.so.1")
            except (ImportError, OSError) as err:
                raise RbdUnavailable(f"Ceph client libraries are not available: {err}") from err

            _libs = (ffi, rados, rbd)
        return _libs


#: librbd.h's EVENT_TYPE_EVENTFD (rbd_set_image_notification).
EVENT_TYPE_EVENTFD = 2
#: Completions taken from librbd's event queue per rbd_poll_io_events call.
POLL_BATCH = 64

_fast_libs: tuple[Any, Any, Any, Any, Any, Any] | None = None
#: Where a bytes object's data starts, from its id() (PyBytes_AsString(b) - id(b), measured
#: once: the same for every bytes object of the interpreter).
_BYTES_DATA = 0
#: Reads up to this size get a zeroed ``bytes(n)`` (cheaper than a ctypes call), larger ones
#: CPython's uninitialised PyBytes_FromStringAndSize(NULL, n) (no memset of megabytes).
SMALL_READ = 65536


def _fast() -> tuple[Any, Any, Any, Any, Any, Any]:
    """librbd's aio calls through ctypes, for the request hot path:
    ``(held, released, new_bytes, bytes_addr, c_void_p, byref)``.

    ``held`` (a PyDLL) keeps the GIL during the call: creating, starting, reading, polling
    and releasing completions take microseconds and never wait for Python, and each GIL
    release (as cffi's ABI mode does at every call) would let another Python thread take
    it in between.  ``released`` (a CDLL) drops the GIL: only ``rbd_aio_wait_for_complete``
    (a synchronous request) uses it.  ``new_bytes(NULL, n)`` is CPython's
    PyBytes_FromStringAndSize: a bytes object whose contents librbd then fills (at
    ``as_string(obj)``, PyBytes_AsString, i.e. ``id(obj) +`` :data:`_BYTES_DATA`) before
    anyone else sees it, so a large read is neither zeroed first nor copied after.
    """
    global _fast_libs
    if _fast_libs is None:
        import ctypes
        held, released = ctypes.PyDLL("librbd.so.1"), ctypes.CDLL("librbd.so.1")
        vp, u64, sz, cp = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_char_p
        for name, args, res in (
                ("rbd_aio_create_completion", [vp, vp, ctypes.POINTER(vp)], ctypes.c_int),
                ("rbd_aio_get_return_value", [vp], ctypes.c_ssize_t),
                ("rbd_aio_release", [vp], None),
                ("rbd_aio_read", [vp, u64, sz, vp, vp], ctypes.c_int),
                ("rbd_aio_write", [vp, u64, sz, cp, vp], ctypes.c_int),
                ("rbd_aio_discard", [vp, u64, u64, vp], ctypes.c_int),
                ("rbd_aio_write_zeroes", [vp, u64, sz, vp, ctypes.c_int, ctypes.c_int], ctypes.c_int),
                ("rbd_aio_flush", [vp, vp], ctypes.c_int),
                ("rbd_poll_io_events", [vp, vp, ctypes.c_int], ctypes.c_int),
                ("rbd_set_image_notification", [vp, ctypes.c_int, ctypes.c_int], ctypes.c_int)):
            fn = getattr(held, name)
            fn.argtypes, fn.restype = args, res
        released.rbd_aio_wait_for_complete.argtypes = [vp]
        released.rbd_aio_wait_for_complete.restype = ctypes.c_int
        new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
        new_bytes.argtypes, new_bytes.restype = [vp, ctypes.c_ssize_t], ctypes.py_object
        as_string = ctypes.pythonapi.PyBytes_AsString
        as_string.argtypes, as_string.restype = [ctypes.py_object], vp
        probe = bytes(8)
        global _BYTES_DATA
        _BYTES_DATA = as_string(probe) - id(probe)
        _fast_libs = (held, released, new_bytes, as_string, vp, ctypes.byref)
    return _fast_libs


# --- filename and options (QEMU block/rbd.c qemu_rbd_parse_filename) --------------------
def _next_tok(s: str, delims: str) -> tuple[str, str | None, str]:
    """Split ``s`` at the first unescaped char of ``delims``: ``(token, delim, rest)``."""
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 2
            continue
        if s[i] in delims:
            return s[:i], s[i], s[i + 1:]
        i += 1
    return s, None, ""


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out)


def parse_filename(filename: str) -> dict[str, Any]:
    """Parse QEMU's ``rbd:pool[/namespace]/image[@snap][:key=val...]`` into blockdev options.

    Returns ``pool``, ``image`` and where given ``namespace``, ``snapshot``, ``conf``,
    ``user`` and ``key-value-pairs`` (other keys, in order, for ``rados_conf_set``).

    :raises BlockError: QEMU's texts for a malformed name.
    """
    if not filename.startswith("rbd:"):
        raise BlockError("File name must start with 'rbd:'")
    rest = filename[4:]
    opts: dict[str, Any] = {}
    found, d, rest = _next_tok(rest, "/")
    if d is None or not found:
        raise BlockError("Parameter 'pool' is missing" if not found else "Parameter 'image' is missing")
    opts["pool"] = _unescape(found)
    # An optional namespace: pool/ns/image
    found, d, tail = _next_tok(rest, "/@:")
    if d == "/":
        opts["namespace"] = _unescape(found)
        found, d, tail = _next_tok(tail, "@:")
    # An empty image name goes to librbd, as in QEMU ("error reading header from : ...").
    opts["image"] = _unescape(found)
    if d == "@":
        found, d, tail = _next_tok(tail, ":")
        opts["snapshot"] = _unescape(found)
    pairs: list[tuple[str, str]] = []
    while d == ":" and tail:
        kv, d, tail = _next_tok(tail, ":")
        key, eq, val = _next_tok(kv, "=")
        if eq is None:
            raise BlockError(f"conf option {_unescape(key)} has no value")
        key, val = _unescape(key), _unescape(val)
        if key == "conf":
            opts["conf"] = val
        elif key == "id":
            opts["user"] = val
        else:
            pairs.append((key, val))
    if pairs:
        opts["key-value-pairs"] = pairs
    return opts


def _strerror(r: int) -> str:
    return os.strerror(-r) if r < 0 else "Unknown error"


class RbdError(BlockError):
    """A librbd/librados call failed; ``errno`` is the positive error number."""

    def __init__(self, msg: str, err: int) -> None:
        super().__init__(msg)
        self.errno = err


def _check(r: int, what: str) -> int:
    if r < 0:
        raise RbdError(f"{what}: {_strerror(r)}", -r)
    return r


class Connection:
    """One RADOS client connection and an I/O context on a pool (QEMU's qemu_rbd_connect).

    :param options: ``pool``, ``namespace``, ``conf``, ``user``, ``key-value-pairs``, and
        ``cache`` (bool: librbd's ``rbd_cache``; absent leaves librbd's setting).
    :raises ImageOpenError: with QEMU's text when the conf, cluster or pool is missing.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.ffi, self.rados, self.rbd = load_libs()
        ffi, rados = self.ffi, self.rados
        if options.get("key-secret"):
            raise ImageOpenError("key-secret is not supported by emu's rbd driver; use a keyring")
        self.pool = str(options["pool"])
        cl = ffi.new("rados_t *")
        user = options.get("user")
        r = rados.rados_create(cl, user.encode() if user else ffi.NULL)
        if r < 0:
            raise ImageOpenError(f"error initializing: {_strerror(r)}")
        self.cluster = cl[0]
        self.ioctx = None
        try:
            conf = options.get("conf")
            if conf and conf != "none":
                r = rados.rados_conf_read_file(self.cluster, conf.encode())
                if r < 0:
                    raise ImageOpenError(f"error reading conf file {conf}: {_strerror(r)}")
            elif conf is None:
                # QEMU reads the default search path when no conf= is given (missing is fine).
                rados.rados_conf_read_file(self.cluster, ffi.NULL)
            for key, val in options.get("key-value-pairs", ()):
                r = rados.rados_conf_set(self.cluster, key.encode(), val.encode())
                if r < 0:
                    raise ImageOpenError(f"invalid conf option {key}: {_strerror(r)}")
            if "cache" in options:
                # QEMU's qemu_rbd_connect: librbd's cache follows the cache mode (off for
                # cache.direct, i.e. cache=none/directsync), after the user's settings.
                rados.rados_conf_set(self.cluster, b"rbd_cache", b"true" if options["cache"] else b"false")
            self._default_mount_timeout()
            r = rados.rados_connect(self.cluster)
            if r < 0:
                raise ImageOpenError(f"error connecting: {_strerror(r)}")
            io = ffi.new("rados_ioctx_t *")
            r = rados.rados_ioctx_create(self.cluster, self.pool.encode(), io)
            if r < 0:
                raise ImageOpenError(f"error opening pool {self.pool}: {_strerror(r)}")
            self.ioctx = io[0]
            ns = options.get("namespace") or ""
            rados.rados_ioctx_set_namespace(self.ioctx, ns.encode())
        except BaseException:
            self.close()
            raise

    def conf_get(self, key: str) -> str | None:
        """A RADOS setting's current value (``None`` if librados does not know it)."""
        buf = self.ffi.new("char[]", 256)
        if self.rados.rados_conf_get(self.cluster, key.encode(), buf, 256) < 0:
            return None
        return self.ffi.string(buf).decode()

    def _default_mount_timeout(self) -> None:
        """librados waits ``client_mount_timeout`` (300 s by default) for an unreachable
        cluster inside rados_connect, which runs on the monitor's command thread for
        blockdev-add.  Unless the conf file or the options chose a value, emu uses
        :data:`DEFAULT_MOUNT_TIMEOUT` as QEMU users commonly do with ``:client_mount_timeout=``."""
        try:
            current = float(self.conf_get("client_mount_timeout") or "nan")
        except ValueError:
            return
        if current == LIBRADOS_MOUNT_TIMEOUT:
            self.rados.rados_conf_set(self.cluster, b"client_mount_timeout",
                                      str(DEFAULT_MOUNT_TIMEOUT).encode())

    def create_image(self, name: str, size: int) -> None:
        """Create an RBD image of ``size`` bytes (QEMU's qemu_rbd_do_create, default order)."""
        order = self.ffi.new("int *", 0)
        r = self.rbd.rbd_create(self.ioctx, name.encode(), size, order)
        if r < 0:
            raise BlockError(f"error rbd create: {_strerror(r)}")

    def remove_image(self, name: str) -> None:
        """Remove an RBD image (it must have no snapshots)."""
        _check(self.rbd.rbd_remove(self.ioctx, name.encode()), f"error removing {name}")

    def close(self) -> None:
        if self.ioctx is not None:
            self.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = None
        if self.cluster is not None:
            self.rados.rados_shutdown(self.cluster)
            self.cluster = None


class _SyncWait:
    """A synchronous request's completion, released by whichever of the waiting thread
    (after reading the result) and the completion harvester (after taking it off librbd's
    event queue, which still holds it then) comes last."""

    __slots__ = ("popped", "read")
    lock = threading.Lock()

    def __init__(self) -> None:
        self.popped = self.read = False


class _Completions:
    """One image's librbd completions, harvested through an event fd (librbd's event
    socket: ``rbd_set_image_notification`` + ``rbd_poll_io_events``).

    librbd queues each finished completion of the image and bumps the eventfd; nothing of
    librbd's threads runs Python.  :meth:`reap` takes every finished completion off the
    queue with one call per :data:`POLL_BATCH`, in the order they finished (a fast request
    behind a slow one is not held back), releases them and runs their requests' callbacks.
    Who reaps: a completion thread per image that blocks on the eventfd with the GIL
    released (:meth:`start_thread`, the default), or, in *inline* mode, the thread that
    owns the requests' loop, calling :meth:`wait` (``emu-img bench``: one Python thread,
    no hand-off per request, as QEMU's event loop).

    Every completion created on the image goes through the queue once librbd has the event
    fd, so all of them are in :attr:`inflight` (address -> request) until reaped.
    """

    def __init__(self, image: int, name: str) -> None:
        held = _fast()[0]
        self.efd = os.eventfd(0, os.EFD_CLOEXEC)
        r = held.rbd_set_image_notification(image, self.efd, EVENT_TYPE_EVENTFD)
        if r < 0:
            os.close(self.efd)
            raise RbdError(f"error setting the image notification: {_strerror(r)}", -r)
        self.image, self.name = image, name
        f = _fast()
        self.held, self.new_bytes, self.c_void_p, self.byref = f[0], f[2], f[4], f[5]
        self.create, self.read, self.write = (held.rbd_aio_create_completion, held.rbd_aio_read,
                                              held.rbd_aio_write)
        self.poll, self.value, self.release = (held.rbd_poll_io_events, held.rbd_aio_get_return_value,
                                               held.rbd_aio_release)
        #: completion address -> ``(callback, buffer, read length)`` or a :class:`_SyncWait`
        self.inflight: dict[int, Any] = {}
        self.inline = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        import ctypes
        self._batch = (ctypes.c_void_p * POLL_BATCH)()

    def start_thread(self) -> None:
        """Reap on a completion thread of this image (unless inline or already running)."""
        if self._thread is None and not self.inline:
            with self._lock:
                if self._thread is None:
                    t = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    t.start()
                    self._thread = t

    def reap(self) -> int:
        """Complete every request librbd has finished (any thread); returns how many."""
        poll, value, release = self.poll, self.value, self.release
        batch, inflight, image = self._batch, self.inflight, self.image
        done: list[tuple[tuple, int]] = []
        with self._lock:
            while True:
                n = poll(image, batch, POLL_BATCH)
                for i in range(n):
                    comp = batch[i]
                    entry = inflight.pop(comp, None)
                    if type(entry) is tuple:
                        done.append((entry, value(comp)))
                        release(comp)
                    elif entry is None:
                        log.error("rbd: completion %#x of no request", comp)
                        release(comp)
                    else:                           # a synchronous request's
                        with _SyncWait.lock:
                            entry.popped = True
                            if entry.read:
                                release(comp)
                if n < POLL_BATCH:
                    break
        for (callback, buf, length), ret in done:
            if callback is None:
                continue
            data = None
            if length and ret >= 0:                 # a read: librbd filled buf
                data = buf if ret >= length else buf[:ret] + bytes(length - ret)
            try:
                callback(ret, data)
            except Exception:  # a broken callback must not stop the completions
                log.exception("rbd completion callback failed")
        return len(done)

    def wait(self) -> int:
        """Inline mode: block (GIL released) until librbd finished something, then reap.
        Returns at once (0) when nothing is in flight."""
        if not self.inflight:
            return self.reap()
        os.read(self.efd, 8)
        return self.reap()

    def _loop(self) -> None:
        read, efd = os.read, self.efd
        while True:
            read(efd, 8)
            try:
                self.reap()
            except Exception:  # never let the completion thread die
                log.exception("rbd completion thread of %s failed", self.name)
            if self._stopping and not self.inflight:
                return

    def close(self) -> None:
        """Complete everything submitted (on the thread, or here in inline mode), end the
        thread; the eventfd closes after librbd closed the image (:meth:`close_fd`)."""
        t = self._thread
        if t is not None:
            self._stopping = True
            os.write(self.efd, (1).to_bytes(8, "little"))
            if t is not threading.current_thread():
                t.join()
        else:
            while self.inflight:
                self.wait()

    def close_fd(self) -> None:
        os.close(self.efd)


@register_driver("rbd")
class RbdDriver(BlockDriver):
    """RBD image protocol (QEMU's ``rbd`` block driver)."""

    is_protocol = True
    supports_snapshots = True

    def __init__(self, bs) -> None:
        super().__init__(bs)
        self.conn: Connection | None = None
        self.image = None
        self.snapshot: str | None = None
        self.opts: dict[str, Any] = {}
        self._size: int | None = None
        self._image_ptr: int | None = None     # self.image as an address (ctypes hot path)
        self._comps: _Completions | None = None

    # --- open/close ----------------------------------------------------------------------
    def open(self, options: dict[str, Any]) -> None:
        opts = dict(options)
        fn = opts.pop("filename", None)
        if fn:
            parsed = parse_filename(fn)
            for k, v in parsed.items():
                opts.setdefault(k, v)
        for key in ("pool", "image"):
            if opts.get(key) is None:
                raise BlockError(f"Parameter '{key}' is missing")
        self.opts = opts
        self.snapshot = opts.get("snapshot") or None
        if self.snapshot is not None and not self.bs.read_only:
            # QEMU's bdrv_apply_auto_read_only: -drive (auto-read-only=on) switches to
            # read-only, a writable open without it (qemu-img) is refused.
            if opts.get("auto-read-only") not in (True, "on"):
                raise ImageOpenError("rbd snapshots are read-only")
            self.bs.read_only = True
        self.conn = Connection({**opts, "cache": not self.bs.cache_direct})
        ffi, lib = self.conn.ffi, self.conn.rbd
        img = ffi.new("rbd_image_t *")
        name = str(opts["image"])
        snap = self.snapshot.encode() if self.snapshot else ffi.NULL
        if self.bs.read_only:
            r = lib.rbd_open_read_only(self.conn.ioctx, name.encode(), img, snap)
        else:
            r = lib.rbd_open(self.conn.ioctx, name.encode(), img, snap)
        if r < 0:
            self.conn.close()
            self.conn = None
            raise ImageOpenError(f"error reading header from {name}: {_strerror(r)}")
        self.image = img[0]
        self.image_name = name
        self._image_ptr = int(ffi.cast("uintptr_t", self.image))
        try:
            self._comps = _Completions(self._image_ptr, f"rbd-{self.bs.node_name}-done")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        comps, self._comps = self._comps, None
        if comps is not None:
            comps.close()                         # completes every submitted request
        self._image_ptr = None
        if self.image is not None:
            self.conn.rbd.rbd_close(self.image)   # waits for librbd's outstanding aio
            self.image = None
        if comps is not None:
            comps.close_fd()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def json_filename(self) -> dict[str, Any]:
        """The node's options in the order QEMU's ``json:`` filename shows them
        (pool, image, conf, snapshot, driver, namespace, user; measured with qemu-img 7.2)."""
        d: dict[str, Any] = {"pool": self.opts["pool"], "image": self.opts["image"]}
        if self.opts.get("conf"):
            d["conf"] = self.opts["conf"]
        if self.snapshot:
            d["snapshot"] = self.snapshot
        d["driver"] = "rbd"
        d["namespace"] = self.opts.get("namespace") or ""
        if self.opts.get("user"):
            d["user"] = self.opts["user"]
        return d

    # --- asynchronous I/O ----------------------------------------------------------------
    def inline_completions(self) -> Callable[[], int]:
        """Switch this image to inline completions and return its ``wait()``: from now on
        callbacks run on the thread that calls it (it blocks, the GIL released, until librbd
        finished a request, then completes all that finished; returns at once when nothing
        is in flight).  For a loop that owns every request of the image (``emu-img bench``);
        the caller must keep calling it until its requests are done.  Synchronous requests
        still complete by themselves."""
        comps = self._comps
        if comps is None:
            raise BlockError(f"Node '{self.bs.node_name}' is closed")
        if comps._thread is not None:
            raise BlockError("rbd completions already run on their thread")
        comps.inline = True
        return comps.wait

    def aio_submit(self, op: str, offset: int = 0, length: int = 0, data: bytes | None = None,
                   callback: Callable[[int, bytes | None], None] | None = None) -> None:
        """Start ``op`` (``read``, ``write``, ``discard``, ``write_zeroes``, ``flush``) and return at once.

        :param callback: ``callback(ret, data)`` on the image's completion thread (or the
            inline poller, :meth:`inline_completions`); ``ret`` is librbd's return value
            (negative errno on failure), ``data`` the bytes read.  Requests complete in the
            order librbd finishes them.
        """
        comps = self._comps
        if self.image is None or comps is None:
            raise BlockError(f"Node '{self.bs.node_name}' is closed")
        comp = comps.c_void_p()
        if comps.create(None, None, comps.byref(comp)) < 0:
            raise RbdError("aio completion: out of memory", errno.ENOMEM)
        comp = comp.value
        inflight = comps.inflight
        if op == "read":
            # librbd fills the bytes object: the request's result as it is, never copied
            buf = bytes(length or 1) if length <= SMALL_READ else comps.new_bytes(None, length)
            inflight[comp] = (callback, buf, length)
            r = comps.read(comps.image, offset, length, id(buf) + _BYTES_DATA, comp)
        elif op == "write":
            assert data is not None
            if type(data) is not bytes:
                data = bytes(data)
            inflight[comp] = (callback, data, 0)        # data alive until completion
            r = comps.write(comps.image, offset, len(data), data, comp)
        else:
            inflight[comp] = (callback, None, 0)
            held = comps.held
            if op == "discard":
                r = held.rbd_aio_discard(comps.image, offset, length, comp)
            elif op == "write_zeroes":
                r = held.rbd_aio_write_zeroes(comps.image, offset, length, comp, 0, 0)
            elif op == "flush":
                r = held.rbd_aio_flush(comps.image, comp)
            else:
                r = -errno.EINVAL
        if r < 0:                   # librbd did not take it: no completion will come
            inflight.pop(comp, None)
            comps.held.rbd_aio_release(comp)
            raise RbdError(f"rbd aio {op} failed: {_strerror(r)}", -r)
        if comps._thread is None and not comps.inline:
            comps.start_thread()

    @staticmethod
    def aio_error(op: str, offset: int, ret: int) -> BlockError:
        """The error a failed :meth:`aio_submit` request completes with (``ret`` < 0), the
        same as the synchronous calls raise."""
        return RbdError(f"rbd {op} at {offset} failed: {_strerror(ret)}", -ret)

    def _wait(self, op: str, offset: int = 0, length: int = 0, data: bytes | None = None,
              buf: bytes | None = None) -> int:
        """Run ``op`` through librbd's aio and wait for it on this (worker) thread.

        ``rbd_aio_wait_for_complete`` blocks with the GIL released, so no other thread has
        to run for a synchronous request; the completion is released once the harvester
        (which gets it from librbd's event queue too) is done with it (:class:`_SyncWait`).
        :returns: librbd's return value (bytes read for a read).
        """
        comps = self._comps
        if self.image is None or comps is None:
            raise BlockError(f"Node '{self.bs.node_name}' is closed")
        held, released, _, _, c_void_p, byref = _fast()
        image = self._image_ptr
        comp = c_void_p()
        _check(held.rbd_aio_create_completion(None, None, byref(comp)), "aio completion")
        comp = comp.value
        sync = _SyncWait()
        comps.inflight[comp] = sync
        if op == "read":
            r = held.rbd_aio_read(image, offset, length, id(buf) + _BYTES_DATA, comp)
        elif op == "write":
            r = held.rbd_aio_write(image, offset, len(data), data, comp)
        elif op == "discard":
            r = held.rbd_aio_discard(image, offset, length, comp)
        elif op == "write_zeroes":
            r = held.rbd_aio_write_zeroes(image, offset, length, comp, 0, 0)
        elif op == "flush":
            r = held.rbd_aio_flush(image, comp)
        else:
            r = -errno.EINVAL
        if r < 0:
            comps.inflight.pop(comp, None)
            held.rbd_aio_release(comp)
        else:
            released.rbd_aio_wait_for_complete(comp)
            r = held.rbd_aio_get_return_value(comp)
            with _SyncWait.lock:
                sync.read = True
                if sync.popped:
                    held.rbd_aio_release(comp)
            if comps._thread is None:   # nobody else may reap soon: take it off the queue
                comps.reap()
        if r < 0:
            raise RbdError(f"rbd {op} at {offset} failed: {_strerror(r)}", -r)
        return r

    # --- BlockDriver ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The image size, asked of librbd once and after a resize or rollback of ours
        (QEMU keeps rbd's length in bs->total_sectors the same way: a resize by another
        client is not seen until then); every request's range check reads it."""
        n = self._size
        if n is None:
            ffi, lib = self.conn.ffi, self.conn.rbd
            out = ffi.new("uint64_t *")
            _check(lib.rbd_get_size(self.image, out), "error getting image size")
            n = self._size = int(out[0])
        return n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytes(length or 1) if length <= SMALL_READ else _fast()[2](None, length)  # librbd fills it
        n = self._wait("read", offset, length, buf=buf)
        if n >= length:
            return buf if length else b""
        return buf[:n] + bytes(length - n)

    def write(self, offset: int, data: bytes) -> None:
        self._wait("write", offset, len(data), data if type(data) is bytes else bytes(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._wait("write_zeroes", offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._wait("discard", offset, length)

    def flush(self) -> None:
        if self.image is not None and not self.bs.read_only:
            self._wait("flush")

    def truncate(self, size: int) -> None:
        if self.snapshot:
            raise BlockError("Cannot resize a read-only snapshot")
        self._size = None
        _check(self.conn.rbd.rbd_resize(self.image, size), "failed to resize rbd image")

    def actual_size(self) -> int:
        return 0

    @property
    def cluster_size(self) -> int:
        """The RBD object size (QEMU reports it as the cluster size)."""
        ffi, lib = self.conn.ffi, self.conn.rbd
        st = ffi.new("rbd_image_info_t *")
        if lib.rbd_stat(self.image, st, ffi.sizeof("rbd_image_info_t")) < 0 or not st.obj_size:
            return RBD_DEFAULT_OBJECT_SIZE
        return int(st.obj_size)

    def info_specific(self) -> dict:
        """QEMU 7.2's ImageInfoSpecificRbd: ``{"type": "rbd", "data": {}}``, with
        ``encryption-format`` when the image starts with a LUKS/LUKS2 header (as QEMU probes)."""
        data: dict[str, Any] = {}
        if self.size >= len(_LUKS_MAGIC) + 2:
            head = self.read(0, len(_LUKS_MAGIC) + 2)
            if head.startswith(_LUKS_MAGIC):
                fmt = {b"\x00\x01": "luks", b"\x00\x02": "luks2"}.get(head[len(_LUKS_MAGIC):])
                if fmt:
                    data["encryption-format"] = fmt
        return {"type": "rbd", "data": data}

    # --- snapshots (QEMU: id = name, no dates, vm-state-size = image size) ---------------
    def _snaps(self) -> list[tuple[str, int]]:
        ffi, lib = self.conn.ffi, self.conn.rbd
        cap = 16
        while True:
            maxp = ffi.new("int *", cap)
            arr = ffi.new("rbd_snap_info_t[]", cap)
            r = lib.rbd_snap_list(self.image, arr, maxp)
            if r == -errno.ERANGE:
                cap = max(maxp[0], cap * 2)
                continue
            _check(r, "error listing snapshots")
            out = [(ffi.string(arr[i].name).decode(), int(arr[i].size)) for i in range(r)]
            lib.rbd_snap_list_end(arr)
            return out

    def snapshot_list(self) -> list[dict]:
        return [{"icount": 0, "vm-clock-nsec": 0, "name": name, "date-sec": 0, "date-nsec": 0,
                 "vm-clock-sec": 0, "id": name, "vm-state-size": size}
                for name, size in self._snaps()]

    def snapshot_create(self, name: str, vm_clock_ns: int = 0, date: float | None = None,
                        vm_state_size: int = 0, snapshot_id: str | None = None,
                        icount: int | None = None) -> dict:
        """Create RBD snapshot ``name``; ids are refused (QEMU's qemu_rbd_snap_create)."""
        if snapshot_id and snapshot_id != name:
            raise RbdError("rbd snapshot id should be empty or equal to snapshot name",
                           errno.EINVAL)
        if not name:
            raise RbdError("rbd snapshot name must not be empty", errno.EINVAL)
        if len(name.encode()) >= RBD_SNAP_ID_MAX:
            raise RbdError("rbd snapshot name too long", errno.ERANGE)
        r = self.conn.rbd.rbd_snap_create(self.image, name.encode())
        if r < 0:
            raise RbdError(f"failed to create snap: {_strerror(r)}", -r)
        for sn in self.snapshot_list():
            if sn["name"] == name:
                return sn
        raise RbdError(f"snapshot '{name}' vanished after creation", errno.ENOENT)

    def snapshot_delete(self, snapshot_id: str | None = None, name: str | None = None) -> dict:
        """Delete RBD snapshot ``name`` (an id must equal the name, QEMU's qemu_rbd_snap_remove)."""
        target = name or snapshot_id
        if not target:
            raise RbdError("rbd need a valid snapshot name", errno.EINVAL)
        if snapshot_id and snapshot_id != target:
            raise RbdError("rbd do not support snapshot id, it should be NULL or equal to "
                           "snapshot name", errno.EINVAL)
        found = [sn for sn in self.snapshot_list() if sn["name"] == target]
        if not found:
            raise RbdError(f"Snapshot '{target}' not found", errno.ENOENT)
        _check(self.conn.rbd.rbd_snap_remove(self.image, target.encode()), "Failed to remove the snapshot")
        return found[0]

    def snapshot_goto(self, id_or_name: str) -> dict:
        """Roll the image back to snapshot ``id_or_name`` (RBD rollback)."""
        found = [sn for sn in self.snapshot_list() if sn["name"] == id_or_name]
        if not found:
            raise RbdError(f"Snapshot '{id_or_name}' not found", errno.ENOENT)
        self._size = None                   # the rollback takes the snapshot's size
        _check(self.conn.rbd.rbd_snap_rollback(self.image, id_or_name.encode()),
               f"Failed to roll back to snapshot '{id_or_name}'")
        return found[0]


def is_rbd_filename(filename: str) -> bool:
    """Whether ``filename`` is QEMU's legacy ``rbd:`` syntax."""
    return filename.startswith("rbd:")


def open_image(graph, filename: str, *, read_only: bool = False, node_name: str | None = None,
               auto_read_only: bool = True):
    """Open a legacy ``rbd:`` filename as QEMU does: a ``raw`` format node on an ``rbd`` node.

    Both nodes get QEMU's ``json:`` filenames (an RBD node has no plain filename).  Until the
    block graph routes ``rbd:`` filenames itself (see the report to node.py's owner), emu-img
    and tests open RBD images through here.

    :param auto_read_only: ``@snap`` opens read-only (``-drive``); ``False`` refuses a
        writable open of a snapshot as qemu-img does.
    :raises ImageOpenError: QEMU's texts (cluster, pool, image missing).
    """
    import json
    proto = graph.open_protocol(filename, driver="rbd", read_only=read_only,
                                extra={"auto-read-only": auto_read_only})
    try:
        spec = proto.impl.json_filename()
        proto.filename = "json:" + json.dumps(spec)
        bs = graph.blockdev_add({"driver": "raw", "file": proto.node_name, "node-name": node_name,
                                 "read-only": proto.read_only} if node_name else
                                {"driver": "raw", "file": proto.node_name, "read-only": proto.read_only})
    except BaseException:
        graph.remove(proto)
        raise
    proto.auto = True
    bs.filename = "json:" + json.dumps({"driver": "raw", "file": spec})
    return bs


def open_protocol_node(graph, filename: str, *, read_only: bool = False,
                       auto_read_only: bool = False, node_name: str | None = None):
    """Open a legacy ``rbd:`` filename as an ``rbd`` node alone (``-f rbd``), named by
    QEMU's ``json:`` form of its options."""
    import json
    proto = graph.open_protocol(filename, driver="rbd", read_only=read_only, node_name=node_name,
                                extra={"auto-read-only": auto_read_only})
    proto.filename = "json:" + json.dumps(proto.impl.json_filename())
    return proto


def snapshot_node(bs):
    """The node whose snapshots ``bs`` shows: ``bs`` itself, or (QEMU's bdrv_snapshot
    fallback) its ``file`` child when ``bs`` is a format without snapshots, e.g. raw on rbd."""
    while not bs.supports_snapshots and bs.file is not None and bs.impl.format_name == "raw":
        bs = bs.file
    return bs


def create_image(filename_or_opts: str | dict[str, Any], size: int) -> None:
    """Create an RBD image named by a legacy ``rbd:`` filename or blockdev options (emu-img create).

    :raises ImageOpenError: cluster or pool missing (QEMU's texts).
    :raises BlockError: the image exists or cannot be created.
    """
    opts = parse_filename(filename_or_opts) if isinstance(filename_or_opts, str) else dict(filename_or_opts)
    conn = Connection(opts)
    try:
        conn.create_image(str(opts["image"]), size)
    finally:
        conn.close()

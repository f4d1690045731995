"""Issue 6 item 7, faults on a real cluster.

* A stopped OSD (SIGSTOP to the test cluster's ceph-osd) while the guest's disk writes: with
  librbd's defaults (``rados_osd_op_timeout`` = 0, as QEMU runs it) the request *waits*; nothing
  acknowledged is lost and the write completes once the OSD runs again.  With
  ``:rados_osd_op_timeout=N`` the request fails with ETIMEDOUT after N s, the I/O error the
  guest's device reports (qemu-io shows QEMU's text for the same setting).  Other disks keep
  working meanwhile.
* cephx: a wrong keyring, a missing keyring, an unknown user give qemu-img's texts; the
  monitor's blockdev-add fails cleanly and the other disks keep working.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

import rbd_ceph_cluster
from conftest import SocketLines
from emu.block.api import BlockBackend
from emu.block.drivers import rbd
from emu.block.node import BlockGraph
from emu.cli import parse_args
from emu.machine.drives import open_drives
from emu.machine.pc import Machine
from emu.qmp.commands import CommandContext, load_all
from emu.qmp.protocol import dispatch

ceph_conf = rbd_ceph_cluster.ceph_conf_fixture()
SCRIPT = rbd_ceph_cluster.SCRIPT
MiB = 1 << 20


def _qemu_has_rbd() -> bool:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        return False
    return " rbd" in subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout


def _clean(text: str) -> str:
    # librbd's own log lines (timestamps) are not the tool's output
    return "\n".join(ln for ln in text.splitlines() if not re.match(r"^\d{4}-\d\d-\d\dT", ln))


# --- a stopped OSD ---------------------------------------------------------------------------
class StoppedOsd:
    """SIGSTOP the cluster's OSD (checked to be ours by its cmdline), SIGCONT on exit."""

    def __init__(self, conf: str) -> None:
        pidfile = next((Path(conf).parent / "pids").glob("osd.*.pid"))
        self.pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "ceph-osd" in cmdline and conf in cmdline, cmdline

    def __enter__(self) -> "StoppedOsd":
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _image(conf: str, size: str = "8M") -> str:
    name = "f" + uuid.uuid4().hex[:10]
    subprocess.run(["rbd", "-c", conf, "create", "--size", size, f"rbd/{name}"], check=True,
                   capture_output=True, timeout=60)
    return name


class _Done:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.result = None

    def __call__(self, result) -> None:
        self.result = result
        self.event.set()


def test_stopped_osd_request_waits_and_nothing_acknowledged_is_lost(ceph_conf, tmp_path):
    name = _image(ceph_conf)
    g = BlockGraph()
    bs = rbd.open_image(g, f"rbd:rbd/{name}:conf={ceph_conf}")
    blk = BlockBackend(bs, "rbd0")
    local = g.open_image(str(_raw(tmp_path)), "raw")
    try:
        blk.write(0, b"\xaa" * MiB)
        blk.flush()                                   # acknowledged and durable
        with StoppedOsd(ceph_conf):
            wrote, flushed = _Done(), _Done()
            blk.aio_write(MiB, b"\xbb" * 65536, wrote)
            blk.aio_flush(flushed)
            # Other disks keep working while the RBD request waits.
            local.write(4096, b"\x5a" * 4096)
            assert local.read(4096, 4096) == b"\x5a" * 4096
            # librbd has no reply from the OSD: the flush cannot have completed (QEMU's
            # default: no rados_osd_op_timeout, the request waits).
            assert not flushed.event.wait(1.5)
        assert flushed.event.wait(120) and wrote.event.wait(120)
        assert flushed.result is None and wrote.result is None, (wrote.result, flushed.result)
        assert blk.read(0, MiB) == b"\xaa" * MiB
        assert blk.read(MiB, 65536) == b"\xbb" * 65536
    finally:
        blk.close()
        g.close_all()
    out = subprocess.run(["rbd", "-c", ceph_conf, "export", f"rbd/{name}", "-"], capture_output=True,
                         check=True, timeout=60).stdout
    assert out[:MiB] == b"\xaa" * MiB and out[MiB:MiB + 65536] == b"\xbb" * 65536


def _raw(tmp_path: Path) -> Path:
    p = tmp_path / "local.raw"
    p.write_bytes(bytes(MiB))
    return p


def test_stopped_osd_with_op_timeout_is_an_io_error(ceph_conf):
    name = _image(ceph_conf)
    fn = f"rbd:rbd/{name}:conf={ceph_conf}:rados_osd_op_timeout=2"
    g = BlockGraph()
    bs = rbd.open_image(g, fn)
    blk = BlockBackend(bs, "rbd0")
    try:
        blk.write(0, b"\x11" * 4096)
        blk.flush()
        with StoppedOsd(ceph_conf):
            done, flushed = _Done(), _Done()
            blk.aio_write(0, b"\x22" * 4096, done)
            blk.aio_flush(flushed)
            assert done.event.wait(60) and flushed.event.wait(60)
            # librbd's write-around cache may acknowledge the write at once; the flush
            # then carries the timeout (a guest sees its FLUSH fail).
            errs = [r for r in (done.result, flushed.result) if r is not None]
            assert errs, "a write or flush to a stopped OSD with an op timeout must fail"
            assert all(getattr(e, "errno", None) == errno.ETIMEDOUT for e in errs), errs
            if _qemu_has_rbd():
                q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", "-c", "flush", fn],
                                   capture_output=True, text=True, timeout=120)
                assert "Connection timed out" in q.stdout + q.stderr, q.stdout + q.stderr
    finally:
        blk.close()
        g.close_all()


# --- cephx -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cephx_conf():
    reason = rbd_ceph_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    base = tempfile.mkdtemp(prefix="emu-cephx-")
    d = str(Path(base) / "cluster")
    watchdog = rbd_ceph_cluster._watchdog(d)    # stops it if pytest is killed outright
    try:
        r = subprocess.run([str(SCRIPT), "start", d], capture_output=True, text=True, timeout=180,
                           env=dict(os.environ, AUTH="cephx"))
        assert r.returncode == 0, r.stderr[-2000:]
        yield r.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SCRIPT), "stop", d], timeout=60, check=False)   # stops by pid
        shutil.rmtree(base, ignore_errors=True)
        watchdog.kill()
        watchdog.wait()


@pytest.fixture(scope="module")
def cephx_image(cephx_conf, tmp_path_factory):
    name = "cx" + uuid.uuid4().hex[:8]
    subprocess.run(["rbd", "-c", cephx_conf, "create", "--size", "4M", f"rbd/{name}"], check=True,
                   capture_output=True, timeout=60)
    bad = tmp_path_factory.mktemp("keys") / "bad.keyring"
    subprocess.run(["ceph-authtool", "--create-keyring", str(bad), "--gen-key", "-n", "client.admin"],
                   check=True, capture_output=True, timeout=60)
    return name, str(bad)


@pytest.mark.parametrize("suffix,text", [
    (":keyring={bad}", "error connecting: Permission denied"),
    (":keyring=/nonexistent.keyring", "error connecting: No such file or directory"),
    (":id=nobody", "error connecting: Permission denied"),
])
def test_cephx_errors_as_qemu(cephx_conf, cephx_image, suffix, text):
    import sys
    name, bad = cephx_image
    fn = f"rbd:rbd/{name}:conf={cephx_conf}" + suffix.format(bad=bad)
    e = subprocess.run([sys.executable, "-m", "emu.img", "info", fn], capture_output=True, text=True, timeout=120)
    assert e.returncode == 1
    assert _clean(e.stderr) == f"emu-img: Could not open '{fn}': {text}"
    if _qemu_has_rbd():
        q = subprocess.run(["qemu-img", "info", fn], capture_output=True, text=True, timeout=120)
        assert (q.returncode, _clean(q.stderr).replace("qemu-img:", "emu-img:")) == (1, _clean(e.stderr))
    # the right key opens it
    g = BlockGraph()
    try:
        assert rbd.open_image(g, f"rbd:rbd/{name}:conf={cephx_conf}", read_only=True).size == 4 * MiB
    finally:
        g.close_all()


class _S:
    negotiated = True
    oob_enabled = False


def test_cephx_blockdev_add_fails_cleanly_other_disks_work(cephx_conf, cephx_image, tmp_path):
    name, bad = cephx_image
    load_all()
    q = tmp_path / "local.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)
    cfg, _ = parse_args(["-S", "-drive", f"file={q},format=qcow2,if=none,id=local"])
    m = Machine(cfg)
    open_drives(m)
    badconf = tmp_path / "bad.conf"
    badconf.write_text(Path(cephx_conf).read_text().replace("[global]\n", f"[global]\nkeyring = {bad}\n", 1)
                       .replace(f"keyring = {Path(cephx_conf).parent}/keyring\n", ""))

    def run(cmd, **args):
        return dispatch({"execute": cmd, "arguments": args} if args else {"execute": cmd},
                        CommandContext(m, _S()), negotiated=True, oob_enabled=False)

    try:
        r = run("blockdev-add", **{"driver": "rbd", "node-name": "r0", "pool": "rbd", "image": name,
                                   "conf": str(badconf)})
        assert r["error"]["desc"] == "error connecting: Permission denied", r
        assert "r0" not in [n["node-name"] for n in run("query-named-block-nodes")["return"]]
        # the local disk is untouched and usable
        assert run("blockdev-snapshot-internal-sync", device="local", name="after") == {"return": {}}
        # the right key: the same blockdev-add works
        assert run("blockdev-add", **{"driver": "rbd", "node-name": "r0", "pool": "rbd", "image": name,
                                      "conf": cephx_conf}) == {"return": {}}
    finally:
        m.close()


# --- an unreachable cluster and the monitor ----------------------------------------------------
def test_unreachable_cluster_does_not_stop_other_monitor_clients(tmp_path):
    """blockdev-add of an rbd node whose cluster never answers blocks in rados_connect on the
    command thread; meanwhile a client of another QMP monitor still gets its greeting and
    inline answers (QEMU's main loop would stall every monitor), and the command ends with
    QEMU's text after client_mount_timeout.  (One monitor serves one client at a time, as a
    QEMU socket chardev does, so the second client uses a second -qmp.)"""
    import json
    import socket
    import sys
    import time
    reason = rbd_ceph_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))          # a port nobody listens on (bound, never listening)
    conf = tmp_path / "dead.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:{dead.getsockname()[1]}\nclient mount timeout = 4\n"
                    "auth client required = none\n")
    socks = [tmp_path / "qmp1.sock", tmp_path / "qmp2.sock"]
    p = subprocess.Popen([sys.executable, "-m", "emu", "-S", "-nodefaults", "-display", "none",
                          "-qmp", f"unix:{socks[0]},server=on,wait=off",
                          "-qmp", f"unix:{socks[1]},server=on,wait=off"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(sock):
        end = time.monotonic() + 60
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                break
            except OSError:
                s.close()
                assert p.poll() is None and time.monotonic() < end
                time.sleep(0.05)
        s.settimeout(60)                   # a regression fails instead of hanging the run
        f = SocketLines(s)
        assert "QMP" in json.loads(f.readline())
        f.write('{"execute": "qmp_capabilities"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        return s, f

    try:
        a_sock, a = client(socks[0])
        a.write(json.dumps({"execute": "blockdev-add", "arguments": {
            "driver": "rbd", "node-name": "r0", "pool": "rbd", "image": "x", "conf": str(conf)}}) + "\n")
        a.flush()
        time.sleep(0.5)                    # A is now inside rados_connect
        b_sock, b = client(socks[1])       # B: greeting and negotiation while A waits
        b.write('{"execute": "query-status"}\n')
        b.flush()
        assert json.loads(b.readline())["return"]["status"] == "prelaunch"
        rsp = json.loads(a.readline())     # A: QEMU's text once the mount timeout ran out
        assert rsp["error"]["desc"] == "error connecting: Connection timed out", rsp
        b.write('{"execute": "query-named-block-nodes"}\n')
        b.flush()
        assert json.loads(b.readline()) == {"return": []}
        a_sock.close()
        b_sock.close()
    finally:
        p.kill()
        p.wait(10)
        dead.close()

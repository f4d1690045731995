"""query-blockstats counters: the same operations on qemu-system-x86_64 (HMP qemu-io) and on
our BlockBackend give the same counts, bytes, failed/invalid numbers and wr_highest_offset."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

from conftest import requires_qemu_img, requires_qemu_system

from emu.block.api import BlockBackend
from emu.block.node import BlockGraph

EXACT = ("rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "flush_operations",
         "unmap_operations", "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged",
         "failed_rd_operations", "failed_wr_operations", "failed_flush_operations",
         "failed_unmap_operations", "invalid_rd_operations", "invalid_wr_operations",
         "invalid_flush_operations", "invalid_unmap_operations", "account_invalid", "account_failed")

# (qemu-io command, what the same request is for a BlockBackend)
SCRIPT = ["write 0 64k", "write -z 1M 64k", "read 0 4k", "aio_write 128k 4k", "aio_read 0 512",
          "aio_flush", "flush", "aio_write -i 0 512", "aio_read -i 0 512", "aio_read 8M 512"]


def _qemu_stats(path: str, tmp_path) -> tuple[dict, dict]:
    sock = str(tmp_path / "q.sock")
    p = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults",
                          "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off",
                          "-drive", f"file={path},format=qcow2,if=none,id=drive0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        s = socket.socket(socket.AF_UNIX)
        for _ in range(1000):
            try:
                s.connect(sock)
                break
            except OSError:
                time.sleep(0.01)
        f = s.makefile("rwb")
        f.readline()

        def cmd(name, **args):
            f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            f.flush()
            while True:
                m = json.loads(f.readline())
                if "event" not in m:
                    return m["return"]
        cmd("qmp_capabilities")
        for c in SCRIPT:
            cmd("human-monitor-command", **{"command-line": f'qemu-io drive0 "{c}"'})
        for _ in range(200):  # aio requests complete in the background
            st = cmd("query-blockstats")[0]
            if st["stats"]["failed_rd_operations"] and st["stats"]["flush_operations"]:
                break
            time.sleep(0.02)
        cmd("quit")
        return st["stats"], st["parent"]["stats"]
    finally:
        p.wait(30)


def _emu_stats(path: str) -> tuple[dict, dict]:
    g = BlockGraph()
    blk = BlockBackend(g.open_image(path), "drive0", workers=1)

    def aio(fn, *args, **kw):
        ev = threading.Event()
        fn(*args, lambda r: ev.set(), **kw)
        assert ev.wait(10)
    blk.write(0, b"\xcd" * 65536, account=False)      # qemu-io sync commands: not accounted
    blk.write_zeroes(1 << 20, 65536, account=False)
    blk.read(0, 4096, account=False)
    aio(blk.aio_write, 128 << 10, b"\xcd" * 4096)
    aio(blk.aio_read, 0, 512)
    aio(blk.aio_flush)
    blk.flush(account=False)
    blk.acct.invalid("wr")                             # aio_write -i / aio_read -i
    blk.acct.invalid("rd")
    blk.acct.failed(blk.acct.start("rd", 512))         # qemu-io submits past the end: EIO
    stats, file_stats = blk.stats, blk.root.file.stats
    blk.close()
    g.close_all()
    return stats, file_stats


@requires_qemu_img
@requires_qemu_system
def test_blockstats_match_qemu(tmp_path):
    a, b = str(tmp_path / "q.qcow2"), str(tmp_path / "e.qcow2")
    for p in (a, b):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p, "4M"], check=True)
    q, qfile = _qemu_stats(a, tmp_path)
    e, efile = _emu_stats(b)
    assert {k: e[k] for k in EXACT} == {k: q[k] for k in EXACT}
    assert ("idle_time_ns" in e) == ("idle_time_ns" in q)
    for k in ("rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns"):
        assert (e[k] > 0) == (q[k] > 0), k
    # Host offsets on the protocol node: the same file layout, the same highest write.
    assert efile["wr_highest_offset"] == qfile["wr_highest_offset"]

"""HMP ``qemu-io`` and query-blockstats, as QEMU 7.2 counts them: the synchronous
read/write/discard/flush are not accounted; aio_read/aio_write (not ``-z``) and aio_flush
are; ``-i`` is an invalid request; an aio request past the end is a failed one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import QmpProcess, requires_qemu_system
from emu.cli import parse_args
from emu.machine.drives import open_drives
from emu.machine.pc import Machine
from emu.qmp.commands import CommandContext, load_all
from emu.qmp.protocol import dispatch

SIZE = 64 << 20
SEQUENCE = ["write 0 64k", "write -z 1M 64k", "aio_write 128k 4k", "aio_write -z 2M 8k",
            "aio_write -i 0 4k", "aio_read -i 0 4k", "aio_flush", "aio_write 64M 4k",
            "aio_read 64M 512", "read 0 4k", "flush", "discard 0 64k", "aio_read 0 4k",
            "aio_write 513 512", "aio_read 513 512", "aio_write 63M 2M", "aio_write -q 8k 1k 1k"]
# what qemu-system-x86_64 7.2 reports after SEQUENCE (the test below re-checks it there)
EXPECTED = {"wr_operations": 3, "wr_bytes": 4096 + 512 + 2048, "failed_wr_operations": 2,
            "invalid_wr_operations": 1, "rd_operations": 2, "rd_bytes": 4096 + 512,
            "failed_rd_operations": 1, "invalid_rd_operations": 1, "flush_operations": 1,
            "failed_flush_operations": 0, "invalid_flush_operations": 0, "unmap_operations": 0,
            "unmap_bytes": 0, "failed_unmap_operations": 0, "invalid_unmap_operations": 0,
            "wr_highest_offset": (2 << 20) + 8192}


class _Session:
    negotiated = True
    oob_enabled = False


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if not k.endswith("_ns")}


def _raw(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def _emu_stats(img: Path, capfd: Any) -> dict[str, Any]:
    load_all()
    cfg, _ = parse_args(["-S", "-drive", f"file={img},format=raw,if=ide,id=d0"])
    m = Machine(cfg)
    open_drives(m)
    try:
        def run(cmd: str, **args: Any) -> Any:
            req: dict = {"execute": cmd}
            if args:
                req["arguments"] = args
            return dispatch(req, CommandContext(m, _Session()), negotiated=True, oob_enabled=False)

        for c in SEQUENCE:
            assert run("human-monitor-command", **{"command-line": f'qemu-io d0 "{c}"'}) == {"return": ""}
        return _counters(run("query-blockstats")["return"][0]["stats"])
    finally:
        m.close()


def test_qmp_hmp_qemu_io_accounting(tmp_path: Path, capfd: Any) -> None:
    stats = _emu_stats(_raw(tmp_path / "d.raw"), capfd)
    assert {k: stats[k] for k in EXPECTED} == EXPECTED
    out = capfd.readouterr().out
    # refused requests are reported on stdout, like QEMU's qemu-io (whose aio_read
    # reports a failure as "readv failed")
    assert out.count("aio_write failed") == 2 and out.count("readv failed") == 1


def test_qmp_hmp_qemu_io_malformed(tmp_path: Path, capfd: Any) -> None:
    load_all()
    cfg, _ = parse_args(["-S", "-drive", f"file={_raw(tmp_path / 'd.raw')},format=raw,if=ide,id=d0"])
    m = Machine(cfg)
    open_drives(m)
    try:
        for c in ("aio_write", "aio_write 0", "aio_read -i", "aio_write x 4k"):
            req = {"execute": "human-monitor-command",
                   "arguments": {"command-line": f'qemu-io d0 "{c}"'}}
            assert dispatch(req, CommandContext(m, _Session()), negotiated=True,
                            oob_enabled=False) == {"return": ""}
        blk = m.find_block_device("d0").backend
        assert _counters(blk.stats)["wr_operations"] == 0
    finally:
        m.close()
    # QEMU 7.2's texts: argument counts on stderr, a bad number on stdout
    cap = capfd.readouterr()
    assert cap.err.count("bad argument count 1 to aio_") == 2
    assert "bad argument count 0 to aio_write, expected at least 2 arguments" in cap.err
    assert ("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x"
            in cap.out)


def _qemu_stats(img: Path, tmp_path: Path) -> dict[str, Any]:
    with QmpProcess(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-display", "none",
                     "-nodefaults", "-S", "-drive", f"file={img},format=raw,if=ide,id=d0"],
                    tmp_path / "q.sock") as q:
        def ex(cmd: str, **args: Any) -> Any:
            return q.cmd(cmd, args)["return"]

        ex("qmp_capabilities")
        for c in SEQUENCE:
            ex("human-monitor-command", **{"command-line": f'qemu-io d0 "{c}"'})
        # aio requests complete in QEMU's main loop: wait until the counters settle
        prev = None
        for _ in range(50):
            cur = _counters(ex("query-blockstats")[0]["stats"])
            if cur == prev:
                break
            prev = cur
            time.sleep(0.05)
        return cur


@requires_qemu_system
def test_qmp_hmp_qemu_io_accounting_matches_qemu(tmp_path: Path, capfd: Any) -> None:
    want = _qemu_stats(_raw(tmp_path / "q.raw"), tmp_path)
    got = _emu_stats(_raw(tmp_path / "e.raw"), capfd)
    assert {k: want[k] for k in EXPECTED} == EXPECTED
    assert got == want

"""x-emu-query-cuts on a real emu process (qemu.qmp client), and the emu-oracle command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import REPO
from emu.block.qcow2.create import create_qcow2
from emu.oracle.cli import cut_from_report, main, query_cuts

from oracle_sim import Sim


def _connect(path: str) -> QEMUMonitorProtocol:
    end = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.05)
    while True:
        qmp = QEMUMonitorProtocol(path)
        try:
            qmp.connect(negotiate=True)
            return qmp
        except (OSError, ConnectError):  # the socket appears when emu is up
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_oracle_x_emu_query_cuts_over_qmp(tmp_path) -> None:
    img = tmp_path / "d.qcow2"
    create_qcow2(str(img), "1M")
    sock = str(tmp_path / "qmp.sock")
    p = subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-display", "none", "-S",
                          "-drive", f"file={img},format=qcow2,if=none,id=d0",
                          "-qmp", f"unix:{sock},server=on,wait=off",
                          "-qmp", f"unix:{sock}2,server=on,wait=off"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = _connect(sock)
        assert qmp.cmd_raw("x-emu-query-cuts") == {"return": []}
        for name in ("a", "b"):
            assert qmp.cmd_raw("blockdev-snapshot-internal-sync", {"device": "d0", "name": name}) == {"return": {}}
        cuts = qmp.cmd_raw("x-emu-query-cuts")["return"]
        assert [c["id"] for c in cuts] == [1, 2]
        assert [c["command"] for c in cuts] == ["blockdev-snapshot-internal-sync"] * 2
        c = cuts[-1]
        assert set(c) == {"id", "command", "timestamp", "vm-clock-ns", "devices"}
        dev = c["devices"][0]
        assert dev["device"] == "d0" and dev["in-flight"] == 0 and dev["node-name"]
        assert dev["accounted"] is True and dev["wr_operations"] == 0 and dev["flush_operations"] == 0
        assert query_cuts(sock + "2") == cuts          # emu-oracle --qmp's client
        assert cut_from_report(cuts, 2, {"d0": "ide"}) == {"ide": 0}
        assert qmp.cmd_raw("x-emu-query-cuts", {"since": 1})["return"] == [c]
        assert qmp.cmd_raw("x-emu-query-cuts", {"limit": 1})["return"] == [c]
        err = qmp.cmd_raw("x-emu-query-cuts", {"limit": 0})["error"]
        assert err == {"class": "GenericError", "desc": "Parameter 'limit' expects a positive number"}
        err = qmp.cmd_raw("x-emu-query-cuts", {"since": "x"})["error"]
        assert err["desc"] == "Invalid parameter type for 'since', expected: integer"
        try:
            qmp.cmd_raw("quit")
            qmp.close()
        except EOFError:  # the process may end before the client has read everything
            pass
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_oracle_cli_cut_report_and_inference(tmp_path, capsys) -> None:
    sim = Sim()
    log = tmp_path / "serial.txt"
    log.write_text(sim.text())
    paths = {}
    for d in ("ide", "vd"):
        paths[d] = tmp_path / f"{d}.raw"
        paths[d].write_bytes(bytes(sim.image(d, 15)))
    disks = ["--disk", f"ide={paths['ide']},format=raw", "--disk", f"vd={paths['vd']}"]
    assert main(["--log", str(log), *disks, "--cut", "ide=8,vd=7"]) == 0
    out = capsys.readouterr().out
    assert "OK: 0 violations" in out and "ide " in out
    assert main(["--log", str(log), *disks]) == 0                      # inferred
    assert "inferred" in capsys.readouterr().out
    assert main(["--log", str(log), *disks, "--cut", "ide=8,vd=8"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION missing: vd lba 2055: expected seq 16 gen 1; found zeros" in out
    report = {"return": [{"id": 7, "command": "transaction", "devices": [
        {"device": "ide0-hd0", "accounted": True, "wr_operations": 8},
        {"device": "virtio0", "accounted": True, "wr_operations": 7},
        {"device": "floppy", "accounted": True, "wr_operations": 3}]}]}
    cuts = tmp_path / "cuts.json"
    cuts.write_text(json.dumps(report))
    assert main(["--log", str(log), *disks, "--cuts", str(cuts), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["disks"]["vd"]["cut"] == 7 and verdict["violations"] == []
    assert main(["--log", str(log), *disks, "--cuts", str(cuts), "--cut-id", "3"]) == 2
    assert "no cut with id 3 (have 7)" in capsys.readouterr().err
    assert cut_from_report(report, 7, {"floppy": "vd"})["vd"] == 3
    # bad input: a clear message, status 2, no traceback
    for bad in (["--disk", "sda=x"], ["--disk", f"ide={tmp_path}/none.qcow2"],
                ["--disk", f"ide={paths['ide']}", "--cut", "ide=x"]):
        assert main(["--log", str(log), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("emu-oracle: ") and "Traceback" not in err
    # an overlay's "Formatting ..." line printed by the emulator in the middle of a guest line
    text = sim.text().replace("C vd 8\r\n", "C v" + "Formatting 'o.qcow2', fmt=qcow2 size=1\n" + "d 8\r\n")
    log.write_text(text)
    assert main(["--log", str(log), *disks, "--cut", "ide=8,vd=7"]) == 0
    capsys.readouterr()
    (tmp_path / "junk.txt").write_text("no guest here\n")
    assert main(["--log", str(tmp_path / "junk.txt"), *disks]) == 2
    assert "no 'S hello' line" in capsys.readouterr().err


def test_oracle_cli_runs_as_module(tmp_path) -> None:
    sim = Sim(writes_per_disk=3)
    (tmp_path / "s.txt").write_text(sim.text())
    (tmp_path / "i.raw").write_bytes(bytes(sim.image("ide", 6)))
    r = subprocess.run([sys.executable, "-m", "emu.oracle", "--log", str(tmp_path / "s.txt"),
                        "--disk", f"ide={tmp_path / 'i.raw'}", "--cut", "ide=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "OK: 0 violations"

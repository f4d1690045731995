"""The unmodified qmp-shell of the qemu.qmp package drives emu (through pexpect)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

pexpect = pytest.importorskip("pexpect")

#: qemu.qmp's console script, looked up beside this interpreter first: README's test command
#: runs `.venv/bin/python -m pytest`, which does not put .venv/bin on PATH.
QMP_SHELL = shutil.which("qmp-shell", path=os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


@pytest.mark.skipif(QMP_SHELL is None, reason="qmp-shell is not installed")
def test_qmp_shell_session(tmp_path) -> None:
    sock = str(tmp_path / "q.sock")
    p = subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-display", "none", "-S",
                          "-qmp", f"unix:{sock},server=on,wait=off"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        sh = pexpect.spawn(QMP_SHELL, [sock], encoding="utf-8", timeout=20)
        sh.expect(r"\(QEMU\) ")
        sh.sendline("query-status")
        sh.expect(r'"status": "prelaunch"')
        sh.expect(r"\(QEMU\) ")
        sh.sendline("blockdev-snapshot-internal-sync device=nodev name=x")
        sh.expect(r"Cannot find device='nodev' nor node-name='nodev'")
        sh.expect(r"\(QEMU\) ")
        sh.sendline("cont")
        sh.expect(r'"return": \{\}')
        sh.expect(r"\(QEMU\) ")
        sh.sendline("query-status")
        sh.expect(r'"status": "running"')
        sh.sendline("quit")
        assert p.wait(20) == 0
        sh.close()
    finally:
        p.kill()
        p.wait()

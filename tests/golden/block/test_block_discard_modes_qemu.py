"""``-drive discard=ignore|unmap`` and ``detect-zeroes`` side by side with qemu-system-x86_64 7.2.

A discard through the drive's device-facing BlockBackend (HMP ``qemu-io`` on the drive, which in
QEMU goes through the same BlockBackend as the guest device's requests; QMP also checks the
virtio-blk device is there) succeeds with discard=ignore (the default) but leaves the data in
place, and with discard=unmap frees it; ``qemu-img map`` and the image content afterwards are
the same as QEMU's, on raw and qcow2.  Bad values are refused with QEMU's texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, QmpProcess, requires_qemu_img, requires_qemu_io, requires_qemu_system

pytestmark = [requires_qemu_img, requires_qemu_io, requires_qemu_system]

KiB = 1024
HMP = ['qemu-io d0 "discard 64k 128k"', 'qemu-io d0 "aio_discard 320k 64k"', 'qemu-io d0 "aio_flush"',
       'qemu-io d0 "write -z 448k 64k"', 'qemu-io d0 "write -P 0 576k 64k"', 'qemu-io d0 "flush"']


def _image(path: Path, fmt: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0xaa 0 1M", str(path)], check=True,
                   capture_output=True)


def _session(argv0: list[str], w: Path, drive: str) -> list:
    replies = []
    with QmpProcess(argv0 + ["-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none",
                             "-S", "-drive", drive, "-device", "virtio-blk-pci,drive=d0,id=vdev"],
                    w / "qmp.sock", cwd=w) as q:
        q.cmd("qmp_capabilities")
        for line in HMP:
            replies.append(q.cmd("human-monitor-command", {"command-line": line}))
        blk = q.cmd("query-block")["return"][0]
        replies.append((blk["qdev"], blk["inserted"]["detect_zeroes"]))
    return replies


def _state(path: Path, fmt: str) -> tuple[list, bytes]:
    m = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(path)], check=True,
                       capture_output=True, text=True).stdout
    runs = [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(m)]
    raw = path.with_suffix(".dump")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    return runs, raw.read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("opts", ["", ",discard=ignore", ",discard=unmap", ",discard=on",
                                  ",discard=unmap,detect-zeroes=unmap", ",detect-zeroes=on"])
def test_discard_through_the_drive_matches_qemu(tmp_path: Path, fmt: str, opts: str) -> None:
    results = {}
    for who, argv0 in (("qemu", ["qemu-system-x86_64"]), ("emu", [sys.executable, "-m", "emu"])):
        w = tmp_path / who
        w.mkdir()
        img = w / f"d.{fmt}"
        _image(img, fmt)
        replies = _session(argv0, w, f"file={img},format={fmt},if=none,id=d0{opts}")
        results[who] = (replies, *_state(img, fmt))
    (q_replies, q_map, q_data), (e_replies, e_map, e_data) = results["qemu"], results["emu"]
    assert e_replies == q_replies
    assert e_data == q_data
    unmap = "discard=unmap" in opts or "discard=on" in opts
    assert (q_data[64 * KiB:192 * KiB] == bytes(128 * KiB)) is unmap      # what QEMU does...
    assert q_data[:64 * KiB] == b"\xaa" * (64 * KiB)
    assert e_map == q_map      # ...and emu the same (qcow2 v3: discarded clusters become zero clusters)


@pytest.mark.parametrize("opt,text", [
    ("-drive file={img},format=raw,if=none,id=d0,discard=bogus", "Invalid discard option"),
    ("-drive file={img},format=raw,if=none,id=d0,detect-zeroes=bogus", "invalid parameter value: bogus"),
    ("-blockdev driver=raw,node-name=n0,file.driver=file,file.filename={img},discard=on",
     "Parameter 'discard' does not accept value 'on'"),
    ("-blockdev driver=raw,node-name=n0,file.driver=file,file.filename={img},detect-zeroes=x",
     "Parameter 'detect-zeroes' does not accept value 'x'"),
    ("-blockdev driver=raw,node-name=n0,file.driver=file,file.filename={img},detect-zeroes=unmap",
     "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
])
def test_bad_discard_options_are_refused_as_qemu(tmp_path: Path, opt: str, text: str) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(64 * KiB))
    option, spec = opt.format(img=img).split(" ", 1)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outs = []
    for argv0 in (["qemu-system-x86_64"], [sys.executable, "-m", "emu"]):
        r = subprocess.run(argv0 + ["-machine", "pc,accel=tcg", "-nodefaults", "-display", "none",
                                    "-S", option, spec], capture_output=True, text=True, env=env,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 1
        outs.append(r.stderr.strip().splitlines()[-1].split(": ", 1)[1])
    assert outs[0] == outs[1] == f"{option} {spec}: {text}"

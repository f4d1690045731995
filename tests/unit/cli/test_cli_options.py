"""The command line: QEMU's option syntax, naming, messages and exit status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, requires_qemu_img, requires_qemu_system
from emu.cli import OptionError, parse_args, parse_keyval, parse_qemu_opts, progname


def fails(argv: list[str]) -> str:
    """The error text with the program name (``emu`` under ``python -m pytest``, ``pytest``
    under the pytest script) as ``PROG``."""
    with pytest.raises(OptionError) as ei:
        parse_args(argv)
    prog = progname() + ": "
    return "\n".join("PROG: " + line[len(prog):] if line.startswith(prog) else line
                     for line in ei.value.render().split("\n"))


def test_qemu_opts_syntax() -> None:
    assert parse_qemu_opts("socket,id=a,path=/x,,y,server=on", "backend") == [
        ("backend", "socket"), ("id", "a"), ("path", "/x,y"), ("server", "on")]
    assert parse_qemu_opts("unix:/p,server,nowait", "x")[1:] == [("server", "on"), ("wait", "off")]
    assert parse_keyval("driver=qcow2,node-name=n,file.driver=file,file.filename=/a") == {
        "driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/a"}}


def test_corpus_command_line_names_and_qdev_paths() -> None:
    w = "/w"
    cfg, _ = parse_args([
        "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
        "-chardev", f"socket,id=qmp0,path={w}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-drive", f"file={w}/ide.qcow2,format=qcow2,if=ide",
        "-drive", f"file={w}/virtio.qcow2,format=qcow2,if=virtio",
        "-drive", f"file={w}/none.qcow2,format=qcow2,if=none,id=drv2,node-name=fmt2",
        "-device", "virtio-blk-pci,drive=drv2,id=vblk2",
        "-drive", f"file={w}/raw.img,format=raw,if=virtio"])
    assert cfg.memory_mib == 64 and cfg.start_paused and cfg.accel == "tcg"
    assert [d.id for d in cfg.drives] == ["ide0-hd0", "virtio0", "drv2", "virtio1"]
    assert cfg.drives[2].node_name == "fmt2"
    paths = {d.props["drive"]: d.qdev_path for d in cfg.devices}
    assert paths == {"ide0-hd0": "/machine/unattached/device[18]",
                     "virtio0": "/machine/peripheral-anon/device[0]/virtio-backend",
                     "drv2": "/machine/peripheral/vblk2/virtio-backend",
                     "virtio1": "/machine/peripheral-anon/device[1]/virtio-backend"}
    assert cfg.monitors[0].chardev == "qmp0" and cfg.chardevs[0].options["server"] == "on"


def test_drive_naming_rules() -> None:
    cfg, _ = parse_args(["-drive", "file=a", "-drive", "file=b", "-drive", "file=c",
                         "-drive", "file=d,media=cdrom", "-drive", "file=e,if=virtio,index=3",
                         "-drive", "file=f,if=none"])
    assert [d.id for d in cfg.drives] == ["ide0-hd0", "ide0-hd1", "ide1-hd0", "ide1-cd1",
                                          "virtio3", "none0"]
    assert cfg.drives[3].readonly


@pytest.mark.parametrize("argv, msg", [
    (["-foo"], "PROG: -foo: invalid option"),
    (["--foo"], "PROG: --foo: invalid option"),
    (["-m"], "PROG: -m: requires an argument"),
    (["-m", "64X"], "PROG: -m 64X: Parameter 'size' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                    "and exabytes, respectively."),
    (["-drive", "if=bogus,file=x"], "PROG: -drive if=bogus,file=x: unsupported bus type 'bogus'"),
    (["-machine", "bogus"], "PROG: unsupported machine type\nUse -machine help to list supported machines"),
    (["-chardev", "bogus,id=a"], "PROG: -chardev bogus,id=a: 'bogus' is not a valid char driver name"),
    (["-chardev", "socket,path=/tmp/a"], "PROG: -chardev socket,path=/tmp/a: chardev: no id specified"),
    (["-chardev", "null,id=a", "-chardev", "null,id=a"],
     "PROG: -chardev null,id=a: Duplicate ID 'a' for chardev"),
    (["-mon", "chardev=nope,mode=control"],
     "PROG: -mon chardev=nope,mode=control: chardev \"nope\" not found"),
    (["-qmp", "bogus"], "PROG: -qmp bogus: 'bogus' is not a valid char driver\n"
                        "PROG: -qmp bogus: parse error: bogus"),
    (["-device", "nonexist"], "PROG: -device nonexist: 'nonexist' is not a valid device model name"),
    (["-device", "virtio-blk-pci,drive=nope"], "PROG: -device virtio-blk-pci,drive=nope: "
                                               "Property 'virtio-blk-device.drive' can't find value 'nope'"),
    (["-display", "bogus"], "PROG: -display bogus: Parameter 'type' does not accept value 'bogus'"),
    (["-vga", "bogus"], "PROG: unknown vga type: bogus"),
    (["-daemonize", "-serial", "stdio"], "PROG: -serial stdio: cannot use stdio with -daemonize\n"
     "PROG: -serial stdio: could not connect serial device to character backend 'stdio'"),
    (["-drive", "media=bogus,file=x"], "PROG: -drive media=bogus,file=x: 'bogus' invalid media"),
    (["-drive", "readonly=maybe,file=x"],
     "PROG: -drive readonly=maybe,file=x: Parameter 'read-only' expects 'on' or 'off'"),
    (["-drive", "cache=bogus,file=x"], "PROG: -drive cache=bogus,file=x: invalid cache option"),
    (["-drive", "if=none,id=d,file=x", "-drive", "if=none,id=d,file=y"],
     "PROG: -drive if=none,id=d,file=y: Duplicate ID 'd' for drive"),
    (["-drive", "if=none,id=d,file=x", "-device", "virtio-blk-pci,drive=d",
      "-device", "virtio-blk-pci,drive=d"],
     "PROG: -device virtio-blk-pci,drive=d: Drive 'd' is already in use by another device"),
    (["-drive", "if=none,id=d,file=x", "-device", "ide-hd,drive=d,bus=nobus"],
     "PROG: -device ide-hd,drive=d,bus=nobus: Bus 'nobus' not found"),
    (["-chardev", "socket,id=a,path=/q,server=maybe"],
     "PROG: -chardev socket,id=a,path=/q,server=maybe: Parameter 'server' expects 'on' or 'off'"),
    (["-machine", "accel=tcg,foo=bar"], "PROG: Property 'pc-i440fx-7.2-machine.foo' not found"),
])
def test_messages_are_qemus(argv: list[str], msg: str) -> None:
    assert fails(argv) == msg


def _emu(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=30, **kw)


@pytest.mark.parametrize("args, err", [
    (["-accel", "qtest"], "emu: -accel qtest: invalid accelerator qtest\n"),
    (["-machine", "pc,accel=qtest"], "emu: invalid accelerator qtest\n"),
    (["-accel", "qtest", "-accel", "kvm"], "emu: -accel qtest: invalid accelerator qtest\n"
                                          "emu: -accel kvm: invalid accelerator kvm\n"),
])
def test_accelerators(args: list[str], err: str) -> None:
    r = _emu("-nodefaults", *args)
    assert (r.returncode, r.stderr) == (1, err)


def test_chardev_connect_error_comes_before_accel(tmp_path) -> None:
    r = _emu("-chardev", f"socket,id=mon,path={tmp_path}/none.sock", "-mon",
             "chardev=mon,mode=control", "-accel", "qtest")
    assert r.returncode == 1 and r.stderr == (
        f"emu: -chardev socket,id=mon,path={tmp_path}/none.sock: Failed to connect to "
        f"'{tmp_path}/none.sock': No such file or directory\n")


def test_exit_status_and_stderr_of_the_process() -> None:
    r = _emu("-foo")
    assert r.returncode == 1 and r.stderr == "emu: -foo: invalid option\n" and r.stdout == ""
    v = _emu("-version")
    assert v.returncode == 0 and v.stdout.startswith("QEMU emulator version 7.2.22 (emu ")
    k = _emu("-kernel", "/nonexistent/k")
    assert k.returncode == 1 and \
        k.stderr == "qemu: could not open kernel file '/nonexistent/k': No such file or directory\n"


@requires_qemu_system
@pytest.mark.parametrize("args", [["-foo"], ["-m"], ["-drive", "if=bogus,file=x"],
                                  ["-accel", "qtest"], ["-chardev", "null"],
                                  ["-device", "nonexist"]])
def test_same_message_as_qemu_system(args: list[str]) -> None:
    q = subprocess.run(["qemu-system-x86_64", "-nodefaults", "-display", "none", *args],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    e = _emu("-nodefaults", "-display", "none", *args, stdin=subprocess.DEVNULL)
    assert (e.returncode, e.stderr.replace("emu:", "qemu-system-x86_64:")) == \
        (q.returncode, q.stderr)


@requires_qemu_img
def test_bad_image_and_pidfile(tmp_path) -> None:
    r = _emu("-nodefaults", "-drive", f"file={tmp_path}/missing.qcow2,format=qcow2")
    assert r.returncode == 1
    assert r.stderr == (f"emu: -drive file={tmp_path}/missing.qcow2,format=qcow2: Could not open "
                        f"'{tmp_path}/missing.qcow2': No such file or directory\n")
    bad = _emu("-pidfile", "/nonexistent-dir/pid")
    assert bad.returncode == 1 and "cannot create PID file" in bad.stderr


def test_daemonize_pidfile_and_signal(tmp_path) -> None:
    import signal
    import time

    pid = tmp_path / "emu.pid"
    r = _emu("-nodefaults", "-display", "none", "-S", "-daemonize", "-pidfile", str(pid),
             "-qmp", f"unix:{tmp_path}/q.sock,server=on,wait=off")
    assert r.returncode == 0, r.stderr
    n = int(pid.read_text())
    assert os.path.exists(f"{tmp_path}/q.sock")
    assert (os.stat(f"{tmp_path}/q.sock").st_mode & 0o777) == 0o600
    os.kill(n, signal.SIGTERM)
    for _ in range(100):
        if not pid.exists():
            break
        time.sleep(0.05)
    assert not pid.exists() and not os.path.exists(f"{tmp_path}/q.sock")


def test_pidfile_is_locked_against_a_second_instance(tmp_path) -> None:
    import time

    pid = tmp_path / "emu.pid"
    sock = tmp_path / "q.sock"
    first = subprocess.Popen([sys.executable, "-m", "emu", "-nodefaults", "-S", "-pidfile",
                              str(pid), "-qmp", f"unix:{sock},server=on,wait=off"], cwd=REPO,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        assert int(pid.read_text()) == first.pid
        second = _emu("-nodefaults", "-S", "-pidfile", str(pid))
        assert second.returncode == 1 and second.stderr == (
            "emu: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n")
        assert int(pid.read_text()) == first.pid
    finally:
        first.terminate()
        first.wait(20)
    assert not pid.exists()

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


#: -cpu, -boot, -rtc refusals (QEMU 7.2 checks them after reading every option: the RTC
#: base, then the boot devices, then the CPU model, whatever their order on the line)
CPU_BOOT_RTC_ERRORS = [
    ["-cpu", "foo"], ["-cpu", "host"], ["-cpu", ""],
    ["-boot", "order=x"], ["-boot", "order=cc"], ["-boot", "once=cc"], ["-boot", "order=e"],
    ["-boot", "order=abcdnp"], ["-boot", "menu=foo"], ["-boot", "strict=foo"],
    ["-boot", "foo=bar"], ["-boot", "splash-time=abc"], ["-boot", "reboot-timeout=-5"],
    ["-rtc", "base=foo"], ["-rtc", "clock=foo"], ["-rtc", "driftfix=foo"], ["-rtc", "foo=bar"],
    ["-cpu", "foo", "-boot", "order=x"], ["-cpu", "foo", "-rtc", "base=bar"],
    ["-rtc", "base=bar", "-boot", "order=x"], ["-boot", "order=x", "-rtc", "clock=bad"],
]


@requires_qemu_system
@pytest.mark.parametrize("args", [["-foo"], ["-m"], ["-drive", "if=bogus,file=x"],
                                  ["-accel", "qtest"], ["-chardev", "null"],
                                  ["-device", "nonexist"]] + CPU_BOOT_RTC_ERRORS,
                         ids=lambda a: " ".join(a) or "empty")
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


# ---- -cpu, -boot, -rtc, -L, -no-user-config ----------------------------------------------

@pytest.mark.parametrize("args", CPU_BOOT_RTC_ERRORS, ids=lambda a: " ".join(a) or "empty")
def test_cpu_boot_rtc_refusals_are_qemus(args: list[str]) -> None:
    """The texts qemu-system-x86_64 7.2 prints (compared live by test_same_message_as_qemu_system)."""
    expected = {
        ("-cpu", "foo"): "PROG: unable to find CPU model 'foo'",
        ("-cpu", "host"): "PROG: CPU model 'host' requires KVM or HVF",
        ("-cpu", ""): "PROG: -cpu option cannot be empty",
        ("-boot", "order=x"): "PROG: Invalid boot device 'x'",
        ("-boot", "order=cc"): "PROG: Boot device 'c' was given twice",
        ("-boot", "once=cc"): "PROG: Boot device 'c' was given twice",
        ("-boot", "order=e"): "PROG: Invalid boot device for PC: 'e'",
        ("-boot", "order=abcdnp"): "PROG: Too many boot devices for PC",
        ("-boot", "menu=foo"): "PROG: Parameter 'boot.menu' expects 'on' or 'off'",
        ("-boot", "strict=foo"): "PROG: Parameter 'boot.strict' expects 'on' or 'off'",
        ("-boot", "foo=bar"): "PROG: Parameter 'boot.foo' is unexpected",
        ("-boot", "splash-time=abc"): "PROG: Parameter 'boot.splash-time' expects integer",
        ("-boot", "reboot-timeout=-5"):
            "PROG: reboot timeout is invalid,it should be a value between -1 and 65535",
        ("-rtc", "base=foo"): "PROG: invalid datetime format\n"
                              "valid formats: '2006-06-17T16:01:21' or '2006-06-17'",
        ("-rtc", "clock=foo"): "PROG: invalid option value 'foo'",
        ("-rtc", "driftfix=foo"): "PROG: invalid option value 'foo'",
        ("-rtc", "foo=bar"): "PROG: -rtc foo=bar: Invalid parameter 'foo'",
        ("-cpu", "foo", "-boot", "order=x"): "PROG: Invalid boot device 'x'",
        ("-cpu", "foo", "-rtc", "base=bar"): "PROG: invalid datetime format\n"
                                              "valid formats: '2006-06-17T16:01:21' or '2006-06-17'",
        ("-rtc", "base=bar", "-boot", "order=x"): "PROG: invalid datetime format\n"
                                                  "valid formats: '2006-06-17T16:01:21' or "
                                                  "'2006-06-17'",
        ("-boot", "order=x", "-rtc", "clock=bad"): "PROG: invalid option value 'bad'",
    }
    assert fails(args) == expected[tuple(args)]


def test_cpu_boot_rtc_accepted() -> None:
    cfg, _ = parse_args(["-cpu", "max", "-boot", "order=dc,menu=on,strict=on,splash-time=0",
                         "-boot", "once=n", "-rtc", "base=2006-06-17T16:01:21,clock=vm",
                         "-rtc", "driftfix=slew", "-no-user-config"])
    assert cfg.cpu_model == "max"
    assert (cfg.boot_order, cfg.boot_once) == ("dc", "n")
    assert cfg.rtc_base == 1150560081 and cfg.rtc_clock == "vm"     # date -u -d ... +%s
    cfg, _ = parse_args(["-rtc", "base=localtime", "-boot", "c", "-cpu", "qemu64"])
    assert (cfg.rtc_base, cfg.boot_order, cfg.cpu_model) == ("localtime", "c", "qemu64")
    # sscanf's reading: a date alone is midnight; months past 12 carry into the next year
    assert parse_args(["-rtc", "base=2006-06-17"])[0].rtc_base == 1150502400
    assert parse_args(["-rtc", "base=2020-13-01T00:00:00"])[0].rtc_base == 1609459200
    # emu has one CPU: other QEMU models are refused with what to use instead
    assert "not available in emu" in fails(["-cpu", "Haswell-v4"])
    assert "cannot be set" in fails(["-cpu", "qemu64,+lm"])


def test_cpu_help_lists_emus_models() -> None:
    r = _emu("-cpu", "help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "Available CPUs:"
    assert sorted(ln.split()[1] for ln in lines[1:]) == ["max", "qemu64", "qemu64-v1"]


def test_firmware_lookup_with_L(tmp_path, monkeypatch) -> None:
    """-L DIR: -bios NAME and the default BIOS are looked up there first (QEMU's
    qemu_find_file); a -bios name found nowhere else is emu's own firmware directory's."""
    from emu import cli

    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "bios.bin").write_bytes(b"\xf4" * 65536)
    (fw / "other.bin").write_bytes(b"\xf4" * 65536)
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_args(["-L", str(fw)])
    cli._check_files(cfg)
    assert cfg.bios == str(fw / "bios.bin")
    cfg, _ = parse_args(["-L", str(fw), "-bios", "other.bin"])
    cli._check_files(cfg)
    assert cfg.bios == str(fw / "other.bin")
    cfg, _ = parse_args(["-bios", "bios.bin"])        # not in the cwd: emu's own
    cli._check_files(cfg)
    assert os.path.samefile(cfg.bios, REPO / "firmware" / "bios.bin")
    cfg, _ = parse_args([])
    cli._check_files(cfg)
    assert cfg.bios is None                           # emu's default
    r = _emu("-L", str(fw), "-bios", "missing.bin", stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (1, "qemu: could not load PC BIOS 'missing.bin'\n")


def test_boot_once_then_order_in_cmos() -> None:
    """CMOS 0x3D/0x38 hold -boot once= for the first boot and order= after a reset, as QEMU's
    pc machine writes them (a/b 1, c 2, d 3, n 4)."""
    from emu.machine.drives import open_drives
    from emu.machine.hardware import build_hardware
    from emu.machine.pc import Machine

    cfg, _ = parse_args(["-boot", "order=cn,once=dca"])
    machine = Machine(cfg)
    try:
        open_drives(machine)
        machine.serial_chardevs = []
        hw = build_hardware(machine)
        rtc = hw.board.rtc
        assert (rtc.read_cmos(0x3D), rtc.read_cmos(0x38) >> 4) == (0x23, 0x1)
        machine.reset()
        assert (rtc.read_cmos(0x3D), rtc.read_cmos(0x38) >> 4) == (0x42, 0x0)
        machine.reset()
        assert (rtc.read_cmos(0x3D), rtc.read_cmos(0x38) >> 4) == (0x42, 0x0)
    finally:
        machine.close()

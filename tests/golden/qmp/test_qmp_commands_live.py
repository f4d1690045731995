"""Every QEMU 7.2 command emu answers, compared live with qemu-system-x86_64 7.2.

Both emulators run the qmp-golden set-up (``-machine pc -m 64 -nodefaults -display none
-S`` with an IDE, two virtio and an if=none + virtio-blk-pci disk); each family's
requests go to both and the replies must be equal.  Requests whose answer depends on a
subsystem emu lacks are checked to give emu's ``emu does not support`` error instead (the
README's not-supported list); the few deliberate differences are asserted as such.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, requires_qemu_img, requires_qemu_system

pytestmark = [requires_qemu_system, requires_qemu_img]


class Vm:
    def __init__(self, prog: list[str], work: Path) -> None:
        work.mkdir()
        self.work = work
        for f, fmt in [("ide.qcow2", "qcow2"), ("virtio.qcow2", "qcow2"),
                       ("none.qcow2", "qcow2"), ("raw.img", "raw")]:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(work / f), "4M"],
                           check=True)
        sock = work / "qmp.sock"
        argv = prog + [
            "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
            "-chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-drive", f"file={work}/ide.qcow2,format=qcow2,if=ide",
            "-drive", f"file={work}/virtio.qcow2,format=qcow2,if=virtio",
            "-drive", f"file={work}/none.qcow2,format=qcow2,if=none,id=drv2,node-name=fmt2",
            "-device", "virtio-blk-pci,drive=drv2,id=vblk2",
            "-drive", f"file={work}/raw.img,format=raw,if=virtio"]
        self.proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(sock))
                break
            except OSError:
                self.sock.close()
                time.sleep(0.05)
        else:
            raise AssertionError(f"{prog} did not listen")
        self.f = self.sock.makefile("rwb")
        self._read()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def _read(self) -> dict:
        while True:
            line = self.f.readline()
            assert line, "monitor closed"
            m = json.loads(line)
            if "event" not in m:
                return m

    def cmd(self, name: str, args: dict | None = None) -> dict:
        msg: dict = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write((json.dumps(msg) + "\n").encode())
        self.f.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("qemu72")
    qemu = Vm(["qemu-system-x86_64"], base / "qemu")
    emu = Vm([sys.executable, "-m", "emu"], base / "emu")
    yield qemu, emu
    qemu.close()
    emu.close()


def _norm(reply: dict, vm: Vm) -> str:
    ret = reply.get("return")
    if isinstance(ret, list) and ret and isinstance(ret[0], dict) and "label" in ret[0]:
        # query-chardev: QEMU walks a hash table of children; emu keeps creation order
        reply = {"return": sorted(ret, key=lambda d: d["label"])}
    return json.dumps(reply, sort_keys=True).replace(str(vm.work), "W")


def same(vms, calls: list[tuple]) -> None:
    qemu, emu = vms
    for c in calls:
        q, e = qemu.cmd(*c), emu.cmd(*c)
        assert _norm(e, emu) == _norm(q, qemu), c


def emu_unsupported(vms, calls: list[tuple]) -> None:
    _, emu = vms
    for c in calls:
        r = emu.cmd(*c)
        assert r.get("error", {}).get("desc", "").startswith("emu does not support"), (c, r)
        assert r["error"]["class"] == "GenericError"


def test_query_commands_is_qemus_list(vms) -> None:
    same(vms, [("query-commands",)])


def test_machine_queries(vms) -> None:
    same(vms, [(n,) for n in (
        "query-uuid", "query-target", "query-memory-size-summary", "query-memdev",
        "query-memory-devices", "query-iothreads", "query-acpi-ospm-status", "query-mice",
        "query-tpm", "query-vnc", "query-vnc-servers", "query-spice", "query-display-options",
        "query-hotpluggable-cpus", "system_wakeup", "query-vm-generation-id", "query-balloon",
        "rtc-reset-reinjection", "query-sev", "query-sev-launch-measure",
        "query-sev-capabilities", "query-sgx", "query-sgx-capabilities", "x-query-numa",
        "x-query-rdma", "x-query-profile", "x-query-usb", "query-stats-schemas", "query-dump",
        "query-name")])
    same(vms, [("balloon", {"value": 1}), ("dumpdtb", {"filename": "x"}),
               ("set-numa-node", {"type": "node"}), ("query-stats", {"target": "vm"}),
               ("sev-inject-launch-secret", {"packet-header": "a", "secret": "b"}),
               ("query-sev-attestation-report", {"mnonce": "x"}),
               ("query-cpu-model-expansion", {"type": "full", "model": {"name": "nope"}})])
    qemu, emu = vms
    q, e = qemu.cmd("query-cpus-fast")["return"], emu.cmd("query-cpus-fast")["return"]
    for x in q + e:
        x.pop("thread-id")
    assert q == e


def test_query_pci_lists_our_functions_like_qemu(vms) -> None:
    """Same shape and values for every function both have; emu has no PIIX3 ACPI function
    (00:01.3) and its virtio-blk-pci has no MSI-X BAR 1 (docs/architecture.md)."""
    qemu, emu = vms
    q = qemu.cmd("query-pci")["return"][0]["devices"]
    e = emu.cmd("query-pci")["return"][0]["devices"]
    q = [d for d in q if (d["slot"], d["function"]) != (1, 3)]
    for d in q:
        d["regions"] = [r for r in d["regions"] if not (d["id"]["vendor"] == 0x1AF4
                                                        and r["bar"] == 1)]
    assert e == q


def test_guest_memory_dumps(vms) -> None:
    qemu, emu = vms
    calls = [("pmemsave", {"val": 0, "size": 4096, "filename": "p.bin"}),
             ("memsave", {"val": 0, "size": 4096, "filename": "m.bin"}),
             ("memsave", {"val": 0, "size": 16, "filename": "m.bin", "cpu-index": 5}),
             ("memsave", {"val": 0, "size": 0, "filename": "m0.bin"}),
             ("pmemsave", {"val": 0, "size": 16, "filename": "nodir/p.bin"}),
             ("memsave", {"val": "x", "size": 16, "filename": "m.bin"}),
             ("memsave", {"val": -4096, "size": 16, "filename": "m2.bin"})]
    same(vms, calls)
    for f in ("p.bin", "m.bin", "m0.bin"):
        assert (emu.work / f).read_bytes() == (qemu.work / f).read_bytes(), f


def test_chardev_and_ringbuf(vms) -> None:
    same(vms, [
        ("query-chardev",), ("query-yank",),
        ("ringbuf-write", {"device": "nope", "data": "x"}),
        ("ringbuf-write", {"device": "qmp0", "data": "x"}),
        ("chardev-add", {"id": "rb", "backend": {"type": "ringbuf", "data": {"size": 8}}}),
        ("chardev-add", {"id": "rb3", "backend": {"type": "ringbuf", "data": {"size": 1000}}}),
        ("chardev-add", {"id": "rb", "backend": {"type": "ringbuf", "data": {}}}),
        ("chardev-add", {"id": "b0", "backend": {"type": "bogus", "data": {}}}),
        ("ringbuf-write", {"device": "rb", "data": "hello"}),
        ("ringbuf-write", {"device": "rb", "data": "aGk=", "format": "base64"}),
        ("ringbuf-write", {"device": "rb", "data": "wraps"}),
        ("ringbuf-write", {"device": "rb", "data": "!!!", "format": "base64"}),
        ("ringbuf-read", {"device": "rb", "size": 3}),
        ("ringbuf-read", {"device": "rb", "size": 100, "format": "base64"}),
        ("ringbuf-read", {"device": "rb", "size": 0}),
        ("chardev-add", {"id": "n0", "backend": {"type": "null", "data": {}}}),
        ("query-chardev",),
        ("chardev-send-break", {"id": "nope"}), ("chardev-send-break", {"id": "n0"}),
        ("chardev-remove", {"id": "nope"}), ("chardev-remove", {"id": "qmp0"}),
        ("chardev-remove", {"id": "n0"}), ("chardev-remove", {"id": "rb"}),
        ("query-chardev",)])


def test_fds_trace_yank(vms) -> None:
    same(vms, [("getfd", {"fdname": "x"}), ("closefd", {"fdname": "x"}),
               ("remove-fd", {"fdset-id": 1}), ("remove-fd", {"fdset-id": 1, "fd": 3}),
               ("add-fd", {"fdset-id": 1}), ("query-fdsets",),
               ("add_client", {"protocol": "vnc", "fdname": "x"}),
               ("trace-event-get-state", {"name": "nonexist"}),
               ("trace-event-get-state", {"name": "nonexist*"}),
               ("trace-event-set-state", {"name": "nonexist", "enable": True}),
               ("trace-event-set-state", {"name": "nonexist*", "enable": True}),
               ("yank", {"instances": []}),
               ("yank", {"instances": [{"type": "chardev", "id": "nope"}]}),
               ("yank", {"instances": [{"type": "block-node", "node-name": "fmt2"}]})])


def test_qom(vms) -> None:
    same(vms, [("qom-list", {"path": "/nope"}), ("qom-get", {"path": "/machine",
                                                             "property": "type"}),
               ("qom-get", {"path": "/machine", "property": "nope"}),
               ("qom-get", {"path": "/nope", "property": "type"}),
               ("qom-get", {"path": "/machine/peripheral/vblk2", "property": "drive"}),
               ("qom-set", {"path": "/machine", "property": "nope", "value": 1}),
               ("qom-list", {"path": "/machine/peripheral"}),
               ("device_del", {"id": "nope"}), ("device_add", {"driver": "nope"}),
               ("device_add", {}), ("object-del", {"id": "nope"}),
               ("object-add", {"qom-type": "bogus", "id": "x"}),
               ("qom-list-properties", {"typename": "nope"}),
               ("device-list-properties", {"typename": "nope"}),
               ("qom-list-types", {"implements": "nope"})])
    emu_unsupported(vms, [("object-add", {"qom-type": "secret", "id": "s0", "data": "abc"}),
                          ("device_add", {"driver": "virtio-blk-pci"})])


def test_migration_net_display_replay(vms) -> None:
    same(vms, [(n,) for n in ("query-migrate", "query-migrate-capabilities",
                              "query-migrate-parameters", "migrate-start-postcopy",
                              "x-colo-lost-heartbeat", "query-colo-status",
                              "query-xen-replication-status", "query-dirty-rate",
                              "query-vcpu-dirty-limit", "query-replay",
                              "query-rx-filter")])
    same(vms, [("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}),
               ("migrate-recover", {"uri": "x"}),
               ("client_migrate_info", {"protocol": "spice", "hostname": "x"}),
               ("client_migrate_info", {"protocol": "vnc", "hostname": "x"}),
               ("migrate-set-parameters", {"max-bandwidth": 1}),
               ("migrate-set-parameters", {"compress-level": 10}),
               ("query-migrate-parameters",),
               ("set-vcpu-dirty-limit", {"dirty-rate": 1}),
               ("cancel-vcpu-dirty-limit", {"cpu-index": 0}),
               ("replay-break", {"icount": 1}), ("replay-seek", {"icount": 1}),
               ("replay-delete-break",),
               ("netdev_del", {"id": "x"}), ("set_link", {"name": "x", "up": True}),
               ("query-rx-filter", {"name": "x"}),
               ("query-rocker", {"name": "x"}), ("query-rocker-ports", {"name": "x"}),
               ("screendump", {"filename": "s.ppm"}),
               ("set_password", {"protocol": "vnc", "password": "x"}),
               ("set_password", {"protocol": "spice", "password": "x"}),
               ("expire_password", {"protocol": "vnc", "time": "now"}),
               ("change-vnc-password", {"password": "x"}),
               ("display-update", {"type": "vnc"}), ("display-reload", {"type": "vnc"}),
               ("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})])
    emu_unsupported(vms, [("migrate", {"uri": "exec:cat > /dev/null"}),
                          ("netdev_add", {"id": "n1", "type": "user"}),
                          ("calc-dirty-rate", {"calc-time": 1}),
                          ("dump-guest-memory", {"paging": False, "protocol": "file:d"})])


def test_block_extras(vms) -> None:
    same(vms, [("query-pr-managers",), ("query-block-exports",), ("nbd-server-stop",),
               ("block-export-del", {"id": "x"}), ("nbd-server-remove", {"name": "x"}),
               ("nbd-server-add", {"device": "ide0-hd0"}),
               ("block_resize", {"device": "nodev", "size": 8388608}),
               ("eject", {"device": "ide0-hd0"}), ("eject", {"id": "vblk2"}), ("eject",),
               ("block_set_io_throttle", {"device": "ide0-hd0", "bps": 0, "bps_rd": 0,
                                          "bps_wr": 0, "iops": 0, "iops_rd": 0,
                                          "iops_wr": 0}),
               ("block-latency-histogram-set", {"id": "vblk2"}),
               ("block-latency-histogram-set", {"id": "nope"}),
               ("block-set-write-threshold", {"node-name": "nope", "write-threshold": 1}),
               ("watchdog-set-action", {"action": "pause"}), ("set-action",)])
    emu_unsupported(vms, [("drive-mirror", {"device": "virtio0", "target": "m.qcow2",
                                            "sync": "full"})])
    same(vms, [("block_resize", {"node-name": "fmt2", "size": 8388608}),
               ("block_resize", {"node-name": "fmt2", "size": -512})])


def test_argument_checking_follows_qemus_schema(vms) -> None:
    """Missing, unexpected, wrongly typed and bad enum arguments for new commands."""
    same(vms, [("memsave",), ("pmemsave", {"val": 0, "size": 1}), ("qom-get", {"path": 1}),
               ("chardev-add", {"id": "x"}), ("chardev-add", {"id": "x", "backend": {}}),
               ("object-add", {"qom-type": "secret"}), ("yank", {"instances": [{}]}),
               ("migrate-set-capabilities", {"capabilities": [{"capability": "bogus",
                                                               "state": True}]}),
               ("set-action", {"reboot": "bogus"}), ("query-uuid", {"x": 1}),
               ("blockdev-create", {}), ("block-commit", {"device": 1}),
               ("netdev_add", {"id": "n", "type": "bogus"}),
               ("send-key", {"keys": [{"type": "qcode", "data": "nokey"}]}),
               ("dump-guest-memory", {"paging": "no", "protocol": "x"})])

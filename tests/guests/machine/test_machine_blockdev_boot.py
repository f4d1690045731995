"""A guest boots from a ``-blockdev`` node attached with ``-device ide-hd,drive=<node>`` or
``-device virtio-blk-pci,drive=<node>`` (the device's own, nameless BlockBackend), and a
read-only node makes a read-only virtio disk, as on QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import requires_nasm
from machine_images import MACHINE, boot_image

pytestmark = [requires_nasm]


@pytest.mark.parametrize("device", ["ide-hd,drive=boot,bus=ide.0", "ide-hd,drive=boot",
                                    "virtio-blk-pci,drive=boot,id=vboot"])
def test_guest_boots_from_a_blockdev_node(emu_inprocess, tmp_path: Path, device: str) -> None:
    img = boot_image("machine_ticker", tmp_path)
    vm = emu_inprocess(*MACHINE, "-blockdev",
                       f"driver=raw,node-name=boot,file.driver=file,file.filename={img}",
                       "-device", device)
    vm.wait_for("ticker up")
    [blk] = vm.qmp("query-block")
    assert blk["device"] == "" and blk["inserted"]["node-name"] == "boot"
    assert blk["qdev"] == ("/machine/peripheral/vboot/virtio-backend" if "vboot" in device
                           else "/machine/peripheral-anon/device[1]")   # [0]: isa-debug-exit
    stats = vm.qmp("query-blockstats")[0]
    assert stats["device"] == "" and stats["node-name"] == "boot"
    assert stats["stats"]["rd_operations"] > 0                 # the BIOS read the MBR through it


def test_read_only_node_is_a_read_only_virtio_disk(emu_inprocess, tmp_path: Path) -> None:
    img = boot_image("machine_ticker", tmp_path)
    vm = emu_inprocess(*MACHINE, "-blockdev",
                       f"driver=raw,node-name=boot,read-only=on,file.driver=file,file.filename={img}",
                       "-device", "virtio-blk-pci,drive=boot")
    vm.wait_for("ticker up")
    [blk] = vm.qmp("query-block")
    assert blk["inserted"]["ro"] is True
    assert vm.machine.block_devices[0].backend.read_only

"""emu-img's formatting helpers against texts recorded from qemu-img 7.2."""

from __future__ import annotations

import pytest

from emu.img.output import qdict_order, size_to_str, snapshot_line, to_json_pretty, SNAPSHOT_HEADER_LINE
from emu.img.util import parse_size


def test_qdict_order_matches_qemu_img_info_json():
    # Insertion order = QAPI ImageInfo member order; printed order recorded from qemu-img info.
    keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
            "backing-filename", "full-backing-filename", "backing-filename-format", "snapshots",
            "format-specific"]
    assert qdict_order(dict.fromkeys(keys)) == [
        "backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size", "format",
        "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"]


def test_qdict_order_check_and_snapshot_members():
    check = ["filename", "format", "check-errors", "image-end-offset", "total-clusters"]
    assert qdict_order(dict.fromkeys(check)) == [
        "image-end-offset", "total-clusters", "check-errors", "filename", "format"]
    snap = ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"]
    assert qdict_order(dict.fromkeys(snap)) == [
        "icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id", "vm-state-size"]


def test_json_pretty_layout():
    obj = {"virtual-size": 1, "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                                                                             "corrupt": False}},
           "snapshots": [{"id": "1"}]}
    assert to_json_pretty(obj) == (
        '{\n    "snapshots": [\n        {\n            "id": "1"\n        }\n    ],\n'
        '    "virtual-size": 1,\n    "format-specific": {\n        "type": "qcow2",\n'
        '        "data": {\n            "compat": "1.1",\n            "corrupt": false\n        }\n    }\n}')


@pytest.mark.parametrize("val,text", [(0, "0 B"), (200704, "196 KiB"), (1331200, "1.27 MiB"),
                                      (67108864, "64 MiB"), (1 << 30, "1 GiB"), (1023, "0.999 KiB"), (999, "999 B"),
                                      (1000, "0.977 KiB"), (1024 * 1000, "0.977 MiB")])
def test_size_to_str(val, text):
    assert size_to_str(val) == text


def test_snapshot_table_rows():
    assert SNAPSHOT_HEADER_LINE == ("ID        TAG               VM SIZE                DATE     VM CLOCK"
                                    "     ICOUNT")
    row = snapshot_line("1", "snap1", 0, 0, 3_723_004_000_000, 0)
    assert row.startswith("1         snap1                 0 B ")
    assert row.endswith(" 01:02:03.004          0")
    assert len(row) == len(SNAPSHOT_HEADER_LINE)


@pytest.mark.parametrize("text,val", [("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("64M", 64 << 20),
                                      ("1G", 1 << 30), ("2T", 2 << 40), ("1.5M", 3 << 19), ("1b", 1),
                                      ("0x200", 512)])
def test_parse_size(text, val):
    assert parse_size(text) == val


@pytest.mark.parametrize("text", ["", "abc", "12Q", "-1", "1.5", "10E", "0x10k"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)

"""QEMU 7.2's command set: every command registered, listed in QEMU's order, its arguments
checked with QEMU's schema; the committed type table equals the recorded introspection."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED, requires_shared
from emu.errors import QmpError
from emu.qmp import qapi72, qapi72_table
from emu.qmp.commands import COMMANDS, CommandContext, load_all
from emu.qmp.commands.core import query_commands


def test_every_qemu_command_is_registered_and_listed_in_qemus_order() -> None:
    load_all()
    assert len(qapi72.ORDER) == 216
    assert [n for n in qapi72.ORDER if n not in COMMANDS] == []
    listed = [c["name"] for c in query_commands(CommandContext(machine=None))]
    assert listed == list(qapi72.ORDER)
    assert "x-emu-query-cuts" in COMMANDS and "x-emu-query-cuts" not in listed


@pytest.mark.parametrize("name,args,text", [
    ("memsave", {}, "Parameter 'val' is missing"),
    ("memsave", {"val": "x", "size": 1, "filename": "f"},
     "Invalid parameter type for 'val', expected: integer"),
    ("chardev-add", {"id": "x", "backend": {"type": "bogus"}},
     "Parameter 'type' does not accept value 'bogus'"),
    ("chardev-add", {"id": "x", "backend": {"type": "ringbuf", "data": {"size": 1, "q": 1}}},
     "Parameter 'backend.data.q' is unexpected"),
    ("object-add", {"qom-type": "secret", "id": "s"}, None),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2"}},
     "Parameter 'options.file' is missing"),
    ("query-uuid", {"x": 1}, "Parameter 'x' is unexpected"),
])
def test_arguments_are_checked_with_qemus_schema(name: str, args: dict, text: str | None) -> None:
    load_all()
    t = COMMANDS[name].args
    if text is None:
        t.check(args, "", None)
        return
    with pytest.raises(QmpError) as e:
        t.check(args, "", None)
    assert e.value.desc == text


@requires_shared
def test_table_matches_the_recorded_introspection() -> None:
    path = SHARED / "qmp-golden" / "transcripts" / "05-qmp-schema.jsonl"
    schema = None
    for line in path.open():
        r = json.loads(line)
        if r.get("dir") == "recv" and isinstance(r.get("msg", {}).get("return"), list):
            schema = r["msg"]["return"]
    by = {e["name"]: e for e in schema}
    for name, (arg, ret, oob, feats) in qapi72_table.COMMANDS.items():
        e = by[name]
        assert (e["arg-type"], e["ret-type"], bool(e.get("allow-oob")),
                tuple(e.get("features", ()))) == (arg, ret, oob, feats), name
    for tname, entry in qapi72_table.TYPES.items():
        e = by[tname]
        assert e["meta-type"] == entry[0], tname
        if entry[0] == "enum":
            assert tuple(e["values"]) == entry[1]
        elif entry[0] == "object":
            assert [("?" if "default" in m else "") + m["name"] for m in e["members"]] == \
                [m[0] for m in entry[1]], tname
            assert [m["type"] for m in e["members"]] == [m[1] for m in entry[1]], tname

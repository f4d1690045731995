"""QEMU's JSON dialect: every row of qmp-golden/NOTES.md's protocol table, plus the writer."""

from __future__ import annotations

import pytest

from emu.qmp.json import JsonMessageParser, loads, qdict_order, to_json


def feed(data: bytes) -> list:
    """Messages produced by one input: values, or the error text for errors."""
    return [str(e) if e is not None else v for v, e in JsonMessageParser().feed(data)]


@pytest.mark.parametrize("line, expected", [
    (b"hello\n", ["JSON parse error, invalid keyword 'hello'"]),
    (b"not-json\n", ["JSON parse error, invalid keyword 'not'", "JSON parse error, stray '-j'"]),
    (b"@\n", ["JSON parse error, stray '@'"]),
    (b'{"execute" "query-status"}\n', ["JSON parse error, missing : in object pair"]),
    (b'{"execute": "query-status",}\n', ["JSON parse error, expecting value"]),
    (b'{"execute": "query-status"]\n', ["JSON parse error, expected separator in dict"]),
    (b'{"execute": "query-status"}}\n', [{"execute": "query-status"},
                                         "JSON parse error, expecting value"]),
    (b'{"execute": %s}\n', ["JSON parse error, stray '%'", "JSON parse error, expecting value"]),
    (b'{"execute": "query-\\x73tatus"}\n', ["JSON parse error, invalid escape sequence in string"]),
    (b"\xff\xfe\n", ["JSON parse error, stray '\ufffd'", "JSON parse error, stray '\ufffd'"]),
    (b'{"execute": "query-status", "id": "a\x01b"}\n',
     ["JSON parse error, stray '\"a\x01'", "JSON parse error, expecting value"]),
    (b'{"execute": "query-status", "id": 1, "execute": "query-version"}\n',
     ["JSON parse error, duplicate key"]),
    (b'"str"\n', ["str"]),
    (b"[1, 2]\n", [[1, 2]]),
    (b"42\n", [42]),
    (b"{'execute': 'query-status', 'id': 'sq'}\n", [{"execute": "query-status", "id": "sq"}]),
    (b'{"execute": "query-\\u0073tatus"}\n', [{"execute": "query-status"}]),
    (b"\n", []),
    (b"   \t  \n", []),
    (b'{"a": 1} {"b": 2}\n', [{"a": 1}, {"b": 2}]),
    (b'{"a": [1, {"b": null}], "c": true, "d": false}\n',
     [{"a": [1, {"b": None}], "c": True, "d": False}]),
    (b"01\n", ["JSON parse error, stray '01'"]),
    (b'"\\u12"\n', ['JSON parse error, \\u12" is not a valid Unicode character']),
    (b'"\\ud800"\n', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'"\\ud83d\\ude00"\n', ["\U0001f600"]),
    (b'"\xc3\x28"\n', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b"{1: 2}\n", ["JSON parse error, key is not a string in object"]),
    (b"[1 2]\n", ["JSON parse error, expected separator in list"]),
])
def test_protocol_table_rows(line: bytes, expected: list) -> None:
    assert feed(line) == expected


def test_object_split_over_lines_gives_one_message() -> None:
    p = JsonMessageParser()
    assert p.feed(b'{"execute": "query-status",\n') == []
    assert p.feed(b' "id": "split"}\n') == [({"execute": "query-status", "id": "split"}, None)]


def test_byte_at_a_time_equals_whole_line() -> None:
    data = b'{"execute": "x", "arguments": {"a": [1, 2.5, "\\u00e9"]}} bad {"b": 1}\n'
    whole = feed(data)
    p = JsonMessageParser()
    parts = []
    for i in range(len(data)):
        parts += [str(e) if e else v for v, e in p.feed(data[i:i + 1])]
    assert parts == whole
    assert len(whole) == 3


def test_numbers_follow_qemu_int64_uint64_double() -> None:
    assert loads("9223372036854775807") == 9223372036854775807
    assert loads("-9223372036854775808") == -9223372036854775808
    assert loads("18446744073709551615") == 18446744073709551615
    big = loads("18446744073709551616")
    assert isinstance(big, float) and big == 1.8446744073709552e19
    assert isinstance(loads("-9223372036854775809"), float)
    assert loads("1e3") == 1000.0 and isinstance(loads("1e3"), float)


def test_nesting_limit_and_recovery() -> None:
    msgs = feed(b"[" * 1025 + b"]" * 1025 + b' {"ok": 1}\n')
    assert msgs[0] == "JSON nesting depth limit exceeded"
    assert msgs[1:1026] == ["JSON parse error, expecting value"] * 1025
    assert msgs[-1] == {"ok": 1}
    # deep but legal nesting parses
    assert feed(b"[" * 1000 + b"]" * 1000 + b"\n")[0] is not None


def test_large_string_is_fast_and_exact() -> None:
    s = "a" * (1 << 20)
    assert feed(b'"' + s.encode() + b'"\n') == [s]


@pytest.mark.parametrize("obj, text", [
    ({"return": {}, "id": 1}, '{"return": {}, "id": 1}'),
    ({"error": {"class": "C", "desc": "d"}, "id": "x"},
     '{"id": "x", "error": {"class": "C", "desc": "d"}}'),
    ({"running": False, "singlestep": False, "status": "prelaunch"},
     '{"status": "prelaunch", "singlestep": false, "running": false}'),
    ({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "p"},
     '{"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "p"}'),
    ({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}},
     '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}'),
    ("é\x01\x7f\"\\\n\U0001f600", '"\\u00E9\\u0001\\u007F\\"\\\\\\n\\uD83D\\uDE00"'),
    (1.5, "1.5"), (1.8446744073709552e19, "1.8446744073709552e+19"), (1000.0, "1000"),
    (0.1, "0.10000000000000001"), ([], "[]"), ([1, "a", None, True], '[1, "a", null, true]'),
])
def test_writer_is_qemus(obj: object, text: str) -> None:
    assert to_json(obj) == text


def test_qdict_order_is_bucket_then_newest_first() -> None:
    # "status" and "singlestep" share a bucket: the later insertion comes first
    assert qdict_order(["running", "singlestep", "status"]) == ["status", "singlestep", "running"]


def test_nul_byte_ends_the_quoted_token_like_a_c_string() -> None:
    assert feed(b"\x00\n") == ["JSON parse error, stray ''"]

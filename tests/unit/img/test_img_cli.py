"""emu-img's command line in-process: dispatch, usage errors, size parsing, -o help (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.img.main import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_args_and_unknown_command(capsys):
    assert run(capsys) == (1, "", "emu-img: Not enough arguments\nTry 'emu-img --help' for more information\n")
    assert run(capsys, "frob")[2] == "emu-img: Command not found: frob\nTry 'emu-img --help' for more information\n"


def test_option_errors(capsys):
    assert run(capsys, "check", "-f")[2].startswith("emu-img: missing argument for option '-f'\n")
    assert run(capsys, "check", "--bogus", "x")[2].startswith("emu-img: unrecognized option '--bogus'\n")
    code, _, err = run(capsys, "check", "--output=xml", "x")
    assert code == 1 and err == "emu-img: --output must be used with human or json as argument.\n"
    code, _, err = run(capsys, "snapshot", "-l", "-c", "x", "img")
    assert code == 1 and err.startswith("emu-img: Cannot mix '-l', '-a', '-c', '-d'\n")


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("bench", "check", "commit", "compare", "convert", "create", "info", "map", "rebase",
                "resize", "snapshot"):
        assert f"\n  {cmd} " in out


def test_create_raw_and_formatting_line(capsys, tmp_path: Path):
    f = tmp_path / "r.raw"
    code, out, err = run(capsys, "create", "-f", "raw", str(f), "1.5M")
    assert (code, err) == (0, "")
    assert out == f"Formatting '{f}', fmt=raw size=1572864\n"
    assert f.stat().st_size == 1572864
    code, out, err = run(capsys, "create", "-f", "qcow2", str(tmp_path / "x.qcow2"), "12Q")
    assert code == 1 and err.startswith("emu-img: Invalid image size specified. You may use k, M, G, T, P or E")


def test_create_option_help(capsys):
    code, out, _ = run(capsys, "create", "-f", "qcow2", "-o", "help", "x")
    assert code == 0 and out.startswith("Supported options:\n  backing_file=<str>     - File name of a base image\n")
    assert "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n" in out


def test_check_raw_is_not_supported(capsys, tmp_path: Path):
    f = tmp_path / "r.raw"
    f.write_bytes(bytes(4096))
    assert run(capsys, "check", str(f)) == (63, "", "emu-img: This image format does not support checks\n")
    code, _, err = run(capsys, "check", str(tmp_path / "missing"))
    assert code == 1 and "No such file or directory" in err


def test_resize_negative_size_without_double_dash(capsys, tmp_path: Path):
    f = tmp_path / "r.raw"
    f.write_bytes(bytes(1 << 20))
    code, _, err = run(capsys, "resize", "-f", "raw", str(f), "-512k")
    assert code == 1 and err.startswith("emu-img: Use the --shrink option to perform a shrink operation.\n")
    assert run(capsys, "resize", "-f", "raw", "--shrink", str(f), "-512k")[:2] == (0, "Image resized.\n")
    assert f.stat().st_size == 512 << 10

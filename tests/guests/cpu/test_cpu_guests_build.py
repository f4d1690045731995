"""scripts/build-guests rebuilds the committed guest binaries byte for byte."""

from __future__ import annotations

import subprocess

from conftest import REPO, requires_nasm

from cpu_guest_runner import GUESTS_DIR


@requires_nasm
def test_cpu_guests_build_reproducible(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([str(REPO / "scripts" / "build-guests"), "--out", str(out), "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sources = sorted(p.stem for p in GUESTS_DIR.glob("*.asm"))
    built = sorted(p.stem for p in (out / "cpu").glob("*.img"))
    assert built == sources and sources, (built, sources)
    for name in sources:
        fresh = (out / "cpu" / f"{name}.img").read_bytes()
        committed = (GUESTS_DIR / f"{name}.img").read_bytes()
        assert len(fresh) == 32768, name
        nasm = subprocess.run(["nasm", "-v"], capture_output=True, text=True).stdout.strip()
        assert fresh == committed, (f"guest-images/cpu/{name}.img differs from what its source builds "
                                    f"with {nasm} (2.16.01 built the committed images): run scripts/build-guests")


@requires_nasm
def test_cpu_guests_build_check_mode() -> None:
    proc = subprocess.run([str(REPO / "scripts" / "build-guests"), "--check", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFFERS" not in proc.stdout and "same    guest-images/cpu/serial.img" in proc.stdout

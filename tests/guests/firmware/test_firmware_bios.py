"""emu's BIOS (firmware/bios.bin) booting the biostest guest, compared with SeaBIOS.

Every scenario runs on each :data:`PLATFORMS` entry: our BIOS and SeaBIOS on
qemu-system-x86_64 (the reference hardware emu emulates), and our BIOS on emu as soon as emu's
machine can boot (skipped with the reason until then).  The guest checks itself and ends with
PASS/FAIL through isa-debug-exit; these tests also check its figures, the disk image after its
writes, and that both firmwares describe the same machine (geometry, EDD, PCI resources).
"""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest

from conftest import REPO, requires_nasm, requires_qemu_system
from firmware_biostest import (BIOS, CHS_WRITE_LBA, OURS_ON_EMU, OURS_ON_QEMU, SEABIOS_ON_QEMU,
                               WRITE_LBA, Disk, Platform, Report, emu_can_boot, hexfields,
                               make_disk, pattern, run, written)

pytestmark = [requires_nasm]

PLATFORMS = [
    pytest.param(OURS_ON_QEMU, marks=requires_qemu_system, id="emu-bios@qemu"),
    pytest.param(SEABIOS_ON_QEMU, marks=requires_qemu_system, id="seabios@qemu"),
    pytest.param(OURS_ON_EMU, id="emu-bios@emu"),
]
MiB = 1 << 20
GiB = 1 << 30


def _usable(platform: Platform) -> None:
    if platform is OURS_ON_EMU:
        reason = emu_can_boot()
        if reason:
            pytest.skip(reason)


class Scenario:
    """One machine configuration, booted once per platform and cached for the module.

    Disks are ``(file, size, boot, -drive options, -device options or None, partition heads)``;
    the boot disk carries the test program.
    """

    def __init__(self, name: str, memory: int | str, disks: list[tuple], emu: bool = True,
                 extra: tuple[str, ...] = ()):
        self.name, self.memory, self.disks_spec, self.emu = name, memory, disks, emu
        self.extra = list(extra)

    @property
    def ram(self) -> int:
        m = str(self.memory)
        return int(m[:-1]) * GiB if m.endswith("G") else int(m) * MiB

    def boot(self, platform: Platform, tmp: "pytest.TempPathFactory") -> tuple[Report, list[Disk]]:
        d = tmp.mktemp(f"{self.name}-{platform.name.replace('@', '-')}")
        disks, drives, devices = [], [], []
        for fname, size, boot, opts, device, heads in self.disks_spec:
            disk = make_disk(d / fname, size, boot, platform.int10_console, heads)
            disks.append(disk)
            drives.append(f"file={disk.path},format=raw,{opts}")
            if device:
                devices.append(device)
        return run(platform, drives, self.memory, devices=devices, extra=self.extra), disks


BASIC = Scenario("basic", 64, [("hd0.img", 64 * MiB, True, "if=ide,index=0", None, 0),
                               ("vd0.img", 16 * MiB, False, "if=virtio", None, 0)])
# The boot disk is past LBA28 (LBA48 commands, LBA-translated geometry), a 1 GiB slave on the
# same channel, an 8 MiB master on the second channel (no translation); RAM above 16 MiB.
MULTI = Scenario("multi", 512, [("big.img", 200 * GiB, True, "if=ide,index=0", None, 0),
                                ("slave.img", 1 * GiB, False, "if=ide,index=1", None, 0),
                                ("sec.img", 8 * MiB, False, "if=ide,index=2", None, 0)])
# Every BIOS CHS translation QEMU can ask for (CMOS 0x39): "auto" with a partition table made
# with 255 heads (QEMU then picks LARGE), R-ECHS, none (cylinders clipped), LBA.
GEOMETRY = Scenario("geometry", 64, [
    ("g0.img", 2 * GiB, True, "if=none,id=g0",
     "ide-hd,drive=g0,bus=ide.0,unit=0,bios-chs-trans=auto", 255),
    ("g1.img", 1 * GiB, False, "if=none,id=g1",
     "ide-hd,drive=g1,bus=ide.0,unit=1,bios-chs-trans=rechs", 0),
    ("g2.img", 600 * MiB, False, "if=none,id=g2",
     "ide-hd,drive=g2,bus=ide.1,unit=0,bios-chs-trans=none", 0),
    ("g3.img", 3 * GiB, False, "if=none,id=g3",
     "ide-hd,drive=g3,bus=ide.1,unit=1,bios-chs-trans=lba", 0)], emu=False)
# virtio-blk disks only, booted through INT 13h on the virtqueue: the boot disk is past LBA28
# (geometry 16383/16/63 from QEMU, SeaBIOS's heuristic picks LBA translation), 2 GiB
# (4161/16/63: LARGE), 8 MiB (16/16/63: none).
VIRTIO = Scenario("virtio", 64, [("vd0.img", 200 * GiB, True, "if=virtio", None, 0),
                                 ("vd1.img", 2 * GiB, False, "if=virtio", None, 0),
                                 ("vd2.img", 8 * MiB, False, "if=virtio", None, 0)])
# A legacy-only virtio-blk (disable-modern=on: the BIOS uses its I/O BAR and a 256-entry ring in
# conventional memory) boots, beside a modern one.
LEGACY = Scenario("legacy", 64, [("vl0.img", 200 * GiB, True, "if=none,id=vl0",
                                  "virtio-blk-pci,drive=vl0,disable-modern=on", 0),
                                 ("vm1.img", 2 * GiB, False, "if=virtio", None, 0)])
# 8 MiB: below 16 MiB, where only CMOS 0x30/0x31 count; two CPUs (the second stays parked).
LOWMEM = Scenario("lowmem", 8, [("hd0.img", 16 * MiB, True, "if=ide", None, 0)], emu=False,
                  extra=("-smp", "2"))
# RAM above 4 GiB (QEMU's i440FX keeps 3 GiB below it): an E820 entry above 4 GiB.
HIGHMEM = Scenario("highmem", "5G", [("hd0.img", 64 * MiB, True, "if=ide", None, 0)], emu=False)
_cache: dict[tuple[str, str], tuple[Report, list[Disk]]] = {}


def boot(scenario: Scenario, platform: Platform, tmp) -> tuple[Report, list[Disk]]:
    _usable(platform)
    if platform is OURS_ON_EMU and not scenario.emu:
        pytest.skip(f"scenario {scenario.name} uses QEMU-only options")
    key = (scenario.name, platform.name)
    if key not in _cache:
        _cache[key] = scenario.boot(platform, tmp)
    return _cache[key]


def assert_passed(rep: Report) -> None:
    assert rep.passed, f"status {rep.status}, failures {rep.failures}\n{rep.output[-3000:]}"


def assert_writes_landed(disk: Disk) -> None:
    """The guest's AH=43h/03h writes are in the image; the sectors around them are not touched."""
    for i in range(3):
        assert disk.read(WRITE_LBA + i) == written(WRITE_LBA + i), f"LBA {WRITE_LBA + i}"
    assert disk.read(WRITE_LBA - 1) == pattern(WRITE_LBA - 1)
    assert disk.read(WRITE_LBA + 3) == pattern(WRITE_LBA + 3)
    assert disk.read(CHS_WRITE_LBA) == written(CHS_WRITE_LBA | 0x80000000)
    assert disk.read(CHS_WRITE_LBA - 1) == pattern(CHS_WRITE_LBA - 1)
    assert disk.read(CHS_WRITE_LBA + 1) == pattern(CHS_WRITE_LBA + 1)
    if disk.high_lba:
        target = disk.high_lba + 8
        assert disk.read(target) == written(target)
        assert disk.read(target - 1) == pattern(target - 1)
        assert disk.read(target + 1) == pattern(target + 1)


# ---- the guest passes, and its writes are on disk -------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
def test_firmware_biostest_basic(platform, tmp_path_factory):
    rep, disks = boot(BASIC, platform, tmp_path_factory)
    assert_passed(rep)
    for line in ("CHSREAD ok", "EXTREAD ok", "EXTWRITE ok", "CHSWRITE ok", "ERRORS ok",
                 "A20 ok", "MOVE ok", "MISC ok"):
        assert line in rep.lines
    assert_writes_landed(disks[0])
    assert disks[1].read(0, 64) == bytes(64 * 512)      # the virtio disk is never written


@pytest.mark.parametrize("platform", PLATFORMS)
def test_firmware_biostest_three_disks_lba48(platform, tmp_path_factory):
    rep, disks = boot(MULTI, platform, tmp_path_factory)
    assert_passed(rep)
    assert "LBA48 ok" in rep.lines
    assert sorted(rep.per_drive()) == ["80", "81", "82"]
    assert_writes_landed(disks[0])
    for other in disks[1:]:
        assert other.read(0, 16) == bytes(16 * 512)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("scenario", [VIRTIO, LEGACY], ids=lambda s: s.name)
def test_firmware_biostest_virtio_blk_only(platform, scenario, tmp_path_factory):
    """A machine whose only disks are virtio-blk boots the MBR of the first one through INT 13h
    (the BIOS's own virtqueue; modern or legacy interface), reads and writes it (LBA48 range
    included) like an IDE disk."""
    rep, disks = boot(scenario, platform, tmp_path_factory)
    assert_passed(rep)
    assert "LBA48 ok" in rep.lines
    assert sorted(rep.per_drive()) == ["80", "81", "82"][:len(disks)]
    assert_writes_landed(disks[0])
    for other in disks[1:]:
        assert other.read(0, 16) == bytes(16 * 512)


# ---- our BIOS describes the machine as SeaBIOS does -------------------------------------------

@requires_qemu_system
@pytest.mark.parametrize("scenario", [BASIC, MULTI, GEOMETRY, VIRTIO, LEGACY], ids=lambda s: s.name)
def test_firmware_disk_geometry_matches_seabios(scenario, tmp_path_factory):
    ours, _ = boot(scenario, OURS_ON_QEMU, tmp_path_factory)
    sea, _ = boot(scenario, SEABIOS_ON_QEMU, tmp_path_factory)
    assert_passed(ours)
    assert_passed(sea)
    mine, theirs = ours.per_drive(), sea.per_drive()
    # BASIC: the IDE disk is 80h and the virtio disk 81h with both firmwares (SeaBIOS orders
    # ATA before virtio-blk when no bootindex is given); every figure of both is the same.
    # DPTE lines are left out for virtio-blk: there is none (FFFF:FFFF), the line shows ROM bytes.
    for d in (mine, theirs):
        for drive in d.values():
            if "SCSI" in bytes.fromhex(drive.get("EDD4A", "")).decode("latin-1"):
                drive.pop("DPTE", None)
    assert mine and mine == theirs
    assert ours.values("EDD41") == sea.values("EDD41")
    assert ours.values("ERANGE") == sea.values("ERANGE") == ["AH=01"]
    assert ours.values("EFUNC") == sea.values("EFUNC") == ["AH=01"]
    # AH = 00 04 05 09 0C 0D 10 11 14 44 45 46 47 49 (+: CF set): all fine but eject
    assert ours.values("DMISC") == sea.values("DMISC") == [
        "00 00 00 00 00 00 00 00 00 00 00 B2+ 00 00"]
    # the drive refuses the sector past the end; an IDE disk has transferred the first sector
    # (one command per sector), a virtio-blk disk nothing (one request for both)
    done = "0000" if scenario in (VIRTIO, LEGACY) else "0001"
    assert ours.values("EPARTIAL") == sea.values("EPARTIAL") == [f"AH=0C count={done}"]


@requires_qemu_system
def test_firmware_geometry_figures(tmp_path_factory):
    """Exact INT 13h figures for QEMU's default geometries (no partition table on the disks)."""
    rep, _ = boot(MULTI, OURS_ON_QEMU, tmp_path_factory)
    d = rep.per_drive()
    # 200 GiB: IDENTIFY 16383/16/63, CMOS says LBA translation -> 1024/255/63
    assert hexfields(d["80"]["GEOM"]) == {"AX": 0, "CX": 0xFEFF, "DX": 0xFE03}
    assert hexfields(d["80"]["EDDP"])["sectors"] == 200 * GiB // 512
    assert hexfields(d["80"]["EDDP"])["flags"] == 0          # too big for CHS: geometry invalid
    # 1 GiB: 2080/16/63 physical, LBA translation -> 1024 (clipped)/32/63
    assert hexfields(d["81"]["GEOM"]) == {"AX": 0, "CX": 0xFEFF, "DX": 0x1F03}
    assert hexfields(d["81"]["EDDP"]) == {"flags": 2, "cyl": 2080, "heads": 16, "spt": 63,
                                          "sectors": GiB // 512, "bps": 512}
    # 8 MiB: 16/16/63, no translation; AH=08h reports the last cylinder minus the reserved one
    assert hexfields(d["82"]["GEOM"]) == {"AX": 0, "CX": 0x0E3F, "DX": 0x0F03}
    assert hexfields(d["82"]["TYPE"]) == {"CX": 0, "DX": 15 * 16 * 63}


@requires_qemu_system
def test_firmware_pci_matches_seabios(tmp_path_factory):
    ours, _ = boot(BASIC, OURS_ON_QEMU, tmp_path_factory)
    sea, _ = boot(BASIC, SEABIOS_ON_QEMU, tmp_path_factory)
    op, sp = ours.pci(), sea.pci()
    assert sorted(op) == sorted(sp) and len(op) >= 5
    for devfn in op:
        a, b = op[devfn], sp[devfn]
        assert (a["ID"], a["BARS"], a["ROM"], a["INT"]) == (b["ID"], b["BARS"], b["ROM"], b["INT"]), devfn
        # SeaBIOS's drivers turn bus mastering on for the devices they drive; we do for IDE
        assert int(a["CMD"], 16) & ~4 == int(b["CMD"], 16) & ~4, devfn
    assert ours.values("PIRQ") == sea.values("PIRQ") == ["0B0B0A0A ELCR 000C"]
    # INT 1Ah AH=B1h: install check, find device/class, config reads/writes, unknown function
    assert ours.values("PCIBIOS") == sea.values("PCIBIOS") == [
        "00:01,0210,00,20494350 00:0009 86+: 00:0009 00:70108086 00:0101 00:00 00: 00:05 81+:"]
    assert ours.values("IDETIM") == sea.values("IDETIM")
    assert int(ours.values("IDETIM")[0], 16) == 0x80008000
    ide = op["09"]
    assert int(ide["CMD"], 16) & 0x7 == 0x7                    # I/O, memory, bus master
    bar4 = int(ide["BARS"].split()[4], 16)
    assert bar4 & 1 and 0xC000 <= bar4 & ~3 < 0x10000          # BMDMA in the PCI I/O window
    virtio = next(v for v in op.values() if v["ID"].endswith("1AF4"))
    bars = [int(b, 16) for b in virtio["BARS"].split()]
    assert bars[0] & 1 and bars[0] & ~3 >= 0xC000               # legacy I/O BAR
    assert 0x80000000 <= bars[1] < 0xFEC00000                  # MMIO (MSI-X) BAR
    assert int(virtio["INT"], 16) & 0xFF in (10, 11)


# ---- memory map ---------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("scenario", [BASIC, MULTI, HIGHMEM, LOWMEM], ids=lambda s: s.name)
def test_firmware_e820_map(platform, scenario, tmp_path_factory):
    rep, _ = boot(scenario, platform, tmp_path_factory)
    assert_passed(rep)
    ram = scenario.ram
    low_ram = min(ram, 3 * GiB)             # i440FX: RAM past 3 GiB moves above 4 GiB
    entries = rep.e820()
    assert entries[0][0] == 0 and entries[0][2] == 1
    ends = [b + n for b, n, _ in entries]
    assert all(b >= e for (b, _, _), e in zip(entries[1:], ends))   # sorted, no overlap
    usable = [(b, n) for b, n, t in entries if t == 1]
    low = [(b, n) for b, n in usable if b < MiB]
    assert low == [(0, low[0][1])] and 0x9F000 <= low[0][1] <= 0xA0000
    high = [(b, n) for b, n in usable if b >= MiB]
    assert high[0][0] == MiB
    total = sum(n for b, n in high if b < 1 << 32)
    assert low_ram - 2 * MiB <= total + MiB <= low_ram          # the firmware may keep a bit
    assert sum(n for b, n in high if b >= 1 << 32) == ram - low_ram
    if ram > low_ram:
        assert (1 << 32, ram - low_ram, 1) in entries
    reserved = [(b, n) for b, n, t in entries if t == 2]
    assert any(b <= 0xF0000 and b + n >= 0x100000 for b, n in reserved)   # the BIOS below 1 MiB
    assert any(b + n == 1 << 32 for b, n in reserved)                     # ... and below 4 GiB
    if platform is not SEABIOS_ON_QEMU:                                   # ours: exact
        assert entries[:5] == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
                               (MiB, low_ram - MiB, 1), (0xFFFF0000, 0x10000, 2)]
        assert len(entries) == (5 if ram == low_ram else 6)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("scenario", [BASIC, MULTI, HIGHMEM, LOWMEM], ids=lambda s: s.name)
def test_firmware_legacy_memory_sizes(platform, scenario, tmp_path_factory):
    rep, _ = boot(scenario, platform, tmp_path_factory)
    ram = min(scenario.ram, 3 * GiB)        # what lies below 4 GiB
    e801 = hexfields(rep.values("E801")[0])
    assert e801["AX"] == e801["CX"] and e801["BX"] == e801["DX"]
    if ram > 16 * MiB:
        assert e801["AX"] == 15 * 1024
        assert ram - 2 * MiB <= 16 * MiB + e801["BX"] * 65536 <= ram
    else:
        assert e801["BX"] == 0 and ram - 2 * MiB <= MiB + e801["AX"] * 1024 <= ram
    ext_kb = hexfields(rep.values("MEM88")[0])["AX"]
    assert min(ram - 2 * MiB, 62 * MiB) <= ext_kb * 1024 <= min(ram - MiB, 63 * MiB)
    if platform is not SEABIOS_ON_QEMU:             # ours: exact (SeaBIOS keeps some RAM)
        assert ext_kb == min(ram - MiB, 63 * MiB) // 1024
        assert e801["BX"] == max(ram - 16 * MiB, 0) // 65536
    assert hexfields(rep.values("INT12")[0])["AX"] in range(600, 641)


# ---- clock ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
def test_firmware_rtc_time_and_date(platform, tmp_path_factory):
    rep, _ = boot(BASIC, platform, tmp_path_factory)
    now = dt.datetime.now(dt.timezone.utc)
    (time_s,), (date_s,) = rep.values("TIME"), rep.values("DATE")
    guest_date = dt.date(int(date_s[0:4]), int(date_s[5:7]), int(date_s[8:10]))
    assert abs((guest_date - now.date()).days) <= 1
    h, m, s = (int(x) for x in time_s.split(":"))
    guest_secs = h * 3600 + m * 60 + s
    host_secs = now.hour * 3600 + now.minute * 60 + now.second
    diff = abs(guest_secs - host_secs) % 86400
    assert min(diff, 86400 - diff) <= 120


# -rtc base=DATE, -boot once=/order=, -cpu max and -no-user-config: the guest's RTC starts at the
# date (the BIOS reads it from CMOS), and it still boots from the hard disk.
RTC_BASE = Scenario("rtcbase", 64, [("hd0.img", 16 * MiB, True, "if=ide", None, 0)],
                    extra=("-rtc", "base=2006-06-17T16:01:21,clock=vm", "-boot", "once=d,order=c",
                           "-cpu", "max", "-no-user-config"))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_firmware_rtc_base_date(platform, tmp_path_factory):
    rep, _ = boot(RTC_BASE, platform, tmp_path_factory)
    assert_passed(rep)
    assert rep.values("DATE") == ["2006-06-17"]
    h, m, s = (int(x) for x in rep.values("TIME")[0].split(":"))
    assert 0 <= (h * 3600 + m * 60 + s) - (16 * 3600 + 1 * 60 + 21) <= 120


# ---- no bootable disk -----------------------------------------------------------------------------

@requires_qemu_system
def test_firmware_halts_without_bootable_disk(tmp_path):
    blank = make_disk(tmp_path / "blank.img", 4 * MiB, boot=False)
    OURS_ON_QEMU_SHORT = Platform(OURS_ON_QEMU.name, OURS_ON_QEMU.argv, BIOS, timeout=15)
    rep = run(OURS_ON_QEMU_SHORT, [f"file={blank.path},format=raw,if=ide"],
              until="No bootable disk: halting.")
    assert "Disk 80h: no boot signature" in rep.output
    assert "No bootable disk: halting." in rep.output
    assert rep.alive_after_message                             # halted, not reset or exited
    rep = run(OURS_ON_QEMU_SHORT, [], until="No bootable disk: halting.")
    assert "No hard disks found" in rep.output
    assert "No bootable disk: halting." in rep.output


# ---- the binary ------------------------------------------------------------------------------------

def test_firmware_binary_is_built_from_source():
    out = subprocess.run([str(REPO / "scripts" / "build-firmware"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    image = BIOS.read_bytes()
    assert len(image) == 64 * 1024
    # F000:FFF0: JMP F000:post
    assert image[0xFFF0] == 0xEA and image[0xFFF3:0xFFF5] == b"\x00\xF0"


# ---- keyboard from COM1, INT 10h AH=13h -------------------------------------------------------------

@pytest.mark.parametrize("platform", [p for p in PLATFORMS if p.values[0].bios is not None],
                         ids=lambda p: p.name)
def test_firmware_keyboard_from_serial(platform, tmp_path):
    """INT 16h takes keys typed on COM1 (AH=01h peeks without consuming, AH=00h/10h take)."""
    import pexpect
    _usable(platform)
    img = tmp_path / "key.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(img), str(REPO / "firmware/tests/keytest.asm")],
                   check=True)
    with open(img, "r+b") as f:
        f.truncate(1 << 20)
    cmd = platform.command([f"file={img},format=raw,if=ide"])
    child = pexpect.spawn(cmd[0], cmd[1:], timeout=platform.timeout, encoding="latin-1")
    try:
        child.expect_exact("keytest ready")                   # printed with INT 10h AH=13h
        child.send("a")
        child.expect_exact("PEEK 0061")
        child.expect_exact("KEY 0061")
        child.send("\r")
        child.expect_exact("KEY 1C0D")                         # Enter: scan code 1Ch
        child.expect_exact("PASS")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 33


# ---- the CPU/platform test guests (guest-images/cpu) boot on our BIOS as on SeaBIOS -----------------

CPU_GUESTS = REPO / "guest-images" / "cpu"
#: their protocol (guest-images/cpu/README.md): last line PASS, isa-debug-exit value 0 -> status 1
CPU_GUEST_PASS = 1


def _cpu_guest_names() -> list[str]:
    return sorted(p.stem for p in CPU_GUESTS.glob("*.img") if p.stem != "bench")


@requires_qemu_system
@pytest.mark.parametrize("guest", _cpu_guest_names())
def test_firmware_runs_cpu_guests_like_seabios(guest, tmp_path):
    """Each guest leaves its verdict unchanged when our BIOS replaces SeaBIOS (the reset guest
    also reboots through our POST three times)."""
    def verdict(platform: Platform) -> tuple[int | None, str]:
        img = tmp_path / f"{guest}-{platform.name}.img"
        img.write_bytes((CPU_GUESTS / f"{guest}.img").read_bytes())
        quick = Platform(platform.name, platform.argv, platform.bios, qemu_extras=False,
                         timeout=60)
        rep = run(quick, [f"file={img},format=raw,if=ide"])
        last = next((ln for ln in reversed(rep.lines) if ln.strip()), "")
        return rep.status, last

    ours = verdict(OURS_ON_QEMU)
    if ours == (CPU_GUEST_PASS, "PASS"):
        return
    theirs = verdict(SEABIOS_ON_QEMU)
    if theirs != (CPU_GUEST_PASS, "PASS"):
        pytest.skip(f"{guest} does not pass on SeaBIOS either: {theirs}")
    pytest.fail(f"{guest}: {ours} with our BIOS, PASS with SeaBIOS")


# ---- hostile INT 15h AH=87h tables are refused, not a protected-mode fault ----------------------------

MOVE_PROBE = r"""
        bits    16
        org     0x7C00
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     di, 0x900
        mov     cx, 48
        rep     stosb
        mov     word [0x910], 0xFFFF        ; source: base 0, not present (access 13h)
        mov     byte [0x915], 0x13
        mov     word [0x918], 0xFFFF        ; destination: fine, 1 MiB
        mov     byte [0x91C], 0x10
        mov     byte [0x91D], 0x93
        call    move
        mov     byte [0x915], 0x9B          ; source: a code segment
        call    move
        mov     byte [0x915], 0x93          ; source: present data but only 16 bytes long
        mov     word [0x910], 0x000F
        call    move
        mov     word [0x910], 0xFFFF        ; all fine: must succeed
        call    move
        mov     dx, 0x501
        mov     al, 0x10
        out     dx, al
        hlt
move:   mov     si, 0x900
        mov     cx, 256
        mov     ah, 0x87
        int     0x15
        pushf
        mov     al, ah                      ; report "<AH><C|->"
        add     al, '0'
        mov     ah, 0x0E
        int     0x10
        popf
        mov     al, '-'
        jnc     .p
        mov     al, 'C'
.p:     mov     ah, 0x0E
        int     0x10
        ret
        times   510 - ($ - $$) db 0
        dw      0xAA55
"""


@pytest.mark.parametrize("platform", [p for p in PLATFORMS if p.values[0].bios is not None],
                         ids=lambda p: p.name)
def test_firmware_int15_move_refuses_bad_descriptors(platform, tmp_path):
    _usable(platform)
    src = tmp_path / "move.asm"
    src.write_text(MOVE_PROBE)
    img = tmp_path / "move.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(img), str(src)], check=True)
    with open(img, "r+b") as f:
        f.truncate(1 << 20)
    rep = run(platform, [f"file={img},format=raw,if=ide"])
    assert rep.status == 33, rep.output
    # not present, code, too short: AH=02h with CF; the good table: AH=0, no CF; no reset
    assert rep.output.endswith("2C2C2C0-"), rep.output[-200:]
    assert rep.output.count("emu BIOS") == 1


# ---- a transfer that real mode cannot hold is refused, not wrapped onto the IVT -------------------

HUGE_READ_PROBE = r"""
        bits    16
        org     0x7C00
        xor     ax, ax
        mov     ds, ax
        mov     word [0x600], 16            ; DAP: 0xFFFF sectors from LBA 0 to 1000:0000
        mov     word [0x602], 0xFFFF
        mov     dword [0x604], 0x10000000
        mov     dword [0x608], 0
        mov     dword [0x60C], 0
        mov     si, 0x600
        mov     ah, 0x42
        mov     dl, 0x80
        int     0x13
        mov     bl, 0x11                    ; fail unless CF and AH=01h
        jnc     .out
        cmp     ah, 0x01
        jne     .out
        mov     ax, 0x0E4F                  ; "OK" through INT 10h: the IVT is still there
        int     0x10
        mov     ax, 0x0E4B
        int     0x10
        mov     bl, 0x10
.out:   mov     al, bl
        mov     dx, 0x501
        out     dx, al
        hlt
        times   510 - ($ - $$) db 0
        dw      0xAA55
"""


@pytest.mark.parametrize("platform", [p for p in PLATFORMS if p.values[0].bios is not None],
                         ids=lambda p: p.name)
def test_firmware_refuses_transfer_beyond_real_mode_memory(platform, tmp_path):
    _usable(platform)
    src = tmp_path / "huge.asm"
    src.write_text(HUGE_READ_PROBE)
    img = tmp_path / "huge.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(img), str(src)], check=True)
    with open(img, "r+b") as f:
        f.truncate(64 << 20)                        # big enough for the 32 MiB asked for
    rep = run(platform, [f"file={img},format=raw,if=ide"])
    assert rep.status == 33 and rep.output.endswith("OK"), rep.output[-300:]

"""MC146818 real-time clock and CMOS RAM at 0x70 (index, bit 7 = NMI disable) / 0x71 (data).

Time of day starts at the host's UTC time and then runs on the VM's virtual clock,
so it stops while the VM is paused and tests can step it exactly (QEMU's
``-rtc clock=vm``; QEMU's default follows the host clock through pauses).
The guest sees it in BCD or binary (register B DM), 12 or 24 hour (register B 24/12),
with the century in CMOS 0x32 as SeaBIOS and Linux expect.

Interrupts on IRQ 8 (Motorola MC146818A datasheet):

* periodic (PF / PIE) at the rate in register A (32768 >> (rate - 1) Hz); as on QEMU
  its timer (and so PF) only runs while PIE is set;
* update-ended (UF / UIE) once per second, and alarm (AF / AIE) when hours,
  minutes and seconds match the alarm registers (values 0xC0-0xFF are "don't care");
* register C read returns and clears the flags and lowers IRQ 8.

UIP (register A bit 7) is set for the 244 µs before each update, as on the chip.
Register D always reports valid RAM and time (VRT).  Setting SET in register B (or
holding the divider in reset) stops the registers so the guest can write them;
clearing it restarts the time from what was written, decoded in the format it was
written in and keeping the sub-second phase (half a second after a divider reset),
as QEMU 7.2 does (compared by tests/unit/hw/test_hw_qemu_compare.py).

:meth:`Rtc.set_pc_config` fills the CMOS fields that QEMU's pc machine fills and
firmware reads (memory sizes, boot order, equipment, hard disk types and geometry, CPUs).
"""

from __future__ import annotations

import calendar
import threading
import time
from typing import Sequence

from emu.errors import ConfigError
from emu.hw.bus import IOBus
from emu.hw.clock import NS_PER_SEC, VirtualClock
from emu.hw.irq import IrqLine

RTC_BASE = 0x70
RTC_ISA_IRQ = 8

RTC_SECONDS = 0
RTC_SECONDS_ALARM = 1
RTC_MINUTES = 2
RTC_MINUTES_ALARM = 3
RTC_HOURS = 4
RTC_HOURS_ALARM = 5
RTC_DAY_OF_WEEK = 6
RTC_DAY_OF_MONTH = 7
RTC_MONTH = 8
RTC_YEAR = 9
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32  # IBM century byte (ACPI FADT "century" points here on QEMU)
RTC_PS2_CENTURY = 0x37  # IBM PS/2 century byte; QEMU keeps it equal to 0x32

REG_A_UIP = 0x80
REG_A_DV_MASK = 0x70
REG_A_RATE_MASK = 0x0F

REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04  # 1 = binary, 0 = BCD
REG_B_24H = 0x02
REG_B_DSE = 0x01

REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10

REG_D_VRT = 0x80

RTC_FREQ = 32768
#: UIP is high for 244 µs (8 cycles of the 32.768 kHz time base) before each update.
UIP_HOLD_NS = 8 * NS_PER_SEC // RTC_FREQ
CMOS_SIZE = 128

# CMOS fields of QEMU's pc machine (hw/i386/pc.c pc_cmos_init / pc_cmos_init_late).
CMOS_FLOPPY_TYPES = 0x10
CMOS_HD_TYPES = 0x12
CMOS_EQUIPMENT = 0x14
CMOS_BASE_MEM_LO = 0x15
CMOS_BASE_MEM_HI = 0x16
CMOS_EXT_MEM_LO = 0x17
CMOS_EXT_MEM_HI = 0x18
CMOS_HD0_EXT_TYPE = 0x19
CMOS_HD1_EXT_TYPE = 0x1A
CMOS_HD0_INFO = 0x1B
CMOS_HD1_INFO = 0x24
CMOS_EXT_MEM2_LO = 0x30
CMOS_EXT_MEM2_HI = 0x31
CMOS_MEM_ABOVE_16M_LO = 0x34
CMOS_MEM_ABOVE_16M_HI = 0x35
CMOS_BOOT_THIRD_FDCHK = 0x38
CMOS_HD_TRANSLATION = 0x39
CMOS_BOOT_FIRST_SECOND = 0x3D
CMOS_MEM_ABOVE_4G = 0x5B  # 3 bytes, 64 KiB units
CMOS_CPU_COUNT = 0x5F
BOOT_DEVICE_CODES = {"a": 1, "b": 1, "c": 2, "d": 3, "n": 4}
# CMOS 0x39 translation codes, two bits per IDE drive (QEMU's BIOS_ATA_TRANSLATION_* minus 1).
CMOS_TRANS_NONE = 0
CMOS_TRANS_LBA = 1
CMOS_TRANS_LARGE = 2
CMOS_TRANS_RECHS = 3

KIB = 1024
MIB = 1024 * KIB


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return ((v >> 4) & 0x0F) * 10 + (v & 0x0F)


class Rtc:
    """The MC146818 with its 128 bytes of CMOS RAM.

    :param clock: the VM's virtual clock.
    :param irq: ISA IRQ 8.
    :param start_time: initial time of day as UTC epoch seconds (default: the host's now).
    """

    io_max_size = 1
    name = "rtc"

    def __init__(self, clock: VirtualClock, irq: IrqLine | None, start_time: float | None = None) -> None:
        self.clock = clock
        self.irq = irq
        self._lock = threading.RLock()
        self.cmos = bytearray(CMOS_SIZE)
        self._stored_key: tuple[int, int] | None = None
        self.index = 0
        self.nmi_disabled = False
        self._periodic_timer = clock.timer(self._on_periodic)
        self._second_timer = clock.timer(self._on_second)
        t = time.time() if start_time is None else start_time
        self._set_base(int(t * NS_PER_SEC))
        self.cmos[RTC_REG_A] = 0x26  # 32.768 kHz divider, 1024 Hz rate (the chip's usual setting)
        self.cmos[RTC_REG_B] = REG_B_24H
        self.cmos[RTC_REG_D] = REG_D_VRT
        self._arm_second()

    def register(self, bus: IOBus) -> None:
        """Claim 0x70-0x71."""
        bus.register_ports(RTC_BASE, 2, self, "rtc")

    # ---- time base ------------------------------------------------------------------------------

    def _set_base(self, rtc_ns: int) -> None:
        """Make the time of day ``rtc_ns`` (UTC epoch ns) at the current virtual time."""
        self._base_rtc_ns = rtc_ns
        self._base_vns = self.clock.now()

    def _running(self) -> bool:
        return not self.cmos[RTC_REG_B] & REG_B_SET and (self.cmos[RTC_REG_A] & REG_A_DV_MASK) <= 0x20

    def now_ns(self) -> int:
        """The RTC's time base as UTC epoch ns.  It keeps running while SET or a divider reset
        stops the registers (as on QEMU); the registers are reloaded from it when they restart."""
        return self._base_rtc_ns + (self.clock.now() - self._base_vns)

    @staticmethod
    def _ticks(vns: int) -> int:
        return vns * RTC_FREQ // NS_PER_SEC

    # ---- encoding -------------------------------------------------------------------------------

    def _enc(self, v: int) -> int:
        return v if self.cmos[RTC_REG_B] & REG_B_DM else _to_bcd(v)

    def _dec(self, v: int) -> int:
        return v if self.cmos[RTC_REG_B] & REG_B_DM else _from_bcd(v)

    def _enc_hour(self, hour: int) -> int:
        if self.cmos[RTC_REG_B] & REG_B_24H:
            return self._enc(hour)
        h12 = hour % 12 or 12
        return self._enc(h12) | (0x80 if hour >= 12 else 0)

    def _dec_hour(self, v: int) -> int:
        if self.cmos[RTC_REG_B] & REG_B_24H:
            return self._dec(v & 0x7F)
        hour = self._dec(v & 0x7F) % 12
        return hour + 12 if v & 0x80 else hour

    def _store_time(self, force: bool = False) -> None:
        """Copy the current time of day into registers 0-9 and the century byte."""
        sec = self.now_ns() // NS_PER_SEC
        key = (sec, self.cmos[RTC_REG_B] & (REG_B_DM | REG_B_24H))
        if key == self._stored_key and not force:
            return  # registers already hold this second (a guest polls them in loops)
        self._stored_key = key
        tm = time.gmtime(sec)
        c = self.cmos
        c[RTC_SECONDS] = self._enc(tm.tm_sec)
        c[RTC_MINUTES] = self._enc(tm.tm_min)
        c[RTC_HOURS] = self._enc_hour(tm.tm_hour)
        c[RTC_DAY_OF_WEEK] = self._enc((tm.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        c[RTC_DAY_OF_MONTH] = self._enc(tm.tm_mday)
        c[RTC_MONTH] = self._enc(tm.tm_mon)
        c[RTC_YEAR] = self._enc(tm.tm_year % 100)
        c[RTC_CENTURY] = c[RTC_PS2_CENTURY] = self._enc(tm.tm_year // 100)

    def _load_time(self, fraction: int | None = None) -> None:
        """Restart the clock from registers 0-9 (after SET is cleared or a time register is written).

        :param fraction: sub-second phase (ns) of the new time; by default the old one is kept,
            so updates stay on the same phase (QEMU's ``offset``).
        """
        if fraction is None:
            fraction = self.now_ns() % NS_PER_SEC
        c = self.cmos
        try:
            year = self._dec(c[RTC_CENTURY]) * 100 + self._dec(c[RTC_YEAR])
            if year < 1970:
                year = 2000 + self._dec(c[RTC_YEAR]) % 100
            secs = calendar.timegm(
                (
                    year,
                    max(1, min(12, self._dec(c[RTC_MONTH]))),
                    max(1, min(31, self._dec(c[RTC_DAY_OF_MONTH]))),
                    min(23, self._dec_hour(c[RTC_HOURS])),
                    min(59, self._dec(c[RTC_MINUTES])),
                    min(59, self._dec(c[RTC_SECONDS])),
                )
            )
        except (ValueError, OverflowError):
            return  # nonsense from the guest: keep the old time, as a chip would keep counting
        self._set_base(secs * NS_PER_SEC + fraction)
        self._stored_key = None

    # ---- interrupts -----------------------------------------------------------------------------

    def _raise_flags(self, flags: int) -> None:
        c = self.cmos
        c[RTC_REG_C] |= flags
        enabled = (c[RTC_REG_B] & (REG_B_PIE | REG_B_AIE | REG_B_UIE)) & c[RTC_REG_C]
        if enabled and not c[RTC_REG_C] & REG_C_IRQF:
            c[RTC_REG_C] |= REG_C_IRQF
            if self.irq is not None:
                self.irq.raise_()

    def _period_ticks(self) -> int:
        rate = self.cmos[RTC_REG_A] & REG_A_RATE_MASK
        if rate == 0 or (self.cmos[RTC_REG_A] & REG_A_DV_MASK) != 0x20:
            return 0
        if rate <= 2:
            rate += 7  # rates 1 and 2 alias 8 and 9 with a 32.768 kHz time base
        return 1 << (rate - 1)

    def _arm_periodic(self) -> None:
        period = self._period_ticks()
        if not period or not self.cmos[RTC_REG_B] & REG_B_PIE:
            self._periodic_timer.cancel()
            return
        nxt = (self._ticks(self.clock.now()) // period + 1) * period
        self._periodic_timer.mod(-(-nxt * NS_PER_SEC // RTC_FREQ))

    def _on_periodic(self) -> None:
        with self._lock:
            if self._periodic_timer.pending:
                return  # re-armed meanwhile (rate or PIE changed): this expiry is stale
            self._raise_flags(REG_C_PF)
            self._arm_periodic()

    def _arm_second(self) -> None:
        """Arm the once-a-second update at the next second boundary of the time of day."""
        if not self._running():
            self._second_timer.cancel()
            return
        into = self.now_ns() % NS_PER_SEC
        self._second_timer.mod(self.clock.now() + NS_PER_SEC - into)

    def _on_second(self) -> None:
        with self._lock:
            if self._second_timer.pending or not self._running():
                return
            flags = REG_C_UF
            self._store_time()
            c = self.cmos
            if (
                self._alarm_match(c[RTC_SECONDS_ALARM], c[RTC_SECONDS])
                and self._alarm_match(c[RTC_MINUTES_ALARM], c[RTC_MINUTES])
                and self._alarm_match(c[RTC_HOURS_ALARM], c[RTC_HOURS])
            ):
                flags |= REG_C_AF
            self._raise_flags(flags)
            self._arm_second()

    @staticmethod
    def _alarm_match(alarm: int, value: int) -> bool:
        return alarm & 0xC0 == 0xC0 or alarm == value

    def _uip(self) -> bool:
        if not self._running():
            return False
        return self.now_ns() % NS_PER_SEC >= NS_PER_SEC - UIP_HOLD_NS

    # ---- guest ports ----------------------------------------------------------------------------

    # Even offsets are the index port, odd ones the data port (QEMU's cmos_ioport_read/write
    # test ``addr & 1``: a wide access split into bytes alternates between the two).
    def io_read(self, offset: int, size: int) -> int:
        if not offset & 1:
            return 0xFF  # the index register is write-only
        with self._lock:
            return self.read_cmos(self.index)

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if not offset & 1:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & 0x80)
            else:
                self.write_cmos(self.index, value)

    def read_cmos(self, index: int) -> int:
        """Guest read of CMOS/RTC register ``index`` (0-127)."""
        c = self.cmos
        if index <= RTC_YEAR or index == RTC_CENTURY or index == RTC_PS2_CENTURY:
            if self._running():
                self._store_time()
            return c[index]
        if index == RTC_REG_A:
            return c[RTC_REG_A] | (REG_A_UIP if self._uip() else 0)
        if index == RTC_REG_C:
            # PF only runs while PIE is set, as on QEMU (whose periodic timer needs PIE).
            val = c[RTC_REG_C]
            c[RTC_REG_C] = 0
            if val & REG_C_IRQF and self.irq is not None:
                self.irq.lower()
            return val
        if index == RTC_REG_D:
            return REG_D_VRT
        return c[index]

    def write_cmos(self, index: int, value: int) -> None:
        """Guest write of CMOS/RTC register ``index``."""
        c = self.cmos
        if index in (RTC_SECONDS_ALARM, RTC_MINUTES_ALARM, RTC_HOURS_ALARM):
            c[index] = value
        elif index <= RTC_YEAR or index == RTC_CENTURY:
            if self._running():
                self._store_time()
            c[index] = value
            self._stored_key = None
            if self._running():
                self._load_time()
                self._arm_second()
        elif index == RTC_REG_A:
            old = c[RTC_REG_A]
            if value & 0x60 == 0x60:
                if self._running():
                    self._store_time()  # registers hold the time the divider stopped at
            elif old & 0x60 == 0x60 and value & 0x70 <= 0x20 and not c[RTC_REG_B] & REG_B_SET:
                c[RTC_REG_A] = value & 0x7F
                self._load_time(fraction=NS_PER_SEC // 2)  # first update half a second later
            c[RTC_REG_A] = value & 0x7F
            self._arm_second()
            self._arm_periodic()
        elif index == RTC_REG_B:
            old = c[RTC_REG_B]
            if value & REG_B_SET:
                if self._running():
                    self._store_time()  # the registers freeze at the current time, in the old format
                value &= ~REG_B_UIE  # setting SET clears UIE (datasheet)
            elif old & REG_B_SET and (c[RTC_REG_A] & REG_A_DV_MASK) <= 0x20:
                self._load_time()  # decoded in the format the guest wrote them in (the old B)
            c[RTC_REG_B] = value
            self._stored_key = None
            self._arm_second()
            self._arm_periodic()
            # Enabling an interrupt whose flag is already up asserts IRQ 8 at once.
            self._raise_flags(0)
        elif index in (RTC_REG_C, RTC_REG_D):
            pass  # read-only
        else:
            c[index] = value

    # ---- machine configuration ------------------------------------------------------------------

    def set_pc_config(
        self,
        ram_size: int,
        hard_disks: Sequence[tuple[int, ...] | None] = (),
        boot_order: str = "cad",
        smp_cpus: int = 1,
        below_4g_mem_size: int | None = None,
    ) -> None:
        """Fill the CMOS fields QEMU's pc machine sets for firmware.

        :param ram_size: guest RAM in bytes.
        :param hard_disks: per IDE drive (primary master, primary slave, secondary master,
            secondary slave) its CHS geometry ``(cylinders, heads, sectors)`` or
            ``(cylinders, heads, sectors, translation)`` with a ``CMOS_TRANS_*`` code (default:
            QEMU's automatic choice), or None for no drive.  All four set the translation
            byte 0x39; the first two also the type/geometry fields.
        :param boot_order: QEMU ``-boot order=`` letters, at most 3 (a/b floppy, c disk, d cd, n net).
        :param smp_cpus: number of CPUs.
        :param below_4g_mem_size: RAM below 4 GiB; default as QEMU's i440FX splits it.
        :raises ConfigError: for a boot order QEMU refuses.
        """
        if below_4g_mem_size is None:
            below_4g_mem_size = ram_size if ram_size < 0xE0000000 else 0xC0000000
        above_4g = max(ram_size - below_4g_mem_size, 0)
        with self._lock:
            c = self.cmos
            base_kb = min(below_4g_mem_size // KIB, 640)
            c[CMOS_BASE_MEM_LO] = base_kb & 0xFF
            c[CMOS_BASE_MEM_HI] = base_kb >> 8
            ext = min((below_4g_mem_size - MIB) // KIB, 65535) if below_4g_mem_size > MIB else 0
            c[CMOS_EXT_MEM_LO] = c[CMOS_EXT_MEM2_LO] = ext & 0xFF
            c[CMOS_EXT_MEM_HI] = c[CMOS_EXT_MEM2_HI] = ext >> 8
            above16 = min((below_4g_mem_size - 16 * MIB) // (64 * KIB), 65535) if below_4g_mem_size > 16 * MIB else 0
            c[CMOS_MEM_ABOVE_16M_LO] = above16 & 0xFF
            c[CMOS_MEM_ABOVE_16M_HI] = above16 >> 8
            high = above_4g // (64 * KIB)
            c[CMOS_MEM_ABOVE_4G] = high & 0xFF
            c[CMOS_MEM_ABOVE_4G + 1] = (high >> 8) & 0xFF
            c[CMOS_MEM_ABOVE_4G + 2] = (high >> 16) & 0xFF
            c[CMOS_CPU_COUNT] = max(smp_cpus - 1, 0) & 0xFF
            self.set_boot_order(boot_order)
            c[CMOS_EQUIPMENT] = 0x02 | 0x04  # FPU present, PS/2 mouse; no floppy drives
            c[CMOS_FLOPPY_TYPES] = 0
            disks = list(hard_disks) + [None] * (4 - len(hard_disks))
            trans = 0
            for i, geom in enumerate(disks[:4]):
                if geom is not None:
                    cyls, heads, secs = geom[:3]
                    if len(geom) > 3:
                        code = geom[3] & 3  # the IDE layer's choice (QEMU's BIOS_ATA_TRANSLATION_* - 1)
                    else:
                        # QEMU's automatic choice: none if it fits CHS 1024/16/63, else LBA.
                        code = CMOS_TRANS_LBA if cyls > 1024 or heads > 16 or secs > 63 else CMOS_TRANS_NONE
                    trans |= code << (i * 2)
            c[CMOS_HD_TRANSLATION] = trans
            hd_types = 0
            for i, (type_ofs, info_ofs) in enumerate(((CMOS_HD0_EXT_TYPE, CMOS_HD0_INFO), (CMOS_HD1_EXT_TYPE, CMOS_HD1_INFO))):
                geom = disks[i]
                if geom is None:
                    c[type_ofs] = 0
                    continue
                cyls, heads, secs = geom[:3]
                hd_types |= 0xF0 if i == 0 else 0x0F
                c[type_ofs] = 47  # "user defined" type: geometry follows
                c[info_ofs + 0] = cyls & 0xFF
                c[info_ofs + 1] = (cyls >> 8) & 0xFF
                c[info_ofs + 2] = heads & 0xFF
                c[info_ofs + 3] = 0xFF  # write precompensation: none
                c[info_ofs + 4] = 0xFF
                c[info_ofs + 5] = 0xC0 | ((1 if heads > 8 else 0) << 3)
                c[info_ofs + 6] = cyls & 0xFF  # landing zone
                c[info_ofs + 7] = (cyls >> 8) & 0xFF
                c[info_ofs + 8] = secs & 0xFF
            c[CMOS_HD_TYPES] = hd_types

    def set_boot_order(self, order: str) -> None:
        """CMOS 0x3D/0x38 from QEMU boot letters (e.g. ``"cad"``), as QEMU's set_boot_dev.

        :raises ConfigError: QEMU's messages for too many or unknown devices.
        """
        if len(order) > 3:
            raise ConfigError("Too many boot devices for PC")
        codes = [0, 0, 0]
        for i, letter in enumerate(order):
            code = BOOT_DEVICE_CODES.get(letter)
            if code is None:
                raise ConfigError(f"Invalid boot device for PC: '{letter}'")
            codes[i] = code
        with self._lock:
            self.cmos[CMOS_BOOT_FIRST_SECOND] = (codes[1] << 4) | codes[0]
            self.cmos[CMOS_BOOT_THIRD_FDCHK] = codes[2] << 4  # low bit 0: floppy signature check on

    def reset(self) -> None:
        """System reset: PIE/AIE/SQWE and the flags cleared, as QEMU (time, UIE and CMOS RAM survive)."""
        with self._lock:
            self.cmos[RTC_REG_B] &= ~(REG_B_PIE | REG_B_AIE | REG_B_SQWE)
            self.cmos[RTC_REG_C] = 0
            if self.irq is not None:
                self.irq.lower()
            self._arm_periodic()
            self._arm_second()

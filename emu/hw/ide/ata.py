"""ATA definitions: register bits, command opcodes, IDENTIFY DEVICE data and disk geometry.

Names follow QEMU's hw/ide (``READY_STAT``, ``ABRT_ERR``, ``WIN_READ``...) so the two can
be read side by side; values are the ATA/ATAPI-6 specification's.  The IDENTIFY words are
the ones QEMU 7.2's ``ide_identify()`` fills for an ``ide-hd`` (checked word for word
against a dump taken from qemu-system-x86_64 7.2, see tests/unit/ide).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR_SIZE = 512
SECTOR_BITS = 9
#: READ/WRITE MULTIPLE block size limit (QEMU's MAX_MULT_SECTORS).
MAX_MULT_SECTORS = 16

# ---- status register (ATA-6 6.15) -------------------------------------------------------
ERR_STAT = 0x01
INDEX_STAT = 0x02
ECC_STAT = 0x04  # corrected data (obsolete)
DRQ_STAT = 0x08
SEEK_STAT = 0x10  # DSC: device seek complete
SRV_STAT = 0x10
WRERR_STAT = 0x20  # DF: device fault
READY_STAT = 0x40  # DRDY
BUSY_STAT = 0x80

# ---- error register ---------------------------------------------------------------------
MARK_ERR = 0x01  # after EXECUTE DEVICE DIAGNOSTIC: "device 0 passed"
TRK0_ERR = 0x02
ABRT_ERR = 0x04
MCR_ERR = 0x08
IDNF_ERR = 0x10
MC_ERR = 0x20
UNC_ERR = 0x40
BBD_ERR = 0x80

# ---- device/head register ---------------------------------------------------------------
ATA_DEV_HS = 0x0F  # head select / LBA bits 27-24
ATA_DEV_LBA_MSB = 0x0F
ATA_DEV_SELECT = 0x10  # DEV: 0 master, 1 slave
ATA_DEV_LBA = 0x40
ATA_DEV_ALWAYS_ON = 0xA0  # obsolete bits 7 and 5 read as one

# ---- device control register (0x3F6 / 0x376) --------------------------------------------
IDE_CTRL_DISABLE_IRQ = 0x02  # nIEN
IDE_CTRL_RESET = 0x04  # SRST
IDE_CTRL_HOB = 0x80  # high order byte readback (LBA48)

# ---- command opcodes (ATA-6 table 10) ----------------------------------------------------
WIN_NOP = 0x00
WIN_DSM = 0x06
WIN_DEVICE_RESET = 0x08
WIN_RECAL = 0x10
WIN_READ = 0x20
WIN_READ_ONCE = 0x21
WIN_READ_EXT = 0x24
WIN_READDMA_EXT = 0x25
WIN_READ_NATIVE_MAX_EXT = 0x27
WIN_MULTREAD_EXT = 0x29
WIN_WRITE = 0x30
WIN_WRITE_ONCE = 0x31
WIN_WRITE_EXT = 0x34
WIN_WRITEDMA_EXT = 0x35
WIN_MULTWRITE_EXT = 0x39
WIN_WRITE_VERIFY = 0x3C
WIN_VERIFY = 0x40
WIN_VERIFY_ONCE = 0x41
WIN_VERIFY_EXT = 0x42
WIN_SEEK = 0x70
WIN_DIAGNOSE = 0x90
WIN_SPECIFY = 0x91  # INITIALIZE DEVICE PARAMETERS
WIN_STANDBYNOW2 = 0x94
WIN_IDLEIMMEDIATE2 = 0x95
WIN_STANDBY2 = 0x96
WIN_SETIDLE2 = 0x97
WIN_CHECKPOWERMODE2 = 0x98
WIN_SLEEPNOW2 = 0x99
WIN_PACKETCMD = 0xA0
WIN_PIDENTIFY = 0xA1
WIN_SMART = 0xB0
WIN_MULTREAD = 0xC4
WIN_MULTWRITE = 0xC5
WIN_SETMULT = 0xC6
WIN_READDMA = 0xC8
WIN_READDMA_ONCE = 0xC9
WIN_WRITEDMA = 0xCA
WIN_WRITEDMA_ONCE = 0xCB
WIN_STANDBYNOW1 = 0xE0
WIN_IDLEIMMEDIATE = 0xE1
WIN_STANDBY = 0xE2
WIN_SETIDLE1 = 0xE3
WIN_CHECKPOWERMODE1 = 0xE5
WIN_SLEEPNOW1 = 0xE6
WIN_FLUSH_CACHE = 0xE7
WIN_FLUSH_CACHE_EXT = 0xEA
WIN_IDENTIFY = 0xEC
WIN_SETFEATURES = 0xEF
WIN_READ_NATIVE_MAX = 0xF8

# SET FEATURES subcommands (feature register)
SETFEATURES_EN_WCACHE = 0x02
SETFEATURES_XFER = 0x03
SETFEATURES_DIS_WCACHE = 0x82
#: subcommands QEMU accepts and ignores (look-ahead, APM, AAM, defaults, vendor NOPs)
SETFEATURES_IGNORED = frozenset((0xCC, 0x66, 0xAA, 0x55, 0x05, 0x85, 0x69, 0x67, 0x96, 0x9A, 0x42, 0xC2))

# ---- BIOS CHS translation (QEMU's BIOS_ATA_TRANSLATION_*) -------------------------------
BIOS_ATA_TRANSLATION_AUTO = 0
BIOS_ATA_TRANSLATION_NONE = 1
BIOS_ATA_TRANSLATION_LBA = 2
BIOS_ATA_TRANSLATION_LARGE = 3
BIOS_ATA_TRANSLATION_RECHS = 4

#: QEMU's default ``x-hw-version`` string, IDENTIFY's firmware revision for the pc machine.
QEMU_HW_VERSION = "2.5+"
DEFAULT_MODEL = "QEMU HARDDISK"


@dataclass(frozen=True)
class Geometry:
    """Physical CHS geometry and the BIOS translation QEMU would pick.

    :param cylinders: 1..16383.
    :param heads: 1..16.
    :param sectors: sectors per track, 1..63.
    :param translation: ``BIOS_ATA_TRANSLATION_*`` (never AUTO).
    """

    cylinders: int
    heads: int
    sectors: int
    translation: int

    @property
    def cmos_translation(self) -> int:
        """The 2-bit value a PC writes to CMOS 0x39 for this disk (translation - 1)."""
        return self.translation - 1


def _chs_for_size(nb_sectors: int) -> tuple[int, int, int]:
    cylinders = min(max(nb_sectors // (16 * 63), 2), 16383)
    return cylinders, 16, 63


def _lchs_from_mbr(mbr: bytes, nb_sectors: int) -> tuple[int, int, int] | None:
    """The logical geometry an MBR's partition ends imply (QEMU's guess_disk_lchs)."""
    if len(mbr) < SECTOR_SIZE or mbr[510] != 0x55 or mbr[511] != 0xAA:
        return None
    for i in range(4):
        entry = mbr[0x1BE + 16 * i : 0x1BE + 16 * (i + 1)]
        end_head, end_sector = entry[5], entry[6]
        nr_sects = struct.unpack_from("<I", entry, 12)[0]
        if nr_sects and end_head:
            heads = end_head + 1
            sectors = end_sector & 63
            if sectors == 0:
                continue
            cylinders = nb_sectors // (heads * sectors)
            if cylinders < 1 or cylinders > 16383:
                continue
            return cylinders, heads, sectors
    return None


def guess_geometry(nb_sectors: int, mbr: bytes | None) -> Geometry:
    """QEMU's ``hd_geometry_guess()`` for a disk of ``nb_sectors`` whose sector 0 is ``mbr``.

    A partition table whose entries end on a cylinder boundary gives the geometry (and no
    translation) when it has at most 16 heads; otherwise the standard 16/63 geometry.
    """
    lchs = _lchs_from_mbr(mbr, nb_sectors) if mbr is not None else None
    if lchs is None:
        c, h, s = _chs_for_size(nb_sectors)
        trans = BIOS_ATA_TRANSLATION_NONE if c <= 1024 and h <= 16 and s <= 63 else BIOS_ATA_TRANSLATION_LBA
        return Geometry(c, h, s, trans)
    if lchs[1] > 16:
        c, h, s = _chs_for_size(nb_sectors)
        trans = BIOS_ATA_TRANSLATION_LARGE if c * h <= 131072 else BIOS_ATA_TRANSLATION_LBA
        return Geometry(c, h, s, trans)
    return Geometry(lchs[0], lchs[1], lchs[2], BIOS_ATA_TRANSLATION_NONE)


def _put_string(words: list[int], first: int, text: str, nbytes: int) -> None:
    """ATA string: space padded, the two bytes of each word swapped (QEMU's padstr)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    for i in range(0, nbytes, 2):
        words[first + i // 2] = raw[i] << 8 | raw[i + 1]


def identify_words(
    nb_sectors: int,
    geometry: Geometry,
    serial: str,
    model: str = DEFAULT_MODEL,
    version: str = QEMU_HW_VERSION,
    mult_sectors: int = MAX_MULT_SECTORS,
    write_cache: bool = True,
) -> list[int]:
    """The 256 IDENTIFY DEVICE words QEMU 7.2 reports for an ``ide-hd``.

    :param nb_sectors: capacity in 512-byte sectors.
    :param serial: serial number (QEMU: ``QM%05d``, numbered from 1 in creation order).
    :param mult_sectors: current READ/WRITE MULTIPLE block size (word 59).
    :param write_cache: write cache enabled (word 85 bit 5).
    """
    w = [0] * 256
    c, h, s = geometry.cylinders, geometry.heads, geometry.sectors
    w[0] = 0x0040  # fixed device
    w[1] = c
    w[3] = h
    w[4] = (512 * s) & 0xFFFF  # retired: bytes per track
    w[5] = 512  # retired: bytes per sector
    w[6] = s
    _put_string(w, 10, serial, 20)
    w[20] = 3  # retired: buffer type
    w[21] = 512  # retired: buffer size in sectors
    w[22] = 4  # obsolete: ECC bytes
    _put_string(w, 23, version, 8)
    _put_string(w, 27, model, 40)
    w[47] = 0x8000 | MAX_MULT_SECTORS
    w[48] = 1  # dword I/O
    w[49] = (1 << 11) | (1 << 9) | (1 << 8)  # IORDY, LBA, DMA
    w[51] = 0x200  # PIO timing mode
    w[52] = 0x200  # DMA timing mode
    w[53] = 1 | (1 << 1) | (1 << 2)  # words 54-58, 64-70 and 88 valid
    w[54] = c
    w[55] = h
    w[56] = s
    oldsize = (c * h * s) & 0xFFFFFFFF
    w[57] = oldsize & 0xFFFF
    w[58] = oldsize >> 16
    if mult_sectors:
        w[59] = 0x100 | mult_sectors
    lba28 = min(nb_sectors, (1 << 28) - 1)
    w[60] = lba28 & 0xFFFF
    w[61] = lba28 >> 16
    w[62] = 0x07  # single word DMA 0-2
    w[63] = 0x07  # multiword DMA 0-2
    w[64] = 0x03  # PIO 3-4
    w[65] = w[66] = w[67] = w[68] = 120
    w[69] = 1 << 14  # deterministic read after TRIM (discard granularity 512)
    w[80] = 0xF0  # ATA-4 .. ATA-7
    w[81] = 0x16
    w[82] = (1 << 14) | (1 << 5) | 1  # NOP, write cache, SMART supported
    w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE EXT, FLUSH CACHE, LBA48
    w[84] = 1 << 14
    w[85] = (1 << 14) | ((1 << 5) if write_cache else 0) | 1
    w[86] = (1 << 13) | (1 << 12) | (1 << 10)
    w[87] = 1 << 14
    w[88] = 0x3F | (1 << 13)  # UDMA 0-5 supported, UDMA5 selected
    w[93] = 1 | (1 << 14) | 0x2000  # hardware reset result
    for i in range(4):
        w[100 + i] = (nb_sectors >> (16 * i)) & 0xFFFF
    w[106] = 0x6000  # logical sector = physical sector = 512 bytes
    w[169] = 1  # DATA SET MANAGEMENT TRIM supported
    return w


def words_to_bytes(words: list[int]) -> bytes:
    """Little-endian byte image of IDENTIFY words (what the data port delivers)."""
    return struct.pack("<256H", *words)

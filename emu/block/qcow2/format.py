"""On-disk layout of qcow2 (QEMU docs/interop/qcow2.txt): constants, structs, parse/serialise.

Everything here is pure: bytes in, record objects out (and back).  Names follow the
spec and QEMU's ``qcow2.h`` so a reader can grep either.  Every parse function
validates what it can check locally and raises :class:`~emu.errors.ImageFormatError`
with a one-line message (QEMU's text where QEMU has one); checks that need the
file size (offsets past EOF, overlaps) live in the driver.
"""

from __future__ import annotations

import struct

from emu.errors import ImageFormatError


class _Record:
    """Field-wise ``==`` and ``repr`` for the plain record classes below: what ``@dataclass``
    gave them, without importing dataclasses (and inspect) on every emu-img start-up."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a non-frozen dataclass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields) + ")"

# --- header ----------------------------------------------------------------------------
QCOW_MAGIC = 0x514649FB  # "QFI\xfb"
QCOW_MAGIC_BYTES = b"QFI\xfb"

#: Version 2 header (72 bytes): magic, version, backing_file_offset, backing_file_size,
#: cluster_bits, size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
#: refcount_table_clusters, nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
#: Version 3 additions at byte 72: incompatible_features, compatible_features,
#: autoclear_features, refcount_order, header_length.
HEADER_V3_EXT = struct.Struct(">QQQII")
QCOW2_V2_HEADER_LENGTH = HEADER_V2.size  # 72
QCOW2_V3_MIN_HEADER_LENGTH = HEADER_V2.size + HEADER_V3_EXT.size  # 104
#: What QEMU writes for v3: 104 + compression_type (1 byte) + 7 bytes padding.
QCOW2_V3_HEADER_LENGTH = 112
QCOW2_COMPRESSION_TYPE_OFFSET = 104

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16

#: Limits QEMU enforces when opening (qcow2.h), so hostile sizes fail before allocation.
QCOW_MAX_CRYPT_CLUSTERS = 32
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW2_MAX_BACKING_FILE_SIZE = 1023
QCOW2_MAX_SIZE = 1 << 63  # virtual size is an int64 in QEMU

# Incompatible feature bits.
QCOW2_INCOMPAT_DIRTY_BITNR = 0
QCOW2_INCOMPAT_CORRUPT_BITNR = 1
QCOW2_INCOMPAT_DATA_FILE_BITNR = 2
QCOW2_INCOMPAT_COMPRESSION_BITNR = 3
QCOW2_INCOMPAT_EXTL2_BITNR = 4
QCOW2_INCOMPAT_DIRTY = 1 << QCOW2_INCOMPAT_DIRTY_BITNR
QCOW2_INCOMPAT_CORRUPT = 1 << QCOW2_INCOMPAT_CORRUPT_BITNR
QCOW2_INCOMPAT_DATA_FILE = 1 << QCOW2_INCOMPAT_DATA_FILE_BITNR
QCOW2_INCOMPAT_COMPRESSION = 1 << QCOW2_INCOMPAT_COMPRESSION_BITNR
QCOW2_INCOMPAT_EXTL2 = 1 << QCOW2_INCOMPAT_EXTL2_BITNR
QCOW2_INCOMPAT_MASK = (
    QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2
)

# Compatible feature bits.
QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR = 0
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR
QCOW2_COMPAT_FEAT_MASK = QCOW2_COMPAT_LAZY_REFCOUNTS

# Autoclear feature bits.
QCOW2_AUTOCLEAR_BITMAPS_BITNR = 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR = 1
QCOW2_AUTOCLEAR_BITMAPS = 1 << QCOW2_AUTOCLEAR_BITMAPS_BITNR
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW

# --- header extensions -----------------------------------------------------------------
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
#: Extension header: type (magic), length of data; data follows, padded to 8 bytes.
EXT_HEADER = struct.Struct(">II")

QCOW2_FEAT_TYPE_INCOMPATIBLE = 0
QCOW2_FEAT_TYPE_COMPATIBLE = 1
QCOW2_FEAT_TYPE_AUTOCLEAR = 2
#: Feature name table entry: type, bit number, 46-byte NUL-padded name.
FEATURE_NAME = struct.Struct(">BB46s")

#: The table QEMU 7.2 writes into every v3 image, in QEMU's order.
QEMU_FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DIRTY_BITNR, "dirty bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_CORRUPT_BITNR, "corrupt bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DATA_FILE_BITNR, "external data file"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_COMPRESSION_BITNR, "compression type"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_EXTL2_BITNR, "extended L2 entries"),
    (QCOW2_FEAT_TYPE_COMPATIBLE, QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR, "lazy refcounts"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_BITMAPS_BITNR, "bitmaps"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR, "raw external data"),
)

# --- L1 / L2 / refcount table entries --------------------------------------------------
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: Bits that must be zero in a standard (uncompressed) L2 entry: 1..8 and 56..61.
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
#: Bits that must be zero in an L1 entry: 0..8 and 56..62.
L1E_RESERVED_MASK = 0x7F000000000001FF
L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8
QCOW2_COMPRESSED_SECTOR_SIZE = 512
QCOW2_COMPRESSED_SECTOR_MASK = ~(QCOW2_COMPRESSED_SECTOR_SIZE - 1)

ENTRY = struct.Struct(">Q")


class CompressedLayout(_Record):
    """Bit layout of a compressed-cluster L2 descriptor for one cluster size.

    Per the spec, with ``x = 62 - (cluster_bits - 8)``: bits ``0..x-1`` are the host
    offset, bits ``x..61`` the number of additional 512-byte sectors.
    """

    __slots__ = _fields = ("cluster_bits", "csize_shift", "csize_mask", "offset_mask")

    def __hash__(self) -> int:  # immutable by use, as the frozen dataclass it was
        return hash((self.cluster_bits, self.csize_shift, self.csize_mask, self.offset_mask))

    def __init__(self, cluster_bits: int, csize_shift: int, csize_mask: int, offset_mask: int) -> None:
        self.cluster_bits = cluster_bits
        self.csize_shift = csize_shift
        self.csize_mask = csize_mask
        self.offset_mask = offset_mask

    @classmethod
    def for_cluster_bits(cls, cluster_bits: int) -> "CompressedLayout":
        """:param cluster_bits: log2 of the cluster size (9..21)."""
        shift = 62 - (cluster_bits - 8)
        return cls(cluster_bits, shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1)

    def decode(self, entry: int) -> tuple[int, int]:
        """Return ``(host_offset, max_compressed_bytes)`` for an L2 entry with the compressed flag."""
        offset = entry & self.offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        size = nb_sectors * QCOW2_COMPRESSED_SECTOR_SIZE - (offset & ~QCOW2_COMPRESSED_SECTOR_MASK)
        return offset, size

    def encode(self, offset: int, size: int) -> int:
        """Build the L2 entry for ``size`` compressed bytes stored at ``offset``."""
        last = (offset + size - 1) >> 9
        nb_sectors = last - (offset >> 9)  # "additional" sectors, i.e. count - 1
        if nb_sectors > self.csize_mask or offset > self.offset_mask:
            raise ImageFormatError("Compressed cluster descriptor out of range")
        return QCOW_OFLAG_COMPRESSED | (nb_sectors << self.csize_shift) | offset


def refcount_bits(refcount_order: int) -> int:
    """Width in bits of one refcount block entry."""
    return 1 << refcount_order


def refcount_block_entries(cluster_bits: int, refcount_order: int) -> int:
    """Number of refcount entries in one refcount block cluster."""
    return (1 << (cluster_bits + 3)) >> refcount_order


def read_refcount(block: bytes | bytearray | memoryview, index: int, refcount_order: int) -> int:
    """Read entry ``index`` of a refcount block (big endian, any width 1..64 bits)."""
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    # Sub-byte entries are packed starting at the least significant bit.
    shift = (index % per_byte) * bits
    return (byte >> shift) & ((1 << bits) - 1)


def write_refcount(block: bytearray, index: int, refcount_order: int, value: int) -> None:
    """Store ``value`` in entry ``index`` of a refcount block."""
    bits = 1 << refcount_order
    if value < 0 or value >= (1 << bits):
        raise ImageFormatError(f"Refcount value {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    block[index // per_byte] = (block[index // per_byte] & ~mask) | (value << shift)


# --- snapshot table --------------------------------------------------------------------
#: Snapshot header: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
#: vm_clock_nsec, vm_state_size (32 bit), extra_data_size.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: Extra data: vm_state_size_large, disk_size, icount (QEMU >= 5.0 writes all three).
SNAPSHOT_EXTRA = struct.Struct(">QQQ")
SNAPSHOT_EXTRA_VM_STATE_END = 8
SNAPSHOT_EXTRA_DISK_SIZE_END = 16
SNAPSHOT_EXTRA_ICOUNT_END = 24


class HeaderExtension(_Record):
    """One header extension as found in the file (unknown ones are kept verbatim)."""

    _fields = ("magic", "data")

    def __init__(self, magic: int, data: bytes) -> None:
        self.magic = magic
        self.data = data


class QCowHeader(_Record):
    """The qcow2 header, v2 or v3, plus its extensions (fields by keyword, defaults below)."""

    _defaults: dict = {
        "version": 3, "backing_file_offset": 0, "backing_file_size": 0,
        "cluster_bits": DEFAULT_CLUSTER_BITS, "size": 0, "crypt_method": QCOW_CRYPT_NONE,
        "l1_size": 0, "l1_table_offset": 0, "refcount_table_offset": 0, "refcount_table_clusters": 0,
        "nb_snapshots": 0, "snapshots_offset": 0, "incompatible_features": 0, "compatible_features": 0,
        "autoclear_features": 0, "refcount_order": 4, "header_length": QCOW2_V3_HEADER_LENGTH,
        "compression_type": QCOW2_COMPRESSION_TYPE_ZLIB,
        # Bytes between the fixed fields we know and header_length (kept for round trips).
        "header_tail": b"", "backing_file": None, "backing_format": None,
        "feature_table": None,        # list[tuple[int, int, str]], [] by default
        "unknown_extensions": None,   # list[HeaderExtension] emu does not interpret, kept on rewrite
        "has_data_file_ext": False,
        # A header extension error found while parsing; QEMU reports it late in its open
        # (after the tables are validated), so the opener raises it in that order.
        "extension_error": None,
    }
    _fields = tuple(_defaults)

    def __init__(self, **fields) -> None:
        bad = set(fields) - set(self._defaults)
        if bad:
            raise TypeError(f"QCowHeader has no field {sorted(bad)[0]!r}")
        self.__dict__.update(self._defaults)
        self.__dict__.update(fields)
        if self.feature_table is None:
            self.feature_table = []
        if self.unknown_extensions is None:
            self.unknown_extensions = []

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def feature_name(self, ftype: int, bit: int) -> str:
        """Name of a feature bit from the image's own table (QEMU's fallback text otherwise)."""
        for t, b, name in self.feature_table:
            if t == ftype and b == bit:
                return name
        return f"Unknown incompatible feature: {1 << bit:x}"


def _ext_padded(length: int) -> int:
    return (length + 7) & ~7


def parse_header(buf: bytes) -> QCowHeader:
    """Parse the header cluster (or at least its first cluster) of a qcow2 image.

    :param buf: the first bytes of the image; the whole first cluster for extensions.
    :raises ImageFormatError: not qcow2, truncated, or values the spec forbids.
    """
    if buf[:4] != QCOW_MAGIC_BYTES:
        raise ImageFormatError("Image is not in qcow2 format")
    if len(buf) < QCOW2_V3_MIN_HEADER_LENGTH:   # past the end of the file reads as zeroes
        buf = bytes(buf) + bytes(QCOW2_V3_MIN_HEADER_LENGTH - len(buf))
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = HEADER_V2.unpack_from(buf, 0)
    if version not in (2, 3):
        raise ImageFormatError(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(f"Unsupported cluster size: 2^{cluster_bits}")
    h = QCowHeader(version=version, backing_file_offset=bfo, backing_file_size=bfs,
                   cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
                   l1_table_offset=l1_off, refcount_table_offset=rt_off,
                   refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
                   snapshots_offset=snap_off)
    cluster_size = 1 << cluster_bits
    if len(buf) < cluster_size:    # the whole header cluster, zeroes past the end of the file
        buf = bytes(buf) + bytes(cluster_size - len(buf))
    # The checks come in QEMU's order (qcow2_do_open), so a header with several faults gets
    # the message qemu-img gives.
    if version == 2:
        h.refcount_order = 4
        h.header_length = QCOW2_V2_HEADER_LENGTH
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    else:
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = HEADER_V3_EXT.unpack_from(buf, HEADER_V2.size)
        if h.header_length < QCOW2_V3_MIN_HEADER_LENGTH:
            raise ImageFormatError("qcow2 header too short")
    if h.header_length > cluster_size:
        raise ImageFormatError("qcow2 header exceeds cluster size")
    if bfo > cluster_size:
        raise ImageFormatError("Invalid backing file offset")
    if h.header_length > QCOW2_COMPRESSION_TYPE_OFFSET:
        h.compression_type = buf[QCOW2_COMPRESSION_TYPE_OFFSET]
        h.header_tail = bytes(buf[QCOW2_COMPRESSION_TYPE_OFFSET + 1:h.header_length])
    if h.compression_type not in (QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD):
        raise ImageFormatError(f"qcow2: unknown compression type: {h.compression_type}")
    if h.compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        if h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
            raise ImageFormatError("qcow2: Compression type incompatible feature bit must not be set")
    elif not h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
        raise ImageFormatError("qcow2: Compression type incompatible feature bit must be set")
    # Header extensions start after the header (v2: after 72 bytes) and end at the
    # backing file name or the end of the first cluster.  QEMU reads them later in its
    # open; unknown incompatible features are reported first (with the feature table's
    # names), so an extension error waits until then.
    ext_end = cluster_size if bfo == 0 else bfo
    try:
        _parse_extensions(h, buf, h.header_length, ext_end)
    except ImageFormatError as err:
        h.extension_error = str(err)
    if h.incompatible_features & ~QCOW2_INCOMPAT_MASK:
        return h      # check_features reports them
    if h.refcount_order > 6:
        raise ImageFormatError("Reference count entry width too large; may not exceed 64 bits")
    if size >= QCOW2_MAX_SIZE:
        raise ImageFormatError("Image size too large")
    if bfo:
        if bfs > min(QCOW2_MAX_BACKING_FILE_SIZE, cluster_size - bfo):
            raise ImageFormatError("Backing file name too long")
        try:
            # A C string in QEMU: a NUL ends it (an empty name means no backing file).
            h.backing_file = bytes(buf[bfo:bfo + bfs]).split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ImageFormatError("Backing file name is not valid UTF-8") from err
    return h


def _parse_extensions(h: QCowHeader, buf: bytes, start: int, end: int) -> None:
    off = start
    while off < end:
        magic, length = EXT_HEADER.unpack_from(buf, off)
        off += EXT_HEADER.size
        if off > end or length > end - off:
            raise ImageFormatError("Header extension too large")
        if magic == QCOW2_EXT_MAGIC_END:
            return
        data = bytes(buf[off:off + length])
        off += _ext_padded(length)
        if magic == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            try:
                h.backing_format = data.rstrip(b"\0").decode("ascii")
            except UnicodeDecodeError as err:
                raise ImageFormatError("Invalid backing format name") from err
        elif magic == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for i in range(length // FEATURE_NAME.size):
                t, b, name = FEATURE_NAME.unpack_from(data, i * FEATURE_NAME.size)
                h.feature_table.append((t, b, name.split(b"\0", 1)[0].decode("utf-8", "replace")))
        else:
            if magic == QCOW2_EXT_MAGIC_DATA_FILE:
                h.has_data_file_ext = True
            h.unknown_extensions.append(HeaderExtension(magic, data))


def check_features(h: QCowHeader) -> None:
    """Refuse what emu cannot handle safely, with QEMU's wording where it has one.

    :raises ImageFormatError: unknown incompatible bits, external data file, extended L2,
        zstd compression, encryption.
    """
    unknown = h.incompatible_features & ~QCOW2_INCOMPAT_MASK
    if unknown:
        names = []
        for bit in range(64):
            if unknown & (1 << bit):
                names.append(h.feature_name(QCOW2_FEAT_TYPE_INCOMPATIBLE, bit))
        raise ImageFormatError("Unsupported qcow2 feature(s): " + ", ".join(names))
    if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE or h.has_data_file_ext:
        raise ImageFormatError("Unsupported qcow2 feature(s): external data file")
    if h.incompatible_features & QCOW2_INCOMPAT_EXTL2:
        raise ImageFormatError("Unsupported qcow2 feature(s): extended L2 entries")
    if h.compression_type != QCOW2_COMPRESSION_TYPE_ZLIB:
        raise ImageFormatError("Unsupported qcow2 feature(s): zstd compression type")
    if h.crypt_method != QCOW_CRYPT_NONE:
        raise ImageFormatError("Unsupported qcow2 feature(s): encryption")


def serialize_header(h: QCowHeader, cluster_size: int | None = None) -> bytes:
    """Build the header bytes (fixed fields + extensions + backing name) as QEMU lays them out.

    The backing file name goes right after the extensions, as QEMU puts it; the
    caller writes the returned bytes at offset 0.  ``backing_file_offset`` and
    ``backing_file_size`` are recomputed.

    :raises ImageFormatError: the result does not fit in one cluster.
    """
    cluster_size = cluster_size or h.cluster_size
    out = bytearray()
    if h.version >= 3:
        header_length = max(h.header_length, QCOW2_V3_HEADER_LENGTH)
    else:
        header_length = QCOW2_V2_HEADER_LENGTH
    exts = bytearray()

    def add(magic: int, data: bytes) -> None:
        exts.extend(EXT_HEADER.pack(magic, len(data)))
        exts.extend(data)
        exts.extend(b"\0" * (_ext_padded(len(data)) - len(data)))

    if h.backing_format:
        add(QCOW2_EXT_MAGIC_BACKING_FORMAT, h.backing_format.encode("ascii"))
    if h.version >= 3 and cluster_size > 4096:
        # qemu-img 7.2 writes the feature name table only for clusters above 4 KiB.
        table = h.feature_table or list(QEMU_FEATURE_TABLE)
        add(QCOW2_EXT_MAGIC_FEATURE_TABLE, b"".join(
            FEATURE_NAME.pack(t, b, n.encode()) for t, b, n in table))
    for ext in h.unknown_extensions:
        add(ext.magic, ext.data)
    exts.extend(EXT_HEADER.pack(QCOW2_EXT_MAGIC_END, 0))
    backing = h.backing_file.encode() if h.backing_file else b""
    bfo = header_length + len(exts) if backing else 0
    h.backing_file_offset, h.backing_file_size = bfo, len(backing)
    if h.version == 2:
        h.header_length = QCOW2_V2_HEADER_LENGTH
    else:
        h.header_length = header_length
    out += HEADER_V2.pack(QCOW_MAGIC, h.version, bfo, len(backing), h.cluster_bits, h.size,
                          h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                          h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version >= 3:
        out += HEADER_V3_EXT.pack(h.incompatible_features, h.compatible_features,
                                  h.autoclear_features, h.refcount_order, header_length)
        tail = bytearray([h.compression_type]) + bytearray(h.header_tail)
        tail = tail[:header_length - QCOW2_V3_MIN_HEADER_LENGTH]
        tail += b"\0" * (header_length - QCOW2_V3_MIN_HEADER_LENGTH - len(tail))
        out += tail
    out += exts
    out += backing
    if len(out) > cluster_size:
        raise ImageFormatError("Header extensions and backing file name do not fit in the first cluster")
    return bytes(out)


class QCowSnapshot(_Record):
    """One snapshot table entry (QEMU's QCowSnapshot)."""

    _fields = ("l1_table_offset", "l1_size", "id_str", "name", "date_sec", "date_nsec", "vm_clock_nsec",
               "vm_state_size", "disk_size", "icount", "unknown_extra", "extra_data_size")

    def __init__(self, l1_table_offset: int, l1_size: int, id_str: str, name: str, date_sec: int = 0,
                 date_nsec: int = 0, vm_clock_nsec: int = 0, vm_state_size: int = 0,
                 disk_size: int | None = None, icount: int | None = None, unknown_extra: bytes = b"",
                 extra_data_size: int = SNAPSHOT_EXTRA.size) -> None:
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id_str = id_str
        self.name = name
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount
        #: Extra data beyond what emu knows, preserved verbatim.
        self.unknown_extra = unknown_extra
        self.extra_data_size = extra_data_size

    def info(self) -> dict:
        """QEMU's SnapshotInfo members in QEMU's order."""
        d = {"id": self.id_str, "name": self.name, "vm-state-size": self.vm_state_size,
             "date-sec": self.date_sec, "date-nsec": self.date_nsec,
             "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
             "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount is not None and self.icount != 0xFFFFFFFFFFFFFFFF:
            d["icount"] = self.icount
        return d


def parse_snapshot_table(buf: bytes, nb_snapshots: int) -> list[QCowSnapshot]:
    """Parse ``nb_snapshots`` entries from ``buf`` (the bytes at snapshots_offset).

    :raises ImageFormatError: truncated entries or oversize extra data.
    """
    return parse_snapshot_table_ex(buf, nb_snapshots)[0]


def parse_snapshot_table_ex(buf: bytes, nb_snapshots: int) -> tuple[list[QCowSnapshot], int]:
    """Like :func:`parse_snapshot_table`, also returning the table's length in bytes."""
    snaps = []
    off = 0
    for _ in range(nb_snapshots):
        if off + SNAPSHOT_HEADER.size > len(buf):
            raise ImageFormatError("Snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = SNAPSHOT_HEADER.unpack_from(buf, off)
        off += SNAPSHOT_HEADER.size
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise ImageFormatError("Too much extra metadata in snapshot table entry")
        if off + extra_size + id_len + name_len > len(buf):
            raise ImageFormatError("Snapshot table is truncated")
        extra = bytes(buf[off:off + extra_size])
        off += extra_size
        s = QCowSnapshot(l1_off, l1_size, "", "", date_sec, date_nsec, vm_clock, vm_state32,
                         extra_data_size=extra_size)
        if extra_size >= SNAPSHOT_EXTRA_VM_STATE_END:
            s.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= SNAPSHOT_EXTRA_DISK_SIZE_END:
            s.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= SNAPSHOT_EXTRA_ICOUNT_END:
            s.icount = struct.unpack_from(">Q", extra, 16)[0]
        s.unknown_extra = extra[SNAPSHOT_EXTRA.size:]
        s.id_str = bytes(buf[off:off + id_len]).split(b"\0", 1)[0].decode("utf-8", "replace")
        off += id_len
        s.name = bytes(buf[off:off + name_len]).split(b"\0", 1)[0].decode("utf-8", "replace")
        off += name_len
        off = _ext_padded(off)
        snaps.append(s)
    return snaps, off


def serialize_snapshot(s: QCowSnapshot) -> bytes:
    """One snapshot table entry, padded to 8 bytes, with QEMU's 24-byte extra data."""
    idb, nameb = s.id_str.encode(), s.name.encode()
    extra = SNAPSHOT_EXTRA.pack(s.vm_state_size, s.disk_size or 0,
                                0xFFFFFFFFFFFFFFFF if s.icount is None else s.icount)
    extra += s.unknown_extra
    vm32 = s.vm_state_size if s.vm_state_size < (1 << 32) else 0
    out = SNAPSHOT_HEADER.pack(s.l1_table_offset, s.l1_size, len(idb), len(nameb), s.date_sec,
                               s.date_nsec, s.vm_clock_nsec, vm32, len(extra))
    out += extra + idb + nameb
    return out + b"\0" * (_ext_padded(len(out)) - len(out))


def serialize_snapshot_table(snaps: list[QCowSnapshot]) -> bytes:
    """The whole snapshot table."""
    return b"".join(serialize_snapshot(s) for s in snaps)


def parse_table(buf: bytes, count: int) -> list[int]:
    """Big-endian 64-bit table (L1, L2, refcount table) into a list of ints."""
    return list(struct.unpack_from(f">{count}Q", buf, 0)) if count else []


def serialize_table(entries: list[int]) -> bytes:
    """List of ints into a big-endian 64-bit table."""
    return struct.pack(f">{len(entries)}Q", *entries)

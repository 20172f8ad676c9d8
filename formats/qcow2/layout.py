"""qcow2 on-disk structures, as qemu's docs/interop/qcow2.txt names them.

Declarations and constants only; behaviour lives in image.py (reading), writer.py
(allocation and writing) and check.py. All numbers are big-endian.

    cluster 0: header | header extensions | backing file name
    elsewhere: L1 table, L2 tables, refcount table and blocks, snapshot table,
               bitmap directory and tables, data clusters (any order)
"""

from __future__ import annotations

import numpy as np
from construct import (
    Bytes,
    Const,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
    this,
)

from ..magic import QCOW2_MAGIC

MAGIC = QCOW2_MAGIC

# == Header ==
#: the version 2 header is exactly this long; version 3 adds fields up to header_length
HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
#: qemu writes version 3 headers with the compression_type byte and its padding
HEADER_V3_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's implementation limit: 2 MiB clusters
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_REFCOUNT_ORDER = 6

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    # version 3 and higher
    "incompatible_features" / If(this.version >= 3, Int64ub),
    "compatible_features" / If(this.version >= 3, Int64ub),
    "autoclear_features" / If(this.version >= 3, Int64ub),
    "refcount_order" / If(this.version >= 3, Int32ub),
    "header_length" / If(this.version >= 3, Int32ub),
    # additional fields: present when header_length reaches past them
    "compression_type"
    / If(lambda c: c.version >= 3 and c.header_length >= HEADER_V3_LENGTH, Int8ub),
    "padding" / If(lambda c: c.version >= 3 and c.header_length >= HEADER_V3_LENGTH, Bytes(7)),
)


def header_bytes(version: int, header_length: int) -> int:
    """How many bytes of the header `Header` parses and builds."""
    if version < 3:
        return HEADER_V2_LENGTH
    return HEADER_V3_LENGTH if header_length >= HEADER_V3_LENGTH else HEADER_V3_MIN_LENGTH


# == Header extensions ==
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
    "data" / Bytes(this.length),
    # padding to a multiple of 8; not guaranteed to be zeros
    "padding" / Bytes(lambda c: -c.length % 8),
)

# == Feature name table ==
FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)
FEATURE_NAMES = (
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

# == Bitmaps extension ==
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
    "extra_data" / Bytes(this.extra_data_size),
    "name" / Bytes(this.name_size),
    "padding" / Bytes(lambda c: -(24 + c.extra_data_size + c.name_size) % 8),
)
BITMAP_DIRECTORY_FIXED = 24

# == Full disk encryption header pointer ==
CryptoHeaderExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

# == Snapshots ==
SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SnapshotEntry = Struct(
    *SnapshotHeader.subcons,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
    "padding"
    / Bytes(lambda c: -(SNAPSHOT_FIXED + c.extra_data_size + c.id_str_size + c.name_size) % 8),
)
SNAPSHOT_FIXED = 40
#: the extra data fields qemu defines, each present when extra_data_size reaches past it
SnapshotExtraData = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)
SNAPSHOT_EXTRA_FIELDS = (("vm_state_size_large", 8), ("disk_size", 16), ("icount", 24))


def numpy_dtype(struct: Struct) -> np.dtype:
    """The same fields as a numpy record, to parse a whole table of them at once (a
    snapshot table may hold 65536 entries)."""
    codes = {Int8ub: "u1", Int16ub: ">u2", Int32ub: ">u4", Int64ub: ">u8"}
    return np.dtype([(sc.name, codes[sc.subcon]) for sc in struct.subcons])


SNAPSHOT_HEADER_DTYPE = numpy_dtype(SnapshotHeader)
SNAPSHOT_EXTRA_DTYPE = numpy_dtype(SnapshotExtraData)

# == Cluster mapping ==
#: L1 and L2 entries: bit 63 "refcount is exactly one", bit 62 "compressed"
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
#: bits 9-55: a cluster-aligned host offset
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2_STANDARD_RESERVED_MASK = 0x3F00_0000_0000_01FE
REFTABLE_RESERVED_MASK = 0x0000_0000_0000_01FF
#: extended L2 entries: 32 subclusters per cluster, alloc bits 0-31, zero bits 32-63
SUBCLUSTERS = 32
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

SECTOR = 512

# qemu's implementation limits, which bound what a hostile header can make us allocate
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 64 << 20


def compressed_fields(cluster_bits: int) -> tuple[int, int]:
    """(bits of host offset, bits of sector count) in a Compressed Clusters Descriptor."""
    x = 62 - (cluster_bits - 8)
    return x, 62 - x

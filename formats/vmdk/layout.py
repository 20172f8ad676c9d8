"""VMDK on-disk structures, spelled as VMware's "Virtual Disk Format 5.0" spells them.

A hosted sparse extent ("SPARSE" in a descriptor, magic KDMV) is

    SparseExtentHeader (sector 0) | embedded descriptor | [redundant GD + GTs] | GD + GTs
    | grains ...

Stream-optimized extents put compressed grains first, each behind a grain marker, then
every grain table and the grain directory behind metadata markers, then a footer (a
second SparseExtentHeader holding the real gdOffset) and an end-of-stream marker.
All integers are little-endian; offsets and sizes are in 512-byte sectors.

The ESX "COWD" sparse header (vmfsSparse, "VMFSSPARSE" extents) is declared too.
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from ..magic import VMDK_COWD_MAGIC, VMDK_SPARSE_MAGIC

SECTOR = 512

# -- hosted sparse extents (spec "Hosted Sparse Extent Header") ---------------------------
SPARSE_MAGIC = VMDK_SPARSE_MAGIC
COWD_MAGIC = VMDK_COWD_MAGIC

#: flags, SparseExtentHeader.flags
FLAG_VALID_NEWLINE = 1 << 0  # the four line-ending bytes below are meaningful
FLAG_REDUNDANT_GT = 1 << 1  # rgdOffset names a second copy of the GD and GTs
FLAG_ZERO_GRAIN = 1 << 2  # a GTE of 1 means "grain reads as zeros" (version 2+)
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
#: flags this reader understands; anything else in the incompatible half is refused
KNOWN_FLAGS = (
    FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
)
INCOMPATIBLE_FLAGS_MASK = 0xFFFF0000

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1

#: gdOffset of a stream-optimized header: the real one is in the footer
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

#: GTE values with a meaning of their own
GTE_UNALLOCATED = 0
GTE_ZERO = 1

#: what VMware and qemu write, and what ESXi's disklib accepts
DEFAULT_GRAIN_SECTORS = 128  # 64 KiB
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20

SparseExtentHeader = Struct(
    "magicNumber" / Const(SPARSE_MAGIC),
    "version" / Int32ul,
    "flags" / Int32ul,
    "capacity" / Int64ul,
    "grainSize" / Int64ul,
    "descriptorOffset" / Int64ul,
    "descriptorSize" / Int64ul,
    "numGTEsPerGT" / Int32ul,
    "rgdOffset" / Int64ul,
    "gdOffset" / Int64ul,
    "overHead" / Int64ul,
    "uncleanShutdown" / Int8ul,
    "singleEndLineChar" / Bytes(1),
    "nonEndLineChar" / Bytes(1),
    "doubleEndLineChar1" / Bytes(1),
    "doubleEndLineChar2" / Bytes(1),
    "compressAlgorithm" / Int16ul,
    "pad" / Bytes(433),
)
assert SparseExtentHeader.sizeof() == SECTOR

#: the newline-detection bytes: a file mangled by a text-mode transfer shows here first
NEWLINE_BYTES = {
    "singleEndLineChar": b"\n",
    "nonEndLineChar": b" ",
    "doubleEndLineChar1": b"\r",
    "doubleEndLineChar2": b"\n",
}

# -- stream-optimized markers (spec "Stream-Optimized Compressed Sparse Extents") ---------
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

#: a grain marker: the grain's first sector, then the compressed size, then the data
GrainMarker = Struct("lba" / Int64ul, "size" / Int32ul)
GRAIN_MARKER_SIZE = GrainMarker.sizeof()  # 12
#: the same marker for the per-grain hot path, where construct costs more than inflating
GRAIN_MARKER = struct.Struct("<QI")
assert GRAIN_MARKER.size == GRAIN_MARKER_SIZE

#: a metadata marker fills one sector: numSectors of metadata follow it
MetadataMarker = Struct(
    "numSectors" / Int64ul,
    "size" / Const(0, Int32ul),
    "type" / Int32ul,
    Padding(SECTOR - 16),
)
assert MetadataMarker.sizeof() == SECTOR

# -- ESX sparse extents (vmfsSparse "COWD", spec "ESX Server Sparse Extent Header") -------
COWD_GTES_PER_GT = 4096

COWDisk_Header = Struct(
    "magicNumber" / Const(COWD_MAGIC),
    "version" / Int32ul,
    "flags" / Int32ul,
    "numSectors" / Int32ul,
    "grainSize" / Int32ul,
    "gdOffset" / Int32ul,
    "numGDEntries" / Int32ul,
    "freeSector" / Int32ul,
    # the root/child union: only the parts a reader needs are named
    "u" / Bytes(1024 + 4),
    "generation" / Int32ul,
    "name" / Bytes(60),
    "description" / Bytes(512),
    "savedGeneration" / Int32ul,
    "reserved" / Bytes(8),
    "uncleanShutdown" / Int32ul,
    "padding" / Bytes(396),
)
assert COWDisk_Header.sizeof() == 2048

# -- ESXi seSparse extents (not in the 5.0 spec; the layout qemu reads) ---------------------
SESPARSE_CONST_MAGIC = 0xCAFEBABE
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE
SESPARSE_VERSION = 0x0000_0002_0000_0001
SESPARSE_GRAIN_SECTORS = 8  # 4 KiB grains, the only size ESXi makes
SESPARSE_GT_SECTORS = 64  # 4096 eight-byte entries: one table covers 16 MiB
#: grain directory entries: top half 0x10000000 when the table exists, low half its index
SESPARSE_GD_ALLOCATED = 0x1000_0000
#: grain table entries: the top nibble says what the grain is
SESPARSE_UNALLOCATED, SESPARSE_UNMAPPED, SESPARSE_ZERO, SESPARSE_ALLOCATED = 0, 1, 2, 3

SESparseConstHeader = Struct(
    "magic" / Const(SESPARSE_CONST_MAGIC, Int64ul),
    "version" / Int64ul,
    "capacity" / Int64ul,
    "grain_size" / Int64ul,
    "grain_table_size" / Int64ul,
    "flags" / Int64ul,
    "reserved" / Bytes(32),
    "volatile_header_offset" / Int64ul,
    "volatile_header_size" / Int64ul,
    "journal_header_offset" / Int64ul,
    "journal_header_size" / Int64ul,
    "journal_offset" / Int64ul,
    "journal_size" / Int64ul,
    "grain_dir_offset" / Int64ul,
    "grain_dir_size" / Int64ul,
    "grain_tables_offset" / Int64ul,
    "grain_tables_size" / Int64ul,
    "free_bitmap_offset" / Int64ul,
    "free_bitmap_size" / Int64ul,
    "backmap_offset" / Int64ul,
    "backmap_size" / Int64ul,
    "grains_offset" / Int64ul,
    "grains_size" / Int64ul,
    "pad" / Bytes(304),
)
assert SESparseConstHeader.sizeof() == SECTOR

SESparseVolatileHeader = Struct(
    "magic" / Const(SESPARSE_VOLATILE_MAGIC, Int64ul),
    "free_gt_number" / Int64ul,
    "next_txn_seq_number" / Int64ul,
    "replay_journal" / Int64ul,
    "pad" / Bytes(480),
)
assert SESparseVolatileHeader.sizeof() == SECTOR

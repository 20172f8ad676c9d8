"""VHDX on-disk structures, as [MS-VHDX] v1.0 section 2 names them. Declarations only.

    0      file type identifier ("vhdxfile", creator)
    64K    header 1          128K   header 2        (4 KiB each, CRC-32C)
    192K   region table 1    256K   region table 2  (64 KiB each, CRC-32C)
    1M...  log, metadata region, BAT region, payload and sector bitmap blocks (1 MiB aligned)

Everything is little-endian; GUIDs are stored in Microsoft's mixed-endian layout
(uuid.UUID(bytes_le=...)).
"""

from __future__ import annotations

import uuid

import google_crc32c
from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

from ..magic import VHDX_SIGNATURE

KiB, MiB = 1 << 10, 1 << 20

FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
SECTOR_BITMAP_BLOCK = MiB
LOG_SECTOR = 4 * KiB
ALIGN = MiB

FILE_SIGNATURE = VHDX_SIGNATURE
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DESC_SIGNATURE = b"desc"
DATA_SIGNATURE = b"data"

MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_SIZE = 64 << 40
MIN_BLOCK, MAX_BLOCK = MiB, 256 * MiB
#: 2^23 sectors per sector bitmap block: the chunk ratio's numerator (2.5.1)
SECTORS_PER_BITMAP = 1 << 23


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


# 2.2.2 region table entries
BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
# 2.6.2 known metadata items
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
# 2.6.2.6.1: the locator type of a VHDX parent
VHDX_PARENT_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# 2.5.1 BAT entry states
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5  # the 0.95 draft's value, which qemu still names
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
STATE_MASK = 0x7
OFFSET_MASK = ~(MiB - 1) & 0xFFFF_FFFF_FFFF_FFFF  # FileOffsetMB in bits 20..63

# 2.6.2.1 file parameters flags
LEAVE_BLOCKS_ALLOCATED = 0x1
HAS_PARENT = 0x2
# 2.6.1.2 metadata entry flags
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
REGION_IS_REQUIRED = 0x1

# 2.1 file type identifier
FileIdentifier = Struct("signature" / Bytes(8), "creator" / Bytes(512))

# 2.2.2 header (the checksum covers the whole 4 KiB)
Header = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),
    "log_version" / Int16ul,
    "version" / Int16ul,
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
)

# 2.2.3 region table (the checksum covers the whole 64 KiB)
RegionTableHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)
RegionTableEntry = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "flags" / Int32ul,
)

# 2.6.1 metadata table
MetadataTableHeader = Struct(
    "signature" / Bytes(8),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
)
MetadataTableEntry = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "reserved" / Int32ul,
)
FileParameters = Struct("block_size" / Int32ul, "flags" / Int32ul)
VirtualDiskSize = Struct("virtual_disk_size" / Int64ul)
SectorSize = Struct("sector_size" / Int32ul)
ParentLocatorHeader = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)
ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)

# 2.3.1 log entry header, 2.3.1.2/3 descriptors, 2.3.1.4 data sector
LogEntryHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Bytes(16),
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)
LOG_HEADER_SIZE = 64
# a zero descriptor keeps zero_length where a data descriptor keeps its leading bytes,
# and reserved where it keeps its trailing bytes: one declaration serves both
LogDescriptor = Struct(
    "signature" / Bytes(4),
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
LOG_DESCRIPTOR_SIZE = 32
LogDataSector = Struct(
    "signature" / Bytes(4),
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)

# 2.6.2.6.2 parent locator keys
PARENT_LINKAGE = "parent_linkage"
PARENT_LINKAGE2 = "parent_linkage2"
RELATIVE_PATH = "relative_path"
VOLUME_PATH = "volume_path"
ABSOLUTE_WIN32_PATH = "absolute_win32_path"


def checksum(buf: bytes | bytearray | memoryview, at: int = 4) -> int:
    """CRC-32C of `buf` with its 4-byte checksum field at `at` counted as zeros."""
    mv = memoryview(buf)
    # bytes(): the C extension takes only immutable buffers
    crc = google_crc32c.extend(google_crc32c.value(bytes(mv[:at])), b"\0\0\0\0")
    return google_crc32c.extend(crc, bytes(mv[at + 4 :]))


def seal(buf: bytearray, at: int = 4) -> bytearray:
    """Write the CRC-32C into its field."""
    buf[at : at + 4] = checksum(buf, at).to_bytes(4, "little")
    return buf


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block (2.5.1)."""
    return SECTORS_PER_BITMAP * logical_sector_size // block_size


def bat_entry_count(size: int, block_size: int, logical_sector_size: int, has_parent: bool) -> int:
    """BAT entries: payload entries with a sector bitmap entry after every chunk (2.5.1)."""
    blocks = -(-size // block_size)
    ratio = chunk_ratio(block_size, logical_sector_size)
    if has_parent:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + max(0, blocks - 1) // ratio

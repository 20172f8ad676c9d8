"""The GUID Partition Table (UEFI specification 2.10, section 5.3): a protective MBR,
the primary header at LBA 1 with its entry array, and a backup entry array and header
at the end of the disk. Both headers and both arrays carry CRC32s.

When the primary is damaged the backup is used, with a warning, as sgdisk and the Linux
kernel do; when both are, the table is refused.
"""

from __future__ import annotations

import uuid
import zlib
from typing import Any

import numpy as np
from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ..errors import CorruptImage, FormatError
from ..image import Image
from . import mbr
from .table import Partition, PartitionTable

# UEFI 2.10 table 5-5: GPT Header
GPTHeader = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "partition_entry_lba" / Int64ul,
    "number_of_partition_entries" / Int32ul,
    "size_of_partition_entry" / Int32ul,
    "partition_entry_array_crc32" / Int32ul,
)
HEADER_SIZE = GPTHeader.sizeof()  # 92
REVISION = 0x00010000

# UEFI 2.10 table 5-6: GPT Partition Entry; an array of them is read with numpy
ENTRY_FIELDS = (
    ("partition_type_guid", "V16", 0),
    ("unique_partition_guid", "V16", 16),
    ("starting_lba", "<u8", 32),
    ("ending_lba", "<u8", 40),
    ("attributes", "<u8", 48),
    ("partition_name", "V72", 56),
)
ENTRY_SIZE = 128
DEFAULT_ENTRIES = 128
#: the spec's minimum array (16 KiB) many times over; more is hostile
MAX_ARRAY_BYTES = 1 << 20
ATTR_LEGACY_BIOS_BOOTABLE = 1 << 2

TYPE_NAMES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Microsoft LDM metadata",
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": "Microsoft LDM data",
    "E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D": "Microsoft Storage Spaces",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": "Linux variable data",
    "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1": "Linux temporary data",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "8DA63339-0007-60C0-C436-083AC8230908": "Linux reserved",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD disklabel",
    "83BD6B9D-7F41-11DC-BE0B-001560B84F0F": "FreeBSD boot",
    "516E7CB5-6ECF-11D6-8FF8-00022D09712B": "FreeBSD swap",
    "516E7CB6-6ECF-11D6-8FF8-00022D09712B": "FreeBSD UFS",
    "516E7CBA-6ECF-11D6-8FF8-00022D09712B": "FreeBSD ZFS",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
    "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
    "6A898CC3-1DD2-11B2-99A6-080020736631": "Solaris /usr & Apple ZFS",
    "AA31E02A-400F-11DB-9590-000C2911D1B8": "VMware VMFS",
    "9D275380-40AD-11DB-BF97-000C2911D1B8": "VMware vmkcore",
}

TYPE_FOR_FILESYSTEM = {
    "vfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
    "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
    "exfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "LVM2_member": "E6D6D379-F507-44C2-A23C-238F2A3DF928",
}
LINUX_FILESYSTEM = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
#: types whose partitions hold no filesystem by design (copied whole without a warning)
RAW_TYPES = frozenset(
    {
        "21686148-6449-6E6F-744E-656564454649",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3",
        "83BD6B9D-7F41-11DC-BE0B-001560B84F0F",
    }
)


def type_name(guid: str) -> str:
    return TYPE_NAMES.get(guid.upper(), "Unknown")


def entry_dtype(size: int) -> np.dtype:
    names, formats, offsets = zip(*ENTRY_FIELDS)
    return np.dtype(
        {"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": size}
    )


def guid_str(raw: bytes) -> str:
    """GUIDs are stored mixed-endian; print them as sgdisk does."""
    return str(uuid.UUID(bytes_le=bytes(raw))).upper()


def guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def header_crc(raw: bytes, size: int) -> int:
    return zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:size])


# -- reading -------------------------------------------------------------------


def _load(image: Image, lba: int, ss: int) -> tuple[Any, bytes]:
    """One header and its entry array, validated, or CorruptImage saying what is wrong."""
    disk_sectors = image.size // ss
    if not 0 < lba < disk_sectors:
        raise CorruptImage(f"header LBA {lba} lies outside the disk ({disk_sectors} sectors)")
    raw = image.read(lba * ss, ss)
    if raw[:8] != b"EFI PART":
        raise CorruptImage(f"no GPT signature at LBA {lba}")
    h = GPTHeader.parse(raw)
    if not HEADER_SIZE <= h.header_size <= ss:
        raise CorruptImage(f"header size {h.header_size} at LBA {lba} is not in [92, {ss}]")
    if header_crc(raw, h.header_size) != h.header_crc32:
        raise CorruptImage(f"header CRC mismatch at LBA {lba}")
    if h.my_lba != lba:
        raise CorruptImage(f"header at LBA {lba} says it is at LBA {h.my_lba}")
    if not (h.first_usable_lba <= h.last_usable_lba + 1 and h.last_usable_lba < disk_sectors):
        raise CorruptImage(
            f"usable area LBA {h.first_usable_lba}-{h.last_usable_lba} does not fit the disk "
            f"({disk_sectors} sectors)"
        )
    count, esize = h.number_of_partition_entries, h.size_of_partition_entry
    if esize < ENTRY_SIZE or esize % 8 or esize > 4096:
        raise CorruptImage(f"partition entry size {esize} is invalid")
    if count * esize > MAX_ARRAY_BYTES:
        raise CorruptImage(f"{count} entries of {esize} bytes exceed {MAX_ARRAY_BYTES} bytes")
    array_sectors = -(-count * esize // ss)
    first = h.partition_entry_lba
    if not (first > 0 and first + array_sectors <= disk_sectors) or (
        first <= lba < first + array_sectors
    ):
        raise CorruptImage(
            f"entry array at LBA {first} (+{array_sectors} sectors) lies outside the disk "
            f"or over its header"
        )
    entries = image.read(first * ss, count * esize)
    if zlib.crc32(entries) != h.partition_entry_array_crc32:
        raise CorruptImage(f"entry array CRC mismatch (array at LBA {first})")
    return h, entries


def read(image: Image, *, protective: bool) -> PartitionTable | None:
    """The GPT on `image`, or None when there is none and no protective MBR asks for one."""
    problems = []
    for ss in (512, 4096):
        if image.size < 3 * ss:
            continue
        last = image.size // ss - 1
        if image.read(ss, 8) != b"EFI PART" and image.read(last * ss, 8) != b"EFI PART":
            continue
        warnings: list[str] = []
        try:
            h, entries = _load(image, 1, ss)
            primary_ok = True
        except CorruptImage as exc:
            problems.append(f"primary: {exc}")
            primary_ok = False
        backup: tuple[Any, bytes] | None = None
        backup_lba = h.alternate_lba if primary_ok else last
        try:
            backup = _load(image, backup_lba, ss) if 0 < backup_lba <= last else None
            if backup is None:
                raise CorruptImage(f"backup LBA {backup_lba} lies outside the disk")
        except CorruptImage as exc:
            if not primary_ok:
                raise CorruptImage(
                    f"gpt: both headers are unusable: {problems[-1]}; backup: {exc}"
                ) from exc
            warnings.append(f"gpt: the backup header is unusable ({exc})")
        if not primary_ok:
            assert backup is not None
            h, entries = backup
            warnings.append(
                f"gpt: the primary header is corrupt ({problems[-1][9:]}); using the backup "
                f"at LBA {backup_lba}"
            )
        elif backup is not None and backup_lba != last:
            warnings.append(
                f"gpt: the backup header is at LBA {backup_lba}, not at the end of the disk "
                f"(LBA {last}); was the disk resized?"
            )
        if not protective:
            warnings.append("gpt: no protective MBR in sector 0")
        table = _table(image, ss, h, entries, warnings)
        table.metadata = [(0, ss)]
        for hh, where in (
            (h if primary_ok else None, 1),
            (backup[0] if backup else None, backup_lba),
        ):
            if hh is None:
                continue
            table.metadata.append((where * ss, ss))
            nbytes = -(-hh.number_of_partition_entries * hh.size_of_partition_entry // ss) * ss
            table.metadata.append((hh.partition_entry_lba * ss, nbytes))
        table.raw.update(
            primary_ok=primary_ok,
            backup_ok=backup is not None,
            backup_lba=backup_lba,
        )
        return table
    if protective:
        detail = f": {problems[-1]}" if problems else ""
        raise CorruptImage(f"gpt: a protective MBR but no usable GPT header{detail}")
    return None


def _table(image: Image, ss: int, h, entries: bytes, warnings: list[str]) -> PartitionTable:
    count, esize = h.number_of_partition_entries, h.size_of_partition_entry
    arr = np.frombuffer(entries, dtype=entry_dtype(esize), count=count)
    raw_rows = np.frombuffer(entries, dtype=np.uint8).reshape(count, esize)
    used = np.flatnonzero(raw_rows[:, :16].any(axis=1))
    firsts = arr["starting_lba"][used]
    lasts = arr["ending_lba"][used]
    disk_sectors = image.size // ss
    bad = (firsts > lasts) | (lasts >= disk_sectors) | (firsts == 0)
    if bad.any():
        i = int(used[np.flatnonzero(bad)[0]])
        raise CorruptImage(
            f"gpt: partition {i + 1} (LBA {int(arr['starting_lba'][i])}-"
            f"{int(arr['ending_lba'][i])}) lies outside the disk ({disk_sectors} sectors)"
        )
    outside = (firsts < h.first_usable_lba) | (lasts > h.last_usable_lba)
    for i in used[outside].tolist():
        warnings.append(f"gpt: partition {i + 1} lies outside the usable area")
    parts = []
    for i in used.tolist():  # one object per partition in use, not per entry
        e = arr[i]
        guid = guid_str(e["partition_type_guid"].tobytes())
        name = e["partition_name"].tobytes().decode("utf-16-le", "replace").split("\0", 1)[0]
        attrs = int(e["attributes"])
        first, last_lba = int(e["starting_lba"]), int(e["ending_lba"])
        parts.append(
            Partition(
                number=i + 1,
                start=first * ss,
                size=(last_lba - first + 1) * ss,
                type=guid,
                type_name=type_name(guid),
                name=name,
                uuid=guid_str(e["unique_partition_guid"].tobytes()),
                bootable=bool(attrs & ATTR_LEGACY_BIOS_BOOTABLE),
                attributes=attrs,
            )
        )
    return PartitionTable(
        kind="gpt",
        sector_size=ss,
        disk_size=image.size,
        id=guid_str(h.disk_guid),
        partitions=parts,
        first_usable=h.first_usable_lba * ss,
        last_usable=(h.last_usable_lba + 1) * ss,
        warnings=warnings,
        raw={
            "entries": entries,
            "entry_size": esize,
            "entry_count": count,
            "disk_guid": bytes(h.disk_guid),
            "first_usable_lba": h.first_usable_lba,
        },
    )


# -- writing -------------------------------------------------------------------


def build_entries(table: PartitionTable, count: int = DEFAULT_ENTRIES) -> bytes:
    ss = table.sector_size
    top = max((p.number for p in table.partitions), default=0)
    count = max(count, top)
    arr = np.zeros(count, dtype=entry_dtype(ENTRY_SIZE))
    for p in table.partitions:  # one per partition, not per entry
        if p.start % ss or p.size % ss or p.size <= 0:
            raise FormatError(f"gpt: partition {p.number} is not sector-aligned")
        name = p.name.encode("utf-16-le")
        if len(name) > 72:
            raise FormatError(f"gpt: partition name {p.name!r} is longer than 36 characters")
        e = arr[p.number - 1]
        e["partition_type_guid"] = np.void(guid_bytes(p.type))
        e["unique_partition_guid"] = np.void(guid_bytes(p.uuid or str(uuid.uuid4())))
        e["starting_lba"] = p.start // ss
        e["ending_lba"] = p.end // ss - 1
        attrs = p.attributes | (ATTR_LEGACY_BIOS_BOOTABLE if p.bootable else 0)
        e["attributes"] = attrs
        e["partition_name"] = np.void(name.ljust(72, b"\0"))
        arr[p.number - 1] = e
    return arr.tobytes()


def _header(
    *,
    my_lba: int,
    alternate_lba: int,
    first_usable: int,
    last_usable: int,
    disk_guid: bytes,
    entry_lba: int,
    count: int,
    esize: int,
    entries: bytes,
    ss: int,
) -> bytes:
    fields = {
        "revision": REVISION,
        "header_size": HEADER_SIZE,
        "header_crc32": 0,
        "reserved": 0,
        "my_lba": my_lba,
        "alternate_lba": alternate_lba,
        "first_usable_lba": first_usable,
        "last_usable_lba": last_usable,
        "disk_guid": disk_guid,
        "partition_entry_lba": entry_lba,
        "number_of_partition_entries": count,
        "size_of_partition_entry": esize,
        "partition_entry_array_crc32": zlib.crc32(entries),
    }
    raw = GPTHeader.build(fields)
    fields["header_crc32"] = header_crc(raw, HEADER_SIZE)
    return GPTHeader.build(fields).ljust(ss, b"\0")


def protective_mbr(disk_size: int, ss: int, *, old_sector: bytes | None = None) -> bytes:
    """Sector 0 of a GPT disk; an existing one keeps its boot code (GRUB's boot.img lives
    there on BIOS-booted GPT disks) and only its 0xEE entry is stretched to the end."""
    disk_sectors = disk_size // ss
    span = min(disk_sectors - 1, 0xFFFFFFFF)
    if old_sector is not None and mbr.probe(old_sector) == "protective":
        old = mbr.parse_sector(old_sector)
        entries = []
        for e in old.partitions:
            d = {
                k: e[k] for k in ("status", "chs_first", "type", "chs_last", "lba_first", "sectors")
            }
            if e.type == mbr.PROTECTIVE_TYPE:
                d["sectors"] = min(disk_sectors - e.lba_first, 0xFFFFFFFF)
                d["chs_last"] = b"\xff\xff\xff"
            entries.append(d)
        return mbr.build_sector(
            entries,
            signature=old.disk_signature,
            bootstrap=old.bootstrap,
            copy_protected=old.copy_protected,
        ) + bytes(ss - mbr.SECTOR)
    pmbr = {
        "status": 0,
        "chs_first": b"\x00\x02\x00",
        "type": mbr.PROTECTIVE_TYPE,
        "chs_last": b"\xff\xff\xff",
        "lba_first": 1,
        "sectors": span,
    }
    return mbr.build_sector([pmbr], signature=0) + bytes(ss - mbr.SECTOR)


def build(
    table: PartitionTable,
    disk_size: int,
    *,
    entries: bytes | None = None,
    entry_size: int = ENTRY_SIZE,
    first_usable_lba: int | None = None,
    old_sector0: bytes | None = None,
) -> list[tuple[int, bytes]]:
    """Everything to write for `table` on a disk of `disk_size` bytes: (offset, bytes) for
    the protective MBR, the primary header and array, the backup array and header."""
    ss = table.sector_size
    if entries is None:
        entries = build_entries(table)
        entry_size = ENTRY_SIZE
    count = len(entries) // entry_size
    array_sectors = -(-len(entries) // ss)
    disk_sectors = disk_size // ss
    last = disk_sectors - 1
    if first_usable_lba is None:
        first_usable_lba = 2 + array_sectors
    last_usable = last - 1 - array_sectors
    if last_usable < first_usable_lba:
        raise FormatError(f"gpt: a disk of {disk_size} bytes is too small for a GPT")
    for p in table.partitions:
        if p.start < first_usable_lba * ss or p.end > (last_usable + 1) * ss:
            raise FormatError(
                f"gpt: partition {p.number} (bytes {p.start}-{p.end - 1}) lies outside the "
                f"usable area (LBA {first_usable_lba}-{last_usable})"
            )
    guid = guid_bytes(table.id) if table.id else uuid.uuid4().bytes_le
    padded = entries.ljust(array_sectors * ss, b"\0")
    backup_array = last - array_sectors
    common: dict[str, Any] = dict(
        first_usable=first_usable_lba,
        last_usable=last_usable,
        disk_guid=guid,
        count=count,
        esize=entry_size,
        entries=entries,
        ss=ss,
    )
    return [
        (0, protective_mbr(disk_size, ss, old_sector=old_sector0)),
        (ss, _header(my_lba=1, alternate_lba=last, entry_lba=2, **common)),
        (2 * ss, padded),
        (backup_array * ss, padded),
        (last * ss, _header(my_lba=last, alternate_lba=1, entry_lba=backup_array, **common)),
    ]

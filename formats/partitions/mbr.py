"""The MBR (DOS) partition table: four primary entries in sector 0, logical partitions
in a chain of extended boot records (EBRs) inside an extended partition.

Numbering is Linux's: primaries 1-4 by slot (empty slots keep their number), logicals
from 5 in chain order. A chain that loops or leaves its extended partition is refused,
as is a partition past the end of the disk.
"""

from __future__ import annotations

import os

from construct import Array, Bytes, Const, Int8ul, Int32ul, Struct

from ..errors import CorruptImage, FormatError, UnsupportedFeature
from ..image import Image
from .table import Partition, PartitionTable

SECTOR = 512

# The classic MBR layout (sector 0 and every EBR share it).
PartitionEntry = Struct(
    "status" / Int8ul,  # 0x80 active (bootable), 0x00 inactive
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,
    "sectors" / Int32ul,
)

MBR = Struct(
    "bootstrap" / Bytes(440),
    "disk_signature" / Int32ul,
    "copy_protected" / Bytes(2),
    "partitions" / Array(4, PartitionEntry),
    "boot_signature" / Const(b"\x55\xaa"),
)

EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
#: Linux allows a few hundred partitions per disk; a longer chain is hostile
MAX_LOGICALS = 256

TYPE_NAMES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Ext'd (LBA)",
    0x11: "Hidden FAT12",
    0x12: "Compaq diagnostics",
    0x14: "Hidden FAT16 <32M",
    0x16: "Hidden FAT16",
    0x17: "Hidden HPFS/NTFS",
    0x1B: "Hidden W95 FAT32",
    0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)",
    0x27: "Hidden NTFS WinRE",
    0x42: "SFS",
    0x82: "Linux swap / Solaris",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xA6: "OpenBSD",
    0xA8: "Darwin UFS",
    0xA9: "NetBSD",
    0xAF: "HFS / HFS+",
    0xBE: "Solaris boot",
    0xBF: "Solaris",
    0xDE: "Dell Utility",
    0xEE: "GPT",
    0xEF: "EFI (FAT-12/16/32)",
    0xFB: "VMware VMFS",
    0xFC: "VMware VMKCORE",
    0xFD: "Linux raid autodetect",
}

#: the type a partition holding this filesystem gets when we write a table
TYPE_FOR_FILESYSTEM = {
    "vfat": 0x0C,
    "ntfs": 0x07,
    "exfat": 0x07,
    "swap": 0x82,
    "LVM2_member": 0x8E,
}
LINUX = 0x83


def type_name(type_byte: int) -> str:
    return TYPE_NAMES.get(type_byte, "Unknown")


def _boot_sector_kind(sector: bytes) -> str | None:
    """A filesystem's own boot sector (FAT, NTFS, exFAT, BitLocker) also ends in 55 AA.
    "volume": its OEM name says so, whatever the bytes where entries would be;
    "fat": a FAT BPB, which an MBR with real entries may still carry; None: neither."""
    if sector[0] not in (0xEB, 0xE9):
        return None
    if sector[3:11] in (b"NTFS    ", b"EXFAT   ", b"-FVE-FS-"):
        return "volume"
    bps = int.from_bytes(sector[11:13], "little")
    spc = sector[13]
    valid_bpb = bps in (512, 1024, 2048, 4096) and spc and not spc & (spc - 1)
    if valid_bpb and (sector[54:57] == b"FAT" or sector[82:85] == b"FAT"):
        return "fat"
    return None


def has_signature(sector: bytes) -> bool:
    return len(sector) >= SECTOR and sector[510:512] == b"\x55\xaa"


def parse_sector(sector: bytes):
    """The MBR declaration over one sector (which must carry the 55 AA signature)."""
    return MBR.parse(sector[:SECTOR])


def probe(sector: bytes) -> str | None:
    """What sector 0 holds: "mbr", "protective" (GPT follows), or None (no table)."""
    if not has_signature(sector):
        return None
    boot = _boot_sector_kind(sector)
    if boot == "volume":
        return None
    mbr = parse_sector(sector)
    entries = mbr.partitions
    if any(e.status not in (0x00, 0x80) for e in entries):
        return None  # boot code or a filesystem's boot sector, not entries
    used = [e for e in entries if e.type and e.sectors]
    if boot == "fat" and not used:
        return None
    if any(e.type == PROTECTIVE_TYPE for e in used):
        return "protective"
    return "mbr"


def read(image: Image) -> PartitionTable:
    """Parse sector 0 and the EBR chains (the caller has checked `probe` says "mbr")."""
    sector = image.read(0, SECTOR)
    mbr = parse_sector(sector)
    disk_sectors = image.size // SECTOR
    table = PartitionTable(
        kind="mbr",
        sector_size=SECTOR,
        disk_size=image.size,
        id=f"0x{mbr.disk_signature:08x}",
        partitions=[],
        metadata=[(0, SECTOR)],
    )
    extended: list[Partition] = []
    for slot, e in enumerate(mbr.partitions, start=1):
        if not e.type or not e.sectors:
            continue
        part = _partition(slot, 0, e, disk_sectors, mbr.disk_signature)
        part.is_container = e.type in EXTENDED_TYPES
        table.partitions.append(part)
        if part.is_container:
            extended.append(part)
    if len(extended) > 1:
        raise CorruptImage("mbr: more than one extended partition")
    if extended:
        _read_logicals(image, extended[0], table, disk_sectors, mbr.disk_signature)
    return table


def _partition(number: int, base: int, e, disk_sectors: int, signature: int) -> Partition:
    first = base + e.lba_first
    if first == 0 or first + e.sectors > disk_sectors:
        raise CorruptImage(
            f"mbr: partition {number} (sectors {first}-{first + e.sectors - 1}) lies outside "
            f"the disk ({disk_sectors} sectors)"
        )
    return Partition(
        number=number,
        start=first * SECTOR,
        size=e.sectors * SECTOR,
        type=f"{e.type:x}",
        type_name=type_name(e.type),
        uuid=f"{signature:08x}-{number:02x}",  # Linux's PARTUUID for MBR disks
        bootable=e.status == 0x80,
    )


def _read_logicals(
    image: Image, ext: Partition, table: PartitionTable, disk_sectors: int, signature: int
) -> None:
    """Follow the EBR chain; each link is relative to the extended partition's start."""
    ext_first = ext.start // SECTOR
    ext_end = ext_first + ext.size // SECTOR
    ebr = ext_first
    seen: set[int] = set()
    number = 5
    while True:
        if ebr in seen:
            raise CorruptImage(f"mbr: the logical partition chain loops back to sector {ebr}")
        if not ext_first <= ebr < ext_end:
            raise CorruptImage(
                f"mbr: an EBR at sector {ebr} lies outside the extended partition "
                f"(sectors {ext_first}-{ext_end - 1})"
            )
        if len(seen) >= MAX_LOGICALS:
            raise CorruptImage(f"mbr: more than {MAX_LOGICALS} logical partitions")
        seen.add(ebr)
        sector = image.read(ebr * SECTOR, SECTOR)
        if not has_signature(sector):
            if ebr != ext_first:
                table.warnings.append(f"mbr: EBR at sector {ebr} has no signature; chain ends")
            return
        table.metadata.append((ebr * SECTOR, SECTOR))
        entries = parse_sector(sector).partitions
        logical, link = entries[0], entries[1]
        if logical.type and logical.sectors:
            part = _partition(number, ebr, logical, disk_sectors, signature)
            if part.start < ext.start or part.end > ext.end:
                raise CorruptImage(
                    f"mbr: logical partition {number} lies outside its extended partition"
                )
            table.partitions.append(part)
            number += 1
        if link.type not in EXTENDED_TYPES or not link.sectors:
            return
        ebr = ext_first + link.lba_first


# -- writing -------------------------------------------------------------------


def chs(lba: int) -> bytes:
    """CHS address with the 255-head, 63-sector geometry every tool assumes; beyond
    cylinder 1023 the conventional FE FF FF marker."""
    cylinder, rest = divmod(lba, 255 * 63)
    head, sector = divmod(rest, 63)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    return bytes((head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF))


def entry(type_byte: int, first: int, sectors: int, *, bootable: bool = False) -> dict:
    if first > 0xFFFFFFFF or sectors > 0xFFFFFFFF:
        raise UnsupportedFeature("mbr: a partition beyond 2 TiB needs a GPT")
    last = first + sectors - 1
    return {
        "status": 0x80 if bootable else 0,
        "chs_first": chs(first),
        "type": type_byte,
        "chs_last": chs(last),
        "lba_first": first,
        "sectors": sectors,
    }


EMPTY = {
    "status": 0,
    "chs_first": bytes(3),
    "type": 0,
    "chs_last": bytes(3),
    "lba_first": 0,
    "sectors": 0,
}


def build_sector(
    entries: list[dict], *, signature: int, bootstrap: bytes = b"", copy_protected: bytes = b"\0\0"
) -> bytes:
    entries = (list(entries) + [EMPTY] * 4)[:4]
    return MBR.build(
        {
            "bootstrap": bootstrap[:440].ljust(440, b"\0"),
            "disk_signature": signature,
            "copy_protected": copy_protected,
            "partitions": entries,
            "boot_signature": b"\x55\xaa",
        }
    )


def build(table: PartitionTable, *, bootstrap: bytes = b"") -> list[tuple[int, bytes]]:
    """Sectors to write for `table`: (byte offset, 512 bytes), sector 0 then the EBRs.

    Logical partitions (numbers >= 5) need an extended container among the primaries;
    each one's EBR goes in the sector before it (the first at the container's start).
    """
    primaries = [p for p in table.partitions if p.number <= 4]
    logicals = sorted((p for p in table.partitions if p.number >= 5), key=lambda p: p.number)
    slots = [EMPTY] * 4
    container: Partition | None = None
    for p in primaries:
        t = int(p.type, 16)
        if p.start % SECTOR or p.size % SECTOR or p.start == 0:
            raise FormatError(f"mbr: partition {p.number} is not sector-aligned")
        slots[p.number - 1] = entry(t, p.start // SECTOR, p.size // SECTOR, bootable=p.bootable)
        if t in EXTENDED_TYPES:
            container = p
    signature = int(table.id, 16) if table.id else int.from_bytes(os.urandom(4), "little")
    out = [(0, build_sector(slots, signature=signature, bootstrap=bootstrap))]
    if not logicals:
        return out
    if container is None:
        raise FormatError("mbr: logical partitions need an extended partition")
    ext_first = container.start // SECTOR
    ebr = ext_first
    for i, p in enumerate(logicals):
        first = p.start // SECTOR
        if not (ebr < first and p.end <= container.end):
            raise FormatError(f"mbr: no room for the EBR of logical partition {p.number}")
        this = entry(int(p.type, 16), first - ebr, p.size // SECTOR, bootable=p.bootable)
        link = EMPTY
        if i + 1 < len(logicals):
            nxt = logicals[i + 1]
            next_ebr = max(nxt.start // SECTOR - 1, p.end // SECTOR)
            link = entry(0x05, next_ebr - ext_first, nxt.end // SECTOR - next_ebr)
        out.append((ebr * SECTOR, build_sector([this, link], signature=0)))
        if i + 1 < len(logicals):
            ebr = next_ebr
    return out

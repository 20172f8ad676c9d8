"""FAT12, FAT16 and FAT32: used clusters from the file allocation table.

Layout per Microsoft's "FAT: General Overview of On-Disk Format" (the BPB field names
below are spelled as it spells them). The reserved sectors, the FATs and the FAT12/16
root directory are always used; a cluster is used when its FAT entry is neither free (0)
nor marked bad. The FAT type follows from the cluster count, as the specification says,
not from the type string.
"""

from __future__ import annotations

import numpy as np
from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from ..errors import CorruptImage
from ..image import Image
from . import ranges
from .ranges import Ranges

# "BPB structure common to FAT12, FAT16 and FAT32 implementations"
BootSector = Struct(
    "BS_jmpBoot" / Bytes(3),
    "BS_OEMName" / Bytes(8),
    "BPB_BytsPerSec" / Int16ul,
    "BPB_SecPerClus" / Int8ul,
    "BPB_RsvdSecCnt" / Int16ul,
    "BPB_NumFATs" / Int8ul,
    "BPB_RootEntCnt" / Int16ul,
    "BPB_TotSec16" / Int16ul,
    "BPB_Media" / Int8ul,
    "BPB_FATSz16" / Int16ul,
    "BPB_SecPerTrk" / Int16ul,
    "BPB_NumHeads" / Int16ul,
    "BPB_HiddSec" / Int32ul,
    "BPB_TotSec32" / Int32ul,
    # the FAT32 extension (meaningless on FAT12/16, whose BPB_FATSz16 is non-zero)
    "BPB_FATSz32" / Int32ul,
    "BPB_ExtFlags" / Int16ul,
    "BPB_FSVer" / Int16ul,
    "BPB_RootClus" / Int32ul,
    "BPB_FSInfo" / Int16ul,
    "BPB_BkBootSec" / Int16ul,
)

#: a FAT32 volume holds at most 2^28 clusters; its FAT is read this many bytes at a time
CHUNK = 16 << 20
BAD = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}


def _geometry(sector: bytes) -> dict | None:
    """The BPB's numbers, or None when they are not a FAT volume's."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa" or sector[0] not in (0xEB, 0xE9):
        return None
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return None
    b = BootSector.parse(sector)
    bps, spc = b.BPB_BytsPerSec, b.BPB_SecPerClus
    if bps not in (512, 1024, 2048, 4096) or not spc or spc & (spc - 1):
        return None
    if not b.BPB_RsvdSecCnt or b.BPB_NumFATs not in (1, 2, 3, 4):
        return None
    if b.BPB_Media not in (0xF0, *range(0xF8, 0x100)):
        return None
    fat_size = b.BPB_FATSz16 or b.BPB_FATSz32
    total = b.BPB_TotSec16 or b.BPB_TotSec32
    root_sectors = -(-b.BPB_RootEntCnt * 32 // bps)
    first_data = b.BPB_RsvdSecCnt + b.BPB_NumFATs * fat_size + root_sectors
    if not fat_size or not total or first_data >= total:
        return None
    clusters = (total - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if (bits == 32) != (b.BPB_FATSz16 == 0):
        return None  # FAT32 needs BPB_FATSz32 and no root directory region, and vice versa
    active = 0
    if bits == 32 and b.BPB_ExtFlags & 0x80:  # mirroring off: only the active FAT is current
        active = b.BPB_ExtFlags & 0x0F
        if active >= b.BPB_NumFATs:
            return None
    return {
        "bps": bps,
        "spc": spc,
        "reserved": b.BPB_RsvdSecCnt,
        "fat_size": fat_size,
        "active": active,
        "total": total,
        "first_data": first_data,
        "clusters": clusters,
        "bits": bits,
    }


def probe(head: bytes) -> str | None:
    return "vfat" if _geometry(head[:512]) else None


def used(image: Image) -> Ranges:
    g = _geometry(image.read(0, min(512, image.size)))
    if g is None:
        raise CorruptImage("vfat: the boot sector's BPB is invalid")
    bps, bits, clusters = g["bps"], g["bits"], g["clusters"]
    if g["total"] * bps > image.size:
        raise CorruptImage(
            f"vfat: {g['total']} sectors of {bps} bytes do not fit in {image.size} bytes"
        )
    entries = clusters + 2
    if g["fat_size"] * bps * 8 < entries * bits:
        raise CorruptImage(f"vfat: a FAT of {g['fat_size']} sectors cannot map {clusters} clusters")
    fat_start = (g["reserved"] + g["active"] * g["fat_size"]) * bps
    cluster_bytes = g["spc"] * bps
    data_start = g["first_data"] * bps
    parts = [
        ranges.span(0, data_start),  # boot sector, reserved area, FATs, root directory
        ranges.span(data_start + clusters * cluster_bytes, image.size),  # past the clusters
    ]
    if bits == 12:
        parts.append(_fat12(image, fat_start, entries, data_start, cluster_bytes))
        return ranges.merge(parts)
    width = bits // 8
    per_chunk = CHUNK // width
    for first in range(0, entries, per_chunk):
        n = min(per_chunk, entries - first)
        raw = image.read(fat_start + first * width, n * width)
        fat = np.frombuffer(raw, dtype="<u2" if bits == 16 else "<u4")
        if bits == 32:
            fat = fat & 0x0FFFFFFF  # the top four bits are reserved
        in_use = (fat != 0) & (fat != BAD[bits])
        if first == 0:
            in_use[:2] = False  # entries 0 and 1 are the media byte and flags, not clusters
        base = data_start + (first - 2) * cluster_bytes
        parts.append(ranges.mask_ranges(in_use, cluster_bytes, base))
    return ranges.merge(parts)


def _fat12(image: Image, fat_start: int, entries: int, data_start: int, cluster: int) -> Ranges:
    nbytes = -(-entries * 3 // 2)
    raw = np.frombuffer(image.read(fat_start, nbytes + (nbytes % 3 and 3 - nbytes % 3)), np.uint8)
    triples = raw[: len(raw) // 3 * 3].reshape(-1, 3).astype(np.uint16)
    # two 12-bit entries share three bytes: low entry first
    even = triples[:, 0] | ((triples[:, 1] & 0x0F) << 8)
    odd = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    fat = np.stack((even, odd), axis=1).reshape(-1)[:entries]
    in_use = (fat != 0) & (fat != BAD[12])
    in_use[:2] = False
    return ranges.mask_ranges(in_use, cluster, data_start - 2 * cluster)

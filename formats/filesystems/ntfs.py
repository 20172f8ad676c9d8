"""NTFS: used clusters from $Bitmap, found through the MFT.

The boot sector gives the MFT's first cluster; MFT record 0 ($MFT) maps the MFT itself,
which locates record 6 ($Bitmap); that record's unnamed $DATA attribute is the cluster
bitmap (a run list when non-resident). Records are protected by update sequence arrays
("fixups"), checked and applied before anything in them is trusted. Structures as the
Linux ntfs3 driver and the NTFS documentation of the Linux-NTFS project describe them.

The backup boot sector, in the partition's last sector after the volume, is kept. A
volume whose $LogFile is not clean (mounted by Windows, hibernated by "fast startup",
or not cleanly unmounted) may have allocations only in its log: it is refused, and so
copied whole, by the rule ntfs-3g uses to refuse mounting it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from construct import Bytes, Int8sl, Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Struct

from ..errors import CorruptImage, UnsupportedFeature
from ..image import Image
from . import ranges
from .ranges import Ranges

# NTFS boot sector (BIOS parameter block and its NTFS extension)
BootSector = Struct(
    "jump" / Bytes(3),
    "oem_id" / Bytes(8),  # "NTFS    "
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,  # above 0x80: 2^(256 - value) sectors
    "reserved_sectors" / Int16ul,
    "unused1" / Bytes(5),
    "media_descriptor" / Int8ul,
    "unused2" / Bytes(18),
    "total_sectors" / Int64ul,
    "mft_lcn" / Int64ul,
    "mftmirr_lcn" / Int64ul,
    "clusters_per_mft_record" / Int8sl,  # negative: a record is 2^-value bytes
    "unused3" / Bytes(3),
    "clusters_per_index_record" / Int8sl,
    "unused4" / Bytes(3),
    "volume_serial_number" / Int64ul,
)

# MFT record header ("FILE" record)
RecordHeader = Struct(
    "magic" / Bytes(4),
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
    "lsn" / Int64ul,
    "sequence_number" / Int16ul,
    "link_count" / Int16ul,
    "attrs_offset" / Int16ul,
    "flags" / Int16ul,
    "bytes_in_use" / Int32ul,
    "bytes_allocated" / Int32ul,
)

AttributeHeader = Struct(
    "type" / Int32ul,
    "length" / Int32ul,
    "non_resident" / Int8ul,
    "name_length" / Int8ul,
    "name_offset" / Int16ul,
    "flags" / Int16ul,
    "instance" / Int16ul,
)
ResidentPart = Struct(
    "value_length" / Int32ul,
    "value_offset" / Int16ul,
)
NonResidentPart = Struct(
    "lowest_vcn" / Int64sl,
    "highest_vcn" / Int64sl,
    "mapping_pairs_offset" / Int16ul,
    "compression_unit" / Int8ul,
    "reserved" / Bytes(5),
    "allocated_size" / Int64sl,
    "data_size" / Int64sl,
    "initialized_size" / Int64sl,
)

# $LogFile's restart page (layout.h: RESTART_PAGE_HEADER) and restart area
RestartPageHeader = Struct(
    "magic" / Bytes(4),  # "RSTR" ("CHKD" after chkdsk)
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
    "chkdsk_lsn" / Int64sl,
    "system_page_size" / Int32ul,
    "log_page_size" / Int32ul,
    "restart_area_offset" / Int16ul,
    "minor_ver" / Int16ul,
    "major_ver" / Int16ul,
)
RestartArea = Struct(
    "current_lsn" / Int64sl,
    "log_clients" / Int16ul,
    "client_free_list" / Int16ul,
    "client_in_use_list" / Int16ul,
    "flags" / Int16ul,
)
RESTART_VOLUME_IS_CLEAN = 0x0002
LOGFILE_NO_CLIENT = 0xFFFF
LOG_PAGE = 4096

AT_ATTRIBUTE_LIST = 0x20
AT_DATA = 0x80
AT_END = 0xFFFFFFFF
FILE_MFT = 0
FILE_LOGFILE = 2
FILE_BITMAP = 6
FIXUP_SECTOR = 512
MAX_RUNS = 1 << 16


def probe(head: bytes) -> str | None:
    if len(head) >= 512 and head[3:11] == b"NTFS    " and head[510:512] == b"\x55\xaa":
        return "ntfs"
    return None


def _geometry(image: Image) -> tuple[int, int, int, int]:
    """(cluster size, record size, MFT byte offset, volume clusters), validated."""
    b = BootSector.parse(image.read(0, 512))
    bps = b.bytes_per_sector
    if bps not in (256, 512, 1024, 2048, 4096):
        raise CorruptImage(f"ntfs: {bps} bytes per sector is invalid")
    spc = b.sectors_per_cluster
    spc = 1 << (256 - spc) if spc > 0x80 else spc
    if not spc or spc & (spc - 1) or spc * bps > 2 << 20:
        raise CorruptImage(f"ntfs: {b.sectors_per_cluster} sectors per cluster is invalid")
    cluster = spc * bps
    cpr = b.clusters_per_mft_record
    record = cluster * cpr if cpr > 0 else 1 << -cpr if cpr > -31 else 0
    if record < 256 or record > 65536 or record & (record - 1):
        raise CorruptImage(f"ntfs: MFT record size {record} is invalid")
    if b.total_sectors * bps > image.size:
        raise CorruptImage(
            f"ntfs: {b.total_sectors} sectors of {bps} bytes do not fit in {image.size} bytes"
        )
    clusters = b.total_sectors * bps // cluster
    if not 0 < b.mft_lcn < clusters:
        raise CorruptImage(f"ntfs: the MFT at cluster {b.mft_lcn} lies outside the volume")
    return cluster, record, b.mft_lcn * cluster, clusters


def apply_fixups(rec: bytearray, what: str) -> None:
    """Check and undo the update sequence: each 512-byte stride ends in the USN, whose
    real two bytes are kept in the array."""
    h = RecordHeader.parse(rec)
    strides = len(rec) // FIXUP_SECTOR
    if (
        h.usa_count != strides + 1
        or h.usa_ofs < 8  # after the magic and these two fields (RSTR pages use 0x1e)
        or (h.usa_ofs + 2 * h.usa_count > FIXUP_SECTOR - 2)
    ):
        raise CorruptImage(f"ntfs: {what} has an invalid update sequence array")
    usa = np.frombuffer(rec, dtype="<u2", count=h.usa_count, offset=h.usa_ofs).copy()
    view = np.frombuffer(rec, dtype="<u2").reshape(strides, FIXUP_SECTOR // 2)
    if (view[:, -1] != usa[0]).any():
        raise CorruptImage(f"ntfs: {what} fails its update sequence check (torn write?)")
    view[:, -1] = usa[1:]


def read_record(image: Image, offset: int, size: int, what: str) -> bytearray:
    rec = bytearray(image.read(offset, size))
    if rec[:4] != b"FILE":
        raise CorruptImage(f"ntfs: {what} at {offset:#x} has no FILE signature")
    apply_fixups(rec, what)
    return rec


def find_data(rec: bytearray, what: str) -> tuple[Any, Any, int]:
    """The unnamed $DATA attribute: (header, resident or non-resident part, its offset)."""
    h = RecordHeader.parse(rec)
    pos = h.attrs_offset
    end = min(h.bytes_in_use, len(rec))
    seen_list = False
    while pos + 4 <= end:
        if int.from_bytes(rec[pos : pos + 4], "little") == AT_END:
            break
        if pos + 16 > end:
            raise CorruptImage(f"ntfs: {what} has a truncated attribute at {pos:#x}")
        a = AttributeHeader.parse(rec[pos : pos + 16])
        if a.length < 16 or pos + a.length > end or a.length % 8:
            raise CorruptImage(f"ntfs: {what} has an attribute of invalid length at {pos:#x}")
        seen_list |= a.type == AT_ATTRIBUTE_LIST
        if a.type == AT_DATA and a.name_length == 0:
            cls = NonResidentPart if a.non_resident else ResidentPart
            if 16 + cls.sizeof() > a.length:
                raise CorruptImage(f"ntfs: {what}'s $DATA attribute is truncated")
            return a, cls.parse(rec[pos + 16 : pos + a.length]), pos
        pos += a.length
    if seen_list:
        raise UnsupportedFeature(f"ntfs: {what}'s $DATA lives in an attribute list")
    raise CorruptImage(f"ntfs: {what} has no $DATA attribute")


def decode_runs(raw: bytes, clusters: int) -> list[tuple[int, int | None]]:
    """A mapping-pairs array: [(length in clusters, first LCN or None when sparse)]."""
    runs: list[tuple[int, int | None]] = []
    pos = 0
    lcn = 0
    while pos < len(raw) and raw[pos]:
        header = raw[pos]
        nlen, noff = header & 0x0F, header >> 4
        if not nlen or nlen > 8 or noff > 8 or pos + 1 + nlen + noff > len(raw):
            raise CorruptImage("ntfs: a run list entry is malformed")
        length = int.from_bytes(raw[pos + 1 : pos + 1 + nlen], "little", signed=True)
        if length <= 0:
            raise CorruptImage("ntfs: a run list entry has a non-positive length")
        if noff:
            lcn += int.from_bytes(
                raw[pos + 1 + nlen : pos + 1 + nlen + noff], "little", signed=True
            )
            if lcn < 0 or lcn + length > clusters:
                raise CorruptImage(f"ntfs: a run at cluster {lcn} (+{length}) leaves the volume")
            runs.append((length, lcn))
        else:
            runs.append((length, None))
        if len(runs) > MAX_RUNS:
            raise CorruptImage("ntfs: a run list is implausibly long")
        pos += 1 + nlen + noff
    return runs


def _runs_of(rec: bytearray, a, nr, pos: int, clusters: int) -> list[tuple[int, int | None]]:
    start = pos + nr.mapping_pairs_offset
    if not pos + 16 + NonResidentPart.sizeof() <= start <= pos + a.length:
        raise CorruptImage("ntfs: a run list lies outside its attribute")
    return decode_runs(bytes(rec[start : pos + a.length]), clusters)


def read_attribute(
    image: Image, runs: list[tuple[int, int | None]], cluster: int, nbytes: int
) -> bytes:
    out = bytearray()
    for length, lcn in runs:
        if len(out) >= nbytes:
            break
        n = min(length * cluster, nbytes - len(out))
        out += image.read(lcn * cluster, n) if lcn is not None else bytes(n)
    if len(out) < nbytes:
        raise CorruptImage("ntfs: an attribute's run list is shorter than its data")
    return bytes(out)


def record_offset(mft_runs: list[tuple[int, int | None]], n: int, record: int, cluster: int) -> int:
    """Byte offset of MFT record `n`, by walking the MFT's own run list."""
    want = n * record
    vcn_bytes = 0
    for length, lcn in mft_runs:
        size = length * cluster
        if want < vcn_bytes + size:
            if lcn is None or want + record > vcn_bytes + size:
                raise UnsupportedFeature(f"ntfs: MFT record {n} is sparse or split between runs")
            return lcn * cluster + want - vcn_bytes
        vcn_bytes += size
    raise CorruptImage(f"ntfs: the MFT is too short to hold record {n}")


def log_is_clean(
    image: Image, mft_runs: list[tuple[int, int | None]], cluster: int, record: int, clusters: int
) -> bool:
    """ntfs-3g's rule: $LogFile is clean when it is empty (all 0xFF, as mkntfs and
    ntfsfix leave it) or when every restart page says no client is in use or the
    volume is clean. Anything unreadable answers False."""
    rec = read_record(
        image,
        record_offset(mft_runs, FILE_LOGFILE, record, cluster),
        record,
        "MFT record 2 ($LogFile)",
    )
    a, nr, pos = find_data(rec, "$LogFile")
    if not a.non_resident or nr.data_size < 2 * LOG_PAGE:
        return False
    head = read_attribute(image, _runs_of(rec, a, nr, pos, clusters), cluster, 2 * LOG_PAGE)
    if head[:LOG_PAGE].count(0xFF) == LOG_PAGE:
        return True
    pages = 0
    for off in (0, LOG_PAGE):
        page = bytearray(head[off : off + LOG_PAGE])
        if page[:4] != b"RSTR":
            continue
        h = RestartPageHeader.parse(page)
        if h.system_page_size != LOG_PAGE:
            return False  # other page sizes exist (and are rare): stay on the safe side
        try:
            apply_fixups(page, "a $LogFile restart page")
        except CorruptImage:
            return False
        ra_at = h.restart_area_offset
        if ra_at + RestartArea.sizeof() > LOG_PAGE:
            return False
        ra = RestartArea.parse(page[ra_at:])
        if ra.client_in_use_list != LOGFILE_NO_CLIENT and not ra.flags & RESTART_VOLUME_IS_CLEAN:
            return False
        pages += 1
    return pages > 0


def used(image: Image) -> Ranges:
    if image.size < 512 or probe(image.read(0, 512)) is None:
        raise CorruptImage("ntfs: no NTFS boot sector")
    cluster, record, mft, clusters = _geometry(image)
    mft_rec = read_record(image, mft, record, "MFT record 0 ($MFT)")
    a, nr, pos = find_data(mft_rec, "$MFT")
    if not a.non_resident:
        raise CorruptImage("ntfs: $MFT's data is resident")
    mft_runs = _runs_of(mft_rec, a, nr, pos, clusters)
    if not log_is_clean(image, mft_runs, cluster, record, clusters):
        raise UnsupportedFeature(
            "ntfs: $LogFile is not clean (mounted, hibernated or not cleanly unmounted): "
            "$Bitmap may miss what the log holds"
        )
    bitmap_rec_at = record_offset(mft_runs, FILE_BITMAP, record, cluster)
    brec = read_record(image, bitmap_rec_at, record, "MFT record 6 ($Bitmap)")
    a, part, pos = find_data(brec, "$Bitmap")
    need = -(-clusters // 8)
    if a.non_resident:
        if part.data_size < need or part.data_size > need + (1 << 20):
            raise CorruptImage(f"ntfs: $Bitmap is {part.data_size} bytes for {clusters} clusters")
        bitmap = read_attribute(image, _runs_of(brec, a, part, pos, clusters), cluster, need)
    else:
        start = pos + part.value_offset
        if part.value_length < need or start + part.value_length > pos + a.length:
            raise CorruptImage("ntfs: the resident $Bitmap is too short or out of bounds")
        bitmap = bytes(brec[start : start + need])
    return ranges.merge(
        [
            ranges.span(0, cluster),  # the boot sector ($Boot's first cluster; in the bitmap too)
            ranges.bitmap_ranges(bitmap, clusters, cluster),
            ranges.span(clusters * cluster, image.size),  # backup boot sector, slack
        ]
    )

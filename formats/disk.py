"""Whole disks: what a disk holds, which of its bytes are in use, a partition wrapped into
one. These need both the partition tables (formats/partitions) and the filesystems'
used-block maps (formats/filesystems); neither of those imports the other.

    describe(image) -> DiskLayout                      (what `p2v partitions` prints)
    used_ranges(image) -> Ranges, used_extents(image) -> list[Extent]   (--skip-unused)
    wrap_partition(part_image, "gpt"|"mbr") -> Image   (a virtual disk holding it)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from .errors import FormatError
from .extents import Extent
from .filesystems import detect, map_volume, ranges
from .filesystems.ranges import Ranges
from .image import Image
from .partitions import gpt, mbr, read_table
from .partitions.table import Partition, PartitionTable
from .views import CompositeImage, Piece, WindowImage

__all__ = ["DiskLayout", "LayoutEntry", "describe", "used_extents", "used_ranges", "wrap_partition"]

log = logging.getLogger(__name__)

#: where a wrapped partition starts, as every partitioning tool aligns today
ALIGNMENT = 1 << 20


def used_ranges(image: Image) -> Ranges:
    """Used byte ranges of a whole disk, or of a bare filesystem image."""
    whole = ranges.span(0, image.size)
    try:
        table = read_table(image)
    except FormatError as exc:
        log.warning("partition table unusable (%s); the whole disk is copied", exc)
        return whole
    if table is None:
        return map_volume(image, image.path or "the image")
    parts = [ranges.span(off, off + n) for off, n in table.metadata]
    data = [p for p in table.partitions if not p.is_container]
    if not data:
        return whole  # a table without partitions: we cannot tell what the disk holds
    parts.append(ranges.span(0, min(p.start for p in data)))
    for p in data:
        if table.kind == "gpt" and p.type in gpt.RAW_TYPES:
            parts.append(ranges.span(p.start, p.end))  # BIOS boot, MS reserved: no filesystem
            continue
        view = WindowImage(image, p.start, p.size)
        parts.append(ranges.shift(map_volume(view, f"partition {p.number}"), p.start))
    return ranges.merge(parts)


def used_extents(image: Image) -> list[Extent]:
    """DATA where a filesystem (or the partition table) uses the disk, ZERO where it is
    free; coalesced, covering [0, image.size)."""
    return ranges.to_extents(used_ranges(image), image.size)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def wrap_partition(part_image: Image, table: str = "gpt") -> Image:
    """A read-only virtual disk: a fresh `table` with one partition at 1 MiB holding
    `part_image`, its type chosen from the filesystem inside. The disk's size is a whole
    number of MiB (a GPT's backup entries and header sit in its last 33 sectors)."""
    if table not in ("gpt", "mbr"):
        raise FormatError(f"unknown partition table kind {table!r} (gpt or mbr)")
    ss = mbr.SECTOR
    psize = _round_up(part_image.size, ss)
    if psize == 0:
        raise FormatError("cannot wrap an empty partition")
    fs = detect(part_image)
    if table == "gpt":
        disk_size = _round_up(ALIGNMENT + psize + 33 * ss, ALIGNMENT)
        ptype = gpt.TYPE_FOR_FILESYSTEM.get(fs or "", gpt.LINUX_FILESYSTEM)
        part = Partition(
            number=1,
            start=ALIGNMENT,
            size=psize,
            type=ptype,
            type_name=gpt.type_name(ptype),
            uuid=str(uuid.uuid4()).upper(),
        )
        t = PartitionTable("gpt", ss, disk_size, str(uuid.uuid4()).upper(), [part])
        writes = gpt.build(t, disk_size)
    else:
        disk_size = _round_up(ALIGNMENT + psize, ALIGNMENT)
        type_byte = mbr.TYPE_FOR_FILESYSTEM.get(fs or "", mbr.LINUX)
        part = Partition(
            number=1,
            start=ALIGNMENT,
            size=psize,
            type=f"{type_byte:x}",
            type_name=mbr.type_name(type_byte),
            bootable=True,  # some BIOSes boot only from a disk with an active partition
        )
        signature = int.from_bytes(uuid.uuid4().bytes[:4], "little")
        t = PartitionTable("mbr", ss, disk_size, f"0x{signature:08x}", [part])
        writes = mbr.build(t)
    return CompositeImage(_lay_out(writes, part_image, ALIGNMENT, disk_size), path=part_image.path)


def _lay_out(writes: list[tuple[int, bytes]], part: Image, at: int, disk_size: int) -> list[Piece]:
    """Table sectors, the partition at `at`, zeros in every gap."""
    items: list[tuple[int, int, Piece]] = [
        (off, len(data), Piece(len(data), data=data)) for off, data in writes
    ]
    items.append((at, part.size, Piece(part.size, image=part)))
    items.sort(key=lambda t: t[0])
    pieces: list[Piece] = []
    pos = 0
    for off, n, piece in items:
        if off < pos:
            raise FormatError("the partition table overlaps the partition")
        if off > pos:
            pieces.append(Piece(off - pos))
        if pieces and piece.data is not None and pieces[-1].data is not None:
            prev = pieces.pop()
            assert prev.data is not None
            joined = prev.data + piece.data
            piece = Piece(len(joined), data=joined)
        pieces.append(piece)
        pos = off + n
    if pos < disk_size:
        pieces.append(Piece(disk_size - pos))
    return pieces


@dataclass
class LayoutEntry:
    number: int
    start: int
    end: int  # exclusive
    size: int
    type: str
    type_name: str
    name: str | None = None
    uuid: str | None = None
    bootable: bool = False
    filesystem: str | None = None
    container: bool = False


@dataclass
class DiskLayout:
    """What `p2v partitions` shows: the table and the filesystem in each partition."""

    filename: str
    format: str
    size: int
    label: str | None  # "gpt", "mbr", or None for a bare filesystem / unknown content
    id: str | None = None
    sector_size: int | None = None
    first_usable: int | None = None
    last_usable: int | None = None
    filesystem: str | None = None  # for an image without a partition table
    partitions: list[LayoutEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def describe(image: Image) -> DiskLayout:
    layout = DiskLayout(filename=image.path or "", format=image.format, size=image.size, label=None)
    table = read_table(image)
    if table is None:
        layout.filesystem = detect(image)
        return layout
    layout.label = table.kind
    layout.id = table.id
    layout.sector_size = table.sector_size
    layout.first_usable = table.first_usable
    layout.last_usable = table.last_usable
    layout.warnings = list(table.warnings)
    for p in table.partitions:
        fs = None if p.is_container else detect(WindowImage(image, p.start, p.size))
        layout.partitions.append(
            LayoutEntry(
                number=p.number,
                start=p.start,
                end=p.end,
                size=p.size,
                type=p.type,
                type_name=p.type_name,
                name=p.name or None,
                uuid=p.uuid,
                bootable=p.bootable,
                filesystem=fs,
                container=p.is_container,
            )
        )
    return layout

"""Partition tables (MBR and GPT), read and written; a partition seen as an `Image`; a
partition image wrapped into a whole disk.

    read_table(image) -> PartitionTable | None
    partition_image(image, number) -> Image      (a window onto the disk)
    wrap_partition(part_image, "gpt"|"mbr") -> Image   (a virtual disk holding it)
    write_table(image, table)
    describe(image) -> DiskLayout                (what `p2v partitions` prints)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from ..errors import FormatError
from ..image import Image
from ..views import CompositeImage, Piece, WindowImage
from . import gpt, mbr
from .table import Partition, PartitionTable

__all__ = [
    "DiskLayout",
    "LayoutEntry",
    "Partition",
    "PartitionTable",
    "describe",
    "partition_image",
    "read_table",
    "wrap_partition",
    "write_table",
]

log = logging.getLogger(__name__)

#: where a wrapped partition starts, as every partitioning tool aligns today
ALIGNMENT = 1 << 20


def read_table(image: Image) -> PartitionTable | None:
    """The partition table on `image`, or None when it has none (a bare filesystem).

    A damaged table raises CorruptImage; a damaged GPT primary whose backup is sound is
    read from the backup, with a warning logged (and kept in `table.warnings`).
    """
    if image.size < mbr.SECTOR:
        return None
    sector = image.read(0, mbr.SECTOR)
    kind = mbr.probe(sector)
    table = mbr.read(image) if kind == "mbr" else gpt.read(image, protective=kind == "protective")
    if table is not None:
        for w in table.warnings:
            log.warning("%s", w)
    return table


def partition_image(image: Image, number: int) -> Image:
    """Partition `number` of the disk `image` as an Image (writable if the disk is)."""
    table = read_table(image)
    if table is None:
        raise FormatError(f"{image.path or 'image'}: no partition table")
    p = table.partition(number)
    if p.is_container:
        raise FormatError(
            f"partition {number} is an extended partition: it holds logical partitions "
            f"(numbered from 5), not data"
        )
    return WindowImage(image, p.start, p.size)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def wrap_partition(part_image: Image, table: str = "gpt") -> Image:
    """A read-only virtual disk: a fresh `table` with one partition at 1 MiB holding
    `part_image`, its type chosen from the filesystem inside. The disk's size is a whole
    number of MiB (a GPT's backup entries and header sit in its last 33 sectors)."""
    from ..filesystems import detect

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


def write_table(image: Image, table: PartitionTable) -> None:
    """Write `table` onto the writable `image` (GPT: protective MBR, both headers and
    both entry arrays; MBR: sector 0 and the EBR chain)."""
    if table.kind == "gpt":
        old0 = image.read(0, mbr.SECTOR)
        writes = gpt.build(table, image.size, old_sector0=old0)
    elif table.kind == "mbr":
        bootstrap = image.read(0, 440) if image.size >= mbr.SECTOR else b""
        writes = mbr.build(table, bootstrap=bootstrap)
    else:
        raise FormatError(f"unknown partition table kind {table.kind!r}")
    for off, data in writes:
        image.write(off, data)


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
    from ..filesystems import detect

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

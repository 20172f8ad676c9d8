"""Partition tables (MBR and GPT), read and written; a partition seen as an `Image`.

    read_table(image) -> PartitionTable | None
    partition_image(image, number) -> Image      (a window onto the disk)
    write_table(image, table)

What needs the filesystems too (describing a disk, wrapping a partition into one) is in
formats/disk.py, above both packages.
"""

from __future__ import annotations

import logging

from ..errors import FormatError
from ..image import Image
from ..views import WindowImage
from . import gpt, mbr
from .table import Partition, PartitionTable

__all__ = [
    "Partition",
    "PartitionTable",
    "partition_image",
    "read_table",
    "write_table",
]

log = logging.getLogger(__name__)


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

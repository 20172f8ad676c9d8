"""Growing and shrinking images, keeping a GPT valid (`qemu-img resize` plus what
`sgdisk -e` does afterwards).

The format does the resizing: an Image with a `resize(new_size)` method is asked to,
raw is truncated, anything else is refused. A GPT's backup entries and header then move
to the new last sectors, and the protective MBR is stretched to match. The CLI asks for
--shrink before shrinking (as qemu-img does); shrinking below the end of the last
partition is always refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import open as open_image
from .errors import FormatError, UnsupportedFeature
from .image import Image
from .partitions import gpt, mbr, read_table
from .partitions.table import PartitionTable

log = logging.getLogger(__name__)

#: GPT's backup needs the last 33 sectors (32 of entries, 1 header) at 512 bytes each
GPT_TAIL_SECTORS = 33


@dataclass
class ResizeResult:
    filename: str
    format: str
    old_size: int
    new_size: int
    table: str | None = None
    gpt_backup_moved: bool = False


def resize(
    image_path: str, new_size: int, fmt: str | None = None, *, shrink: bool = True
) -> ResizeResult:
    """Resize the image at `image_path` to `new_size` bytes. `shrink=False` refuses any
    shrinking (the CLI's default, as qemu-img's without --shrink); shrinking below the
    end of the last partition is always refused."""
    if new_size < 0:
        raise FormatError(f"invalid size {new_size}")
    with open_image(image_path, fmt, writable=True) as img:
        old = img.size
        result = ResizeResult(image_path, img.format, old, new_size)
        if new_size == old:
            return result
        table = read_table(img)
        result.table = table.kind if table else None
        if new_size < old:
            if not shrink:
                raise FormatError(
                    f"{image_path}: shrinking from {old} to {new_size} bytes needs --shrink "
                    f"(data past the new end is lost)"
                )
            _check_shrink(table, new_size)
        ss = table.sector_size if table else 512
        if new_size % ss and table is not None and table.kind == "gpt":
            raise FormatError(f"{image_path}: a GPT disk's size must be a multiple of {ss}")
        if table is not None and table.kind == "gpt" and new_size < old:
            _write_gpt(img, table, new_size)  # inside the old size, before cutting it off
            _resize_format(img, new_size)
            result.gpt_backup_moved = True
        else:
            _resize_format(img, new_size)
            if table is not None and table.kind == "gpt":
                _write_gpt(img, table, new_size)
                result.gpt_backup_moved = True
        img.flush()
    return result


def _check_shrink(table: PartitionTable | None, new_size: int) -> None:
    if table is None or not table.partitions:
        return
    last = max(table.partitions, key=lambda p: p.end)
    need = last.end
    if table.kind == "gpt":
        need += GPT_TAIL_SECTORS * table.sector_size
    if new_size < need:
        raise FormatError(
            f"shrinking to {new_size} bytes would cut partition {last.number} "
            f"(it ends at byte {last.end}; at least {need} bytes are needed)"
        )


def _resize_format(img: Image, new_size: int) -> None:
    method = getattr(img, "resize", None)
    if callable(method):
        method(new_size)
    elif img.format == "raw" and hasattr(img, "fd"):
        if getattr(img, "is_block_device", False):
            raise UnsupportedFeature(f"{img.path}: a block device cannot be resized")
        os.ftruncate(img.fd, new_size)
        img.size = new_size
    else:
        raise UnsupportedFeature(f"{img.format}: resizing is not supported for this format")
    if img.size != new_size:
        raise FormatError(f"{img.format}: resize left the image at {img.size} bytes")


def _write_gpt(img: Image, table: PartitionTable, new_size: int) -> None:
    """Rewrite both GPT copies for a disk of `new_size` bytes, entries unchanged."""
    ss = table.sector_size
    raw = table.raw
    old_backup = raw.get("backup_lba")
    writes = gpt.build(
        table,
        new_size,
        entries=raw["entries"],
        entry_size=raw["entry_size"],
        first_usable_lba=raw["first_usable_lba"],
        old_sector0=img.read(0, mbr.SECTOR),
    )
    # a stale backup header left in what is now free space could be found by a
    # recovery tool and trusted: wipe it when it is still inside the disk
    new_last = new_size // ss - 1
    if raw.get("backup_ok") and old_backup is not None and old_backup < new_last:
        img.write(old_backup * ss, bytes(ss))
    for off, data in writes:
        if off + len(data) > img.size:
            raise FormatError("gpt: the new table does not fit the resized image")
        img.write(off, data)

"""Filesystems' used-block maps: what `--skip-unused` copies, like partclone.

    detect(image) -> "ext4" | "vfat" | "ntfs" | "xfs" | "swap" | "LVM2_member" | ... | None
    used_extents(image) -> list[Extent]   (DATA = used, ZERO = free; covers [0, size))

One module per filesystem, each with `probe(head) -> name | None` and
`used(image) -> Ranges`. For a whole disk, the partition table's own sectors and
everything before the first partition (where BIOS boot loaders hide) are DATA, each
partition is mapped by the filesystem inside it, gaps between partitions are ZERO. A
partition whose filesystem is unknown or damaged is copied whole, with a warning that
names it: copying too much costs time, copying too little loses data.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
from types import ModuleType

from ..errors import FormatError
from ..extents import Extent
from ..image import Image
from ..views import WindowImage
from . import ranges
from .ranges import Ranges

__all__ = ["detect", "map_volume", "used_extents", "used_ranges"]

log = logging.getLogger(__name__)

#: probe order: filesystems with a boot sector first (their 55 AA must not pass for
#: anything else), LVM after the filesystems (its label may sit in any of the first four
#: sectors), then content we only name
MODULES = ("ntfs", "fat", "xfs", "ext4", "swap", "lvm", "signatures")
#: enough for every probe: swap's signature ends its first page (up to 64 KiB), btrfs's
#: superblock sits at 64 KiB
HEAD = 68 << 10
#: a logical volume may hold a physical volume; stop at this depth
MAX_DEPTH = 4

_depth: contextvars.ContextVar[int] = contextvars.ContextVar("filesystems_depth", default=0)


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{m}") for m in MODULES]


def _head(image: Image) -> bytes:
    return image.read(0, min(image.size, HEAD))


def _probe(image: Image) -> tuple[str, ModuleType] | None:
    head = _head(image)
    for mod in _modules():
        try:
            name = mod.probe(head)
        except FormatError:
            name = None
        if name:
            return name, mod
    return None


def detect(image: Image) -> str | None:
    """Name the filesystem (or volume member) `image` holds, as blkid names it."""
    found = _probe(image)
    return found[0] if found else None


def map_volume(image: Image, label: str) -> Ranges:
    """Used byte ranges of one volume (a partition, a logical volume, a bare image).
    Unknown or damaged content is all DATA, with a warning naming `label`."""
    whole = ranges.span(0, image.size)
    depth = _depth.get()
    if depth >= MAX_DEPTH:
        log.warning("%s: volumes nested too deep; copied whole", label)
        return whole
    found = _probe(image)
    if found is None:
        log.warning("%s: no filesystem recognised; copied whole", label)
        return whole
    name, mod = found
    used = getattr(mod, "used", None)
    if used is None:
        log.warning("%s: no used-block map for %s; copied whole", label, name)
        return whole
    token = _depth.set(depth + 1)
    try:
        r = used(image)
    except FormatError as exc:
        log.warning("%s: %s copied whole: %s", label, name, exc)
        return whole
    finally:
        _depth.reset(token)
    return ranges.clip(r, 0, image.size)


def used_ranges(image: Image) -> Ranges:
    """Used byte ranges of a whole disk, or of a bare filesystem image."""
    from ..partitions import gpt, read_table

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

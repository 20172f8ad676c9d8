"""Filesystems' used-block maps: what `--skip-unused` copies, like partclone.

    detect(image) -> "ext4" | "vfat" | "ntfs" | "xfs" | "swap" | "LVM2_member" | ... | None
    map_volume(image, label) -> Ranges   (the used byte ranges of one volume)

One module per filesystem, each with `probe(head) -> name | None` and
`used(image) -> Ranges`. A whole disk is mapped by formats/disk.py's `used_extents`: the partition table's own sectors and
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
from ..image import Image
from . import ranges
from .ranges import Ranges

__all__ = ["detect", "map_volume"]

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

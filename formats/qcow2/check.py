"""`qemu-img check` for qcow2: expected refcounts rebuilt from every table, compared
with the refcount blocks.

Every structure that owns host clusters adds its cluster indices to one list of numpy
arrays (header, L1 tables, L2 tables, data and compressed clusters, refcount table and
blocks, snapshot table, bitmaps); one bincount gives the expected counts. A count on
disk below the expected one is a corruption (a write could reuse a cluster in use), one
above is a leak, as qemu counts them. Tables pointing outside the file, misaligned or
with reserved bits, invalid compressed descriptors, overlapping metadata and wrong
OFLAG_COPIED flags are corruptions too. The walk over the tables is in refcounts.py,
which also rebuilds a dirty image's refcounts from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..fileio import file_size
from ..image import CheckResult
from . import layout as L
from .refcounts import MAX_MESSAGES, check_overlaps, collect_references, expected_refcounts

if TYPE_CHECKING:
    from .image import Qcow2Image


def _listed(messages: list[str], more: int, what: str) -> list[str]:
    if more > 0:
        messages.append(f"... and {more} more {what}")
    return messages


def check_image(img: Qcow2Image) -> CheckResult:
    fsize = file_size(img.fd)
    refs, _, ondisk = collect_references(img, fsize)
    expected, by_owner = expected_refcounts(refs)
    check_overlaps(refs, by_owner)
    result = CheckResult()
    if img.meta.incompatible & L.INCOMPAT_DIRTY:
        result.corruptions.append(
            "image is marked dirty (lazy refcounts were not written back): refcounts are "
            "stale until repaired (qemu-img check -r all, or opening it for writing)"
        )
    result.corruptions.extend(refs.corruptions)
    disk = ondisk.astype(np.uint64)
    want = expected.astype(np.uint64)
    low = np.flatnonzero(disk < want)
    high = np.flatnonzero(disk > want)
    result.corruptions.extend(
        f"cluster {c} refcount={int(disk[c])} reference={int(want[c])}"
        for c in low[:MAX_MESSAGES].tolist()
    )
    _listed(result.corruptions, len(low) - MAX_MESSAGES, "clusters with too low a refcount")
    # OFLAG_COPIED must say "refcount is exactly one", in the active tables only
    for entries, idx in refs.copied:
        inside = idx < len(disk)
        flag = (entries[inside] & np.uint64(L.OFLAG_COPIED)) != 0
        one = disk[idx[inside]] == 1
        wrong = np.flatnonzero(flag != one)
        for i in wrong[:MAX_MESSAGES].tolist():
            result.corruptions.append(
                f"OFLAG_COPIED: entry {int(entries[inside][i]):#x} refcount={int(disk[idx[inside][i]])}"
            )
    result.leaks.extend(
        f"cluster {c} refcount={int(disk[c])} reference={int(want[c])}"
        for c in high[:MAX_MESSAGES].tolist()
    )
    _listed(result.leaks, len(high) - MAX_MESSAGES, "leaked clusters")
    return result

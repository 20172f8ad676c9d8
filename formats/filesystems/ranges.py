"""Used-byte ranges as numpy arrays: what every filesystem module returns.

A map is an (n, 2) int64 array of [start, end) byte ranges. Bitmaps become ranges
through numpy (unpack, find the edges), a chunk of bits at a time so a huge filesystem
needs bounded memory; ranges from several sources are merged with a sort and a running
maximum, never with a loop per block.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..extents import Extent, Kind

Ranges = np.ndarray  # shape (n, 2), int64: [start, end) byte offsets

#: bits unpacked at once: 16 Mi bits (a 64 GiB filesystem of 4 KiB blocks) is 16 MiB of bools
BITS_PER_CHUNK = 1 << 24


def empty() -> Ranges:
    return np.zeros((0, 2), dtype=np.int64)


def span(start: int, end: int) -> Ranges:
    return np.array([[start, end]], dtype=np.int64) if end > start else empty()


def mask_ranges(mask: np.ndarray, unit: int, base: int = 0) -> Ranges:
    """Runs of True in a bool array; element i covers [base + i*unit, base + (i+1)*unit)."""
    if not len(mask):
        return empty()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).view(np.int8)))
    pairs = edges.reshape(-1, 2).astype(np.int64)
    return pairs * unit + base


def bitmap_ranges(
    bits: np.ndarray | bytes,
    count: int,
    unit: int,
    base: int = 0,
    bitorder: Literal["big", "little"] = "little",
) -> Ranges:
    """Ranges of the set bits among the first `count` bits of a packed bitmap (ext4,
    NTFS and XFS number bits from the least significant: bitorder "little")."""
    packed: np.ndarray = (
        np.frombuffer(bits, dtype=np.uint8)
        if isinstance(bits, (bytes, bytearray))
        else np.asarray(bits, dtype=np.uint8)
    )
    count = min(count, len(packed) * 8)
    out = []
    step = BITS_PER_CHUNK // 8
    for first_byte in range(0, -(-count // 8), step):
        nbits = min(step * 8, count - first_byte * 8)
        chunk = packed[first_byte : first_byte + step]
        if not chunk.any():
            continue
        mask = np.unpackbits(chunk, count=nbits, bitorder=bitorder).view(bool)
        out.append(mask_ranges(mask, unit, base + first_byte * 8 * unit))
    return merge(out)


def merge(parts: list[Ranges] | Ranges) -> Ranges:
    """Sorted, non-overlapping, non-adjacent ranges covering the union of `parts`."""
    if isinstance(parts, list):
        if not parts:
            return empty()
        r = np.concatenate(parts)
    else:
        r = parts
    if not len(r):
        return empty()
    r = r[r[:, 1] > r[:, 0]]
    if not len(r):
        return empty()
    r = r[np.argsort(r[:, 0], kind="stable")]
    ends = np.maximum.accumulate(r[:, 1])
    # a new range begins where its start lies beyond every end so far
    new = np.concatenate(([True], r[1:, 0] > ends[:-1]))
    starts = r[new, 0]
    last = np.flatnonzero(new)[1:] - 1
    stops = np.concatenate((ends[last], ends[-1:]))
    return np.stack((starts, stops), axis=1)


def complement(used: Ranges, start: int, end: int) -> Ranges:
    """The parts of [start, end) that `used` does not cover."""
    r = clip(merge(used), start, end)
    bounds = np.concatenate(([start], r.reshape(-1), [end])).reshape(-1, 2)
    return bounds[bounds[:, 1] > bounds[:, 0]]


def clip(r: Ranges, start: int, end: int) -> Ranges:
    if not len(r):
        return r
    c = np.stack((np.maximum(r[:, 0], start), np.minimum(r[:, 1], end)), axis=1)
    return c[c[:, 1] > c[:, 0]]


def shift(r: Ranges, by: int) -> Ranges:
    return r + by if len(r) else r


def covered(r: Ranges) -> int:
    r = merge(r)
    return int((r[:, 1] - r[:, 0]).sum()) if len(r) else 0


def to_extents(r: Ranges, size: int) -> list[Extent]:
    """DATA for the ranges, ZERO between them, covering [0, size) exactly."""
    r = clip(merge(r), 0, size)
    out: list[Extent] = []
    pos = 0
    for s, e in r.tolist():
        if s > pos:
            out.append(Extent(pos, s - pos, Kind.ZERO))
        out.append(Extent(s, e - s, Kind.DATA))
        pos = e
    if pos < size:
        out.append(Extent(pos, size - pos, Kind.ZERO))
    return out

"""Extents: the one map every format answers and every consumer reads.

The run-length helper lives here once: formats turn their tables into a numpy
array of per-cluster kinds and let `runs()` coalesce it, never a loop per entry.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


class Kind(enum.IntEnum):
    ZERO = 0
    DATA = 1


@dataclass(frozen=True, slots=True)
class Extent:
    start: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.start + self.length


def runs(values: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Yield (first index, count, value) for each run of equal values in a 1-D array."""
    n = len(values)
    if n == 0:
        return
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, e - s, int(values[s])


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents of the same kind; drop empty ones."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if pending is not None and pending.kind == ext.kind and pending.end == ext.start:
            pending = Extent(pending.start, pending.length + ext.length, ext.kind)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def clip(extents: Iterable[Extent], start: int, end: int) -> Iterator[Extent]:
    """Restrict extents to [start, end)."""
    for ext in extents:
        s = max(ext.start, start)
        e = min(ext.end, end)
        if s < e:
            yield Extent(s, e - s, ext.kind)


def from_cluster_kinds(
    kinds: np.ndarray, cluster_size: int, base: int, start: int, end: int
) -> Iterator[Extent]:
    """Turn per-cluster kinds (cluster i covers base + i*cluster_size) into clipped extents."""
    for first, count, value in runs(kinds):
        s = max(base + first * cluster_size, start)
        e = min(base + (first + count) * cluster_size, end)
        if s < e:
            yield Extent(s, e - s, Kind(value))


def from_ranges(ranges: Iterable[tuple[int, int]], end: int) -> Iterator[Extent]:
    """The map of [0, end): DATA over the (start, stop) ranges, which may overlap or come
    in any order, ZERO between them."""

    def pieces() -> Iterator[Extent]:
        pos = 0
        for start, stop in sorted(ranges):
            start, stop = max(start, pos), min(stop, end)
            if start < stop:
                yield Extent(pos, start - pos, Kind.ZERO)
                yield Extent(start, stop - start, Kind.DATA)
                pos = stop
        yield Extent(pos, end - pos, Kind.ZERO)

    return coalesce(pieces())


def allocated_bytes(extents: Iterable[Extent]) -> int:
    return sum(e.length for e in extents if e.kind == Kind.DATA)


def overlay(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[tuple[int, int, Kind, Kind]]:
    """Walk two extent maps of the same range together: (start, length, kind_a, kind_b)."""
    ia, ib = iter(a), iter(b)
    ea, eb = next(ia, None), next(ib, None)
    while ea is not None and eb is not None:
        start = max(ea.start, eb.start)
        end = min(ea.end, eb.end)
        if start < end:
            yield start, end - start, ea.kind, eb.kind
        if ea.end <= eb.end:
            ea = next(ia, None)
        if eb is not None and eb.end <= end:
            eb = next(ib, None)


def intersect_data(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[Extent]:
    """DATA where both maps say DATA, ZERO elsewhere (e.g. allocated ∩ used by the filesystem)."""
    return coalesce(
        Extent(s, n, Kind.DATA if ka == kb == Kind.DATA else Kind.ZERO)
        for s, n, ka, kb in overlay(a, b)
    )


def union_data(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[Extent]:
    """DATA where either map says DATA."""
    return coalesce(
        Extent(s, n, Kind.DATA if Kind.DATA in (ka, kb) else Kind.ZERO)
        for s, n, ka, kb in overlay(a, b)
    )

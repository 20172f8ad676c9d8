"""What VHD, VHDX and VDI share: a virtual disk cut into fixed-size blocks that a table
places in the file, blocks absent from the table reading as the parent's bytes or zeros,
VHD and VHDX blocks carrying a per-sector bitmap, and a table checked for entries outside
the data area or overlapping each other.

`BlockImage` is the base of the three images; the helpers below it check tables and
split bitmaps into runs, once for all three.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from .errors import CorruptImage
from .image import Image
from .zeros import PrescanWrites

#: problems listed per kind; the rest are counted in one line
LISTED = 8


class BlockImage(PrescanWrites, Image):
    """A block-table image: `problems` found on opening refuse every access (one line
    each), and sector bitmaps are read once, cached, None meaning every sector present."""

    problems: list[str]
    #: sector bitmaps kept in memory (as bools: a sector a byte), then the cache restarts
    bitmap_cache = 65536

    def __init__(self, path: str | None, size: int, *, writable: bool = False) -> None:
        super().__init__(path, size, writable=writable)
        self.problems = []
        self._bitmaps: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    block_size: int

    def _blocks(self, offset: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """(position, block index, offset in the block, length) of each block's part of
        [offset, offset + n)."""
        bs = self.block_size
        pos, end = offset, offset + n
        while pos < end:
            b, within = divmod(pos, bs)
            step = min(bs - within, end - pos)
            yield pos, b, within, step
            pos += step

    def _guard(self) -> None:
        if self.problems:
            raise CorruptImage(self.problems[0])

    def _bitmap(self, b: int) -> np.ndarray | None:
        """Per-sector presence of block b (None: every sector present), cached."""
        try:
            return self._bitmaps[b]
        except KeyError:
            pass
        bits = self._read_bitmap(b)
        value = None if bits is None or bits.all() else bits
        self._keep_bitmap(b, value)
        return value

    def _keep_bitmap(self, b: int, value: np.ndarray | None) -> None:
        with self._lock:
            if len(self._bitmaps) > self.bitmap_cache:
                self._bitmaps.clear()
            self._bitmaps[b] = value

    def _read_bitmap(self, b: int) -> np.ndarray | None:
        """Block b's sector bitmap as bools, from the file (None: the format has none)."""
        return None

    def _absent(self, offset: int, buf: memoryview) -> None:
        """Fill what the image does not hold: the parent's bytes, then zeros."""
        n = len(buf)
        got = 0
        if self.backing is not None and offset < self.backing.size:
            got = min(n, self.backing.size - offset)
            self.backing.readinto(offset, buf[:got])
        if got < n:
            buf[got:] = bytes(n - got)


def bitmap_runs(bits: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """(first sector, count, present) runs of a per-sector bool array."""
    n = len(bits)
    if n == 0:
        return
    change = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    starts = np.concatenate(([0], change)).tolist()
    ends = [*starts[1:], n]
    for s, e in zip(starts, ends):
        yield s, e - s, bool(bits[s])


def listed(fmt: str, first: list[str], total: int, what: str) -> list[str]:
    """The first messages of `total` problems of one kind, the rest counted in one line."""
    return [*first, f"{fmt}: {total - len(first)} more {what}"] if total > len(first) else first


def placement_problems(
    fmt: str,
    blocks: np.ndarray,
    offsets: np.ndarray,
    span: int,
    area: tuple[int, int],
    *,
    entry: str,
    area_name: str,
) -> list[str]:
    """Blocks (indices `blocks`, file offsets `offsets`, `span` bytes each) that lie
    outside the `area` of the file or overlap one another, LISTED lines of each kind."""
    low, high = area
    bad = np.flatnonzero((offsets < low) | (offsets + span > high))
    outside = [
        f"{fmt}: {entry} {int(blocks[i])} points at {int(offsets[i]):#x} (+{span:#x}), "
        f"outside the {area_name} [{low:#x}, {high:#x})"
        for i in bad[:LISTED].tolist()
    ]
    order = np.argsort(offsets, kind="stable")
    so, sb = offsets[order], blocks[order]
    clash = np.flatnonzero(so[1:] - so[:-1] < span)
    overlapping = [
        f"{fmt}: blocks {int(sb[i])} and {int(sb[i + 1])} overlap at {int(so[i + 1]):#x}"
        for i in clash[:LISTED].tolist()
    ]
    return [
        *listed(fmt, outside, len(bad), "BAT entries out of range"),
        *listed(fmt, overlapping, len(clash), "overlapping blocks"),
    ]

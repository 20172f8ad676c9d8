"""Images made of other images: a window onto a byte range (a partition, a logical
volume's segment) and a composite laid end to end from pieces (a partition wrapped into a
whole disk, a logical volume assembled from its segments).

Views never own what they look into: closing one leaves the parent open, because the
caller that opened the disk closes it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import FormatError
from .extents import Extent, Kind
from .image import Image, Location


class WindowImage(Image):
    """Bytes [offset, offset + size) of `parent`, seen as an image of their own."""

    def __init__(
        self, parent: Image, offset: int, size: int, *, writable: bool | None = None
    ) -> None:
        if offset < 0 or size < 0 or offset + size > parent.size:
            raise FormatError(
                f"window at {offset:#x} (+{size:#x}) lies outside the image ({parent.size:#x})"
            )
        super().__init__(
            parent.path, size, writable=parent.writable if writable is None else writable
        )
        if self.writable and not parent.writable:
            raise FormatError(f"{parent.format}: image is opened read-only")
        self.parent = parent
        self.offset = offset
        self.format = parent.format
        self.cluster_size = parent.cluster_size
        self.decodes = parent.decodes

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self.parent.readinto(self.offset + offset, buf)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        for e in self.parent.extents(self.offset + start, self.offset + end):
            yield Extent(e.start - self.offset, e.length, e.kind)

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        for loc in self.parent.locate(self.offset + offset, n):
            yield Location(loc.start - self.offset, loc.length, loc.fd, loc.offset)

    def _write(self, offset: int, data: memoryview) -> None:
        self.parent.write(self.offset + offset, data)

    def _write_zeroes(self, offset: int, n: int) -> None:
        self.parent.write_zeroes(self.offset + offset, n)

    def files(self) -> list[str]:
        return self.parent.files()

    def actual_size(self) -> int:
        return 0  # the parent's files hold more than this window; no honest figure

    def flush(self) -> None:
        if self.writable:
            self.parent.flush()


@dataclass(frozen=True)
class Piece:
    """`length` bytes of a composite: from `image` at `offset`, from `data`, or zeros."""

    length: int
    image: Image | None = None
    offset: int = 0
    data: bytes | None = None


class CompositeImage(Image):
    """Pieces laid end to end, read-only. Pieces of literal bytes map as DATA."""

    format = "composite"

    def __init__(self, pieces: list[Piece], *, path: str | None = None) -> None:
        pieces = [p for p in pieces if p.length > 0]
        starts = []
        pos = 0
        for p in pieces:
            if p.data is not None and len(p.data) != p.length:
                raise FormatError("composite: a literal piece's length does not match its bytes")
            if p.image is not None and (p.offset < 0 or p.offset + p.length > p.image.size):
                raise FormatError("composite: a piece lies outside its image")
            starts.append(pos)
            pos += p.length
        super().__init__(path, pos, writable=False)
        self.pieces = pieces
        self.starts = starts
        images = [p.image for p in pieces if p.image is not None]
        self.decodes = any(i.decodes for i in images)
        if images:
            self.format = images[0].format
            self.cluster_size = images[0].cluster_size

    def _overlapping(self, start: int, end: int) -> Iterator[tuple[int, int, int, Piece]]:
        """(start, end, piece start, piece) for each piece overlapping [start, end)."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while i < len(self.pieces) and self.starts[i] < end:
            base = self.starts[i]
            p = self.pieces[i]
            lo, hi = max(start, base), min(end, base + p.length)
            if lo < hi:
                yield lo, hi, base, p
            i += 1

    def _readinto(self, offset: int, buf: memoryview) -> None:
        for lo, hi, base, p in self._overlapping(offset, offset + len(buf)):
            out = buf[lo - offset : hi - offset]
            rel = lo - base
            if p.image is not None:
                p.image.readinto(p.offset + rel, out)
            elif p.data is not None:
                out[:] = p.data[rel : rel + len(out)]
            else:
                out[:] = bytes(len(out))

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        for lo, hi, base, p in self._overlapping(offset, offset + n):
            if p.image is None:
                yield Location(lo, hi - lo)
                continue
            shift = base - p.offset
            for loc in p.image.locate(p.offset + lo - base, hi - lo):
                yield Location(loc.start + shift, loc.length, loc.fd, loc.offset)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        for lo, hi, base, p in self._overlapping(start, end):
            if p.image is not None:
                shift = base - p.offset
                for e in p.image.extents(p.offset + lo - base, p.offset + hi - base):
                    yield Extent(e.start + shift, e.length, e.kind)
            else:
                yield Extent(lo, hi - lo, Kind.DATA if p.data is not None else Kind.ZERO)

    def files(self) -> list[str]:
        out: list[str] = []
        for p in self.pieces:
            if p.image is not None:
                out += [f for f in p.image.files() if f not in out]
        return out

    def actual_size(self) -> int:
        return 0

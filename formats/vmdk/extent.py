"""What every VMDK extent is: a range of the virtual disk read, mapped and maybe written
relative to its own start; plus ZERO and FLAT/VMFS extents, and the run helpers the sparse
kinds share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import FormatError
from ..extents import Kind
from ..fileio import file_size, preadinto, pwrite_all
from ..raw import RawImage
from . import layout as L

#: per-grain states an extent reports
UNALLOCATED, ZERO, DATA = 0, 1, 2
#: the most grains an extent maps at once: bounds memory on huge sparse ranges
MAP_WINDOW = 1 << 20
#: how far ahead of appended data a writable file is lengthened
RESERVE_STEP = 256 << 20
#: the most problems check() lists one by one
MAX_REPORTED = 20

#: fills a buffer with what lies beneath an unallocated range (the parent, or zeros)
Under = Callable[[int, memoryview], None]


def open_fd(path: str, writable: bool) -> int:
    try:
        return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"vmdk: {path}: {exc.strerror}") from exc


def gte_states(gtes: np.ndarray) -> np.ndarray:
    """Per-grain states of 32-bit grain table entries: 0 unallocated, 1 zero, else data."""
    st = np.full(len(gtes), DATA, np.uint8)
    st[gtes == L.GTE_UNALLOCATED] = UNALLOCATED
    st[gtes == L.GTE_ZERO] = ZERO
    return st


def zero_fill(offset: int, buf: memoryview) -> None:
    buf[:] = bytes(len(buf))


def file_runs(
    st: np.ndarray, foff: np.ndarray, grain: int, g0: int, offset: int, n: int
) -> Iterator[tuple[int, int, int, int]]:
    """(position in request, length, state, file offset) runs over grains g0.. for the
    request [offset, offset+n); grains that follow each other in the file are merged, so a
    sequential layout costs one system call."""
    contiguous = foff[1:] == foff[:-1] + grain
    brk = np.flatnonzero((st[1:] != st[:-1]) | ((st[1:] == DATA) & ~contiguous)) + 1
    starts = np.concatenate(([0], brk)).tolist()
    ends = [*starts[1:], len(st)]
    for a, b in zip(starts, ends):
        vs = max((g0 + a) * grain, offset)
        ve = min((g0 + b) * grain, offset + n)
        yield vs - offset, ve - vs, int(st[a]), int(foff[a]) + vs - (g0 + a) * grain


def read_runs(
    fd: int, runs_: Iterator[tuple[int, int, int, int]], offset: int, buf: memoryview, under: Under
) -> None:
    for at, n, state, foff in runs_:
        part = buf[at : at + n]
        if state == DATA:
            preadinto(fd, part, foff)
        elif state == ZERO:
            part[:] = bytes(n)
        else:
            under(offset + at, part)


class ExtentFile:
    """One extent of the virtual disk; offsets are relative to its start."""

    type = "?"
    compressed = False
    cluster_size = 512
    #: the descriptor's access word: RW, RDONLY or NOACCESS
    access = "RW"

    def __init__(self, path: str | None, length: int, *, writable: bool) -> None:
        self.path = path
        self.length = length
        self.writable = writable
        #: how grain data reaches the file: the owning image hands in its own pwrite,
        #: which the conversion engine may defer
        self.pwrite: Callable[[int, memoryview, int], None] = pwrite_all

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        raise NotImplementedError

    def locate(self, offset: int, n: int) -> Iterator[tuple[int, int, int | None, int]]:
        """(position in request, length, fd or None, file offset): where runs are stored
        plainly (Image.locate)."""
        yield 0, n, None, 0

    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        yield start, end - start, DATA

    def write(self, offset: int, data: memoryview, under: Under) -> None:
        raise FormatError(f"vmdk: {self.type} extent {self.path} is not writable")

    def write_zeroes(self, offset: int, n: int, under: Under, has_backing: bool) -> None:
        self.write(offset, memoryview(bytes(n)), under)

    def flush(self, durable: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def check(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        return {
            "filename": os.path.basename(self.path) if self.path else "",
            "format": self.type,
            "virtual-size": self.length,
            "cluster-size": self.cluster_size,
            "compressed": self.compressed,
        }


class ZeroExtent(ExtentFile):
    type = "ZERO"

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        buf[:] = bytes(len(buf))

    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        yield start, end - start, ZERO


class FlatExtent(ExtentFile):
    """FLAT and VMFS extents: the bytes at `base` in a plain file, holes read as zeros."""

    type = "FLAT"

    def __init__(
        self, path: str, fd: int, base: int, length: int, *, writable: bool, type: str = "FLAT"
    ) -> None:
        super().__init__(path, length, writable=writable)
        self.type = type
        self.base = base
        self.raw = RawImage(path, fd, max(file_size(fd), base + length), writable=writable)

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        self.raw.readinto(self.base + offset, buf)

    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        for e in self.raw.extents(self.base + start, self.base + end):
            yield e.start - self.base, e.length, DATA if e.kind == Kind.DATA else ZERO

    def locate(self, offset: int, n: int) -> Iterator[tuple[int, int, int | None, int]]:
        yield 0, n, self.raw.fd, self.base + offset

    def write(self, offset: int, data: memoryview, under: Under) -> None:
        self.pwrite(self.raw.fd, data, self.base + offset)

    def write_zeroes(self, offset: int, n: int, under: Under, has_backing: bool) -> None:
        self.raw.write_zeroes(self.base + offset, n)

    def flush(self, durable: bool = True) -> None:
        self.raw.durable = durable
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()

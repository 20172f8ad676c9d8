"""raw: the bytes are the disk. Sparse-aware: holes are found with SEEK_DATA/SEEK_HOLE
on reading and punched (or left untouched in a fresh file) on writing."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

from .backing import BackingPolicy
from .errors import FormatError
from .extents import Extent, Kind
from .fileio import preadinto, punch_hole
from .image import Image, Location
from .mapped import MappedFile, mapped

FORMAT = "raw"


def matches(head: bytes, tail: bytes) -> bool:
    return True


class RawImage(Image):
    format = FORMAT
    cluster_size = 4096

    def __init__(self, path: str, fd: int, size: int, *, writable: bool) -> None:
        super().__init__(path, size, writable=writable)
        self.fd = fd
        self.is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        preadinto(self.fd, buf, offset)

    def mapped(self) -> contextlib.AbstractContextManager[MappedFile | None]:
        if self.writable:  # a lease needs the file open read-only
            return contextlib.nullcontext()
        return mapped(self.fd, self.path)

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        yield Location(offset, n, self.fd, offset)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        if self.is_block_device:
            yield Extent(start, end - start, Kind.DATA)
            return
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    yield Extent(pos, end - pos, Kind.ZERO)
                    return
                if exc.errno == errno.EINVAL:  # filesystem without SEEK_DATA
                    yield Extent(pos, end - pos, Kind.DATA)
                    return
                raise
            data = min(data, end)
            if data > pos:
                yield Extent(pos, data - pos, Kind.ZERO)
            if data >= end:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield Extent(data, hole - data, Kind.DATA)
            pos = hole

    def _write(self, offset: int, data: memoryview) -> None:
        self._pwrite(self.fd, data, offset)

    def _write_zeroes(self, offset: int, n: int) -> None:
        if self.is_block_device or not punch_hole(self.fd, offset, n):
            super()._write_zeroes(offset, n)

    def flush(self) -> None:
        if self.writable:
            self._sync(self.fd)

    def _close(self) -> None:
        os.close(self.fd)

    def info(self) -> dict[str, Any]:
        return {}


def open_image(path: str, *, writable: bool = False, policy: BackingPolicy | None = None) -> Image:
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    size = os.lseek(fd, 0, os.SEEK_END)
    return RawImage(path, fd, size, writable=writable)


def create(
    path: str,
    size: int,
    *,
    preallocation: str = "off",
    final_path: str | None = None,
    **options: Any,
) -> Image:
    if options:
        raise FormatError(f"raw: unknown options {', '.join(sorted(options))}")
    if preallocation not in ("off", "falloc", "full"):
        raise FormatError(f"raw: preallocation must be off, falloc or full, not {preallocation!r}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        if preallocation != "off" and size:
            os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    image = RawImage(path, fd, size, writable=True)
    # what the conversion preallocates and leaves unwritten it punches back: not after
    # the user asked for the whole file allocated
    image.prealloc_ahead = preallocation == "off"
    return image

"""The `Image` contract shared by every format.

Reads may come from several threads at once (the conversion engine reads and
decompresses on a pool), so `_readinto` must be thread-safe: use `os.pread` and
immutable or locked caches. Writes come from one thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import FormatError
from .extents import Extent, Kind, coalesce
from .fileio import pwrite_all

if TYPE_CHECKING:
    from .mapped import MappedFile

ZERO_CHUNK = bytes(8 << 20)

#: a data write a writer left for its caller: (fd, bytes, file offset)
PendingWrite = tuple[int, memoryview, int]


@dataclass
class CheckResult:
    """What `check` found, counted as `qemu-img check` counts it."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    checked: bool = True  # False: this format has no metadata to check

    @property
    def exit_code(self) -> int:
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


@dataclass(frozen=True)
class Location:
    """Where `length` bytes of the virtual disk from `start` live: stored as they are at
    `offset` of the open file `fd`, or, with fd None, not stored plainly (a hole, zeros,
    compressed, in a backing image: only a read can tell what they hold)."""

    start: int
    length: int
    fd: int | None = None
    offset: int = 0


class Image:
    """A virtual disk: `size` bytes, readable anywhere, with an extent map."""

    format: str = "?"
    #: writers that accept only in-order writes (streamOptimized VMDK) set this
    is_sequential: bool = False
    #: fresh clusters go to the end of the file, whole, so the engine may preallocate
    #: ahead of them without filling a hole the image means to keep (VHDX and VDI leave
    #: holes inside their blocks: not them)
    appends: bool = False
    #: while the engine converts into this image, nothing but its data writes (or zeros)
    #: lands in the file past the first of them (a fresh raw file; a fresh dynamic VHDX,
    #: whose metadata lies before its blocks): the engine may preallocate ahead of its
    #: writes and punch back, once done, what it did not write. Never an existing file,
    #: which holds data outside the writes
    prealloc_ahead: bool = False
    #: the unit at which the writer tracks allocation; the engine aligns chunks to it and
    #: detects zeros at this size, or at `zero_grain` when the writer sets a smaller one
    #: (then `encode` receives only runs in which no zero_grain is all zeros)
    cluster_size: int = 65536
    zero_grain: int = 0
    #: reading may decompress, writing compresses: CPU work that the conversion engine
    #: spreads over a thread per core (a plain copy runs best on one reader thread)
    decodes: bool = False
    encodes: bool = False
    #: flush() makes what was written durable (fsync); without it the data is left to the
    #: kernel's writeback, as qemu-img's default `cache=unsafe` leaves it
    durable: bool = True

    def __init__(self, path: str | None, size: int, *, writable: bool = False) -> None:
        self.path = path
        self.size = size
        self.writable = writable
        self.closed = False
        self.backing: Image | None = None
        self._pending: list[PendingWrite] | None = None

    # -- reading -------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            self._readinto(offset, mv)
        return len(mv)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def mapped(self) -> contextlib.AbstractContextManager[MappedFile | None]:
        """For the with-block, the image's bytes as a lease-guarded mapping of its file
        (formats/mapped.py), where the file is the disk byte for byte; else None."""
        return contextlib.nullcontext()

    def locate(self, offset: int, n: int) -> list[Location]:
        """Where the bytes of [offset, offset + n) live, in order, covering the range:
        the engine shares or copies in the kernel what is stored plainly in a file."""
        self._check_range(offset, n)
        return list(self._locate(offset, n)) if n else []

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        yield Location(offset, n)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Coalesced DATA/ZERO extents covering [start, end) completely."""
        end = self.size if end is None else end
        self._check_range(start, end - start)
        yield from coalesce(self._extents(start, end))

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        yield Extent(start, end - start, Kind.DATA)

    # -- writing -------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            self._write(offset, mv)

    def write_zeroes(self, offset: int, n: int) -> None:
        self._check_writable()
        self._check_range(offset, n)
        if n:
            self._write_zeroes(offset, n)

    def _write(self, offset: int, data: memoryview) -> None:
        raise FormatError(f"{self.format}: writing is not supported")

    def _write_zeroes(self, offset: int, n: int) -> None:
        pos = offset
        while pos < offset + n:
            step = min(len(ZERO_CHUNK), offset + n - pos)
            self._write(pos, memoryview(ZERO_CHUNK)[:step])
            pos += step

    @contextlib.contextmanager
    def deferred_writes(self) -> Iterator[list[PendingWrite]]:
        """Collect the data writes made inside instead of issuing them, so the caller
        can issue them on other threads while this one updates metadata. The caller
        issues every one (in any order) before it flushes, reads back or rewrites those
        ranges. Formats that write data through `_pwrite` defer; the rest write at once."""
        pending: list[PendingWrite] = []
        self._pending = pending
        try:
            yield pending
        finally:
            self._pending = None

    def _pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self._pending is not None:
            self._pending.append((fd, memoryview(data).cast("B"), offset))
        else:
            pwrite_all(fd, data, offset)

    def encode(self, offset: int, data: bytes | memoryview) -> Any:
        """CPU-only preparation of a chunk (compression), safe to run on a thread pool."""
        return data

    def write_encoded(self, offset: int, encoded: Any) -> None:
        """Store what `encode` returned for the chunk at `offset`."""
        self.write(offset, encoded)

    # -- metadata ------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Format specifics for `p2v info` (qemu-img's `format-specific` data)."""
        return {}

    def check(self) -> CheckResult:
        return CheckResult(checked=False)

    def actual_size(self) -> int:
        total = 0
        for p in self.files():
            try:
                total += os.stat(p).st_blocks * 512
            except OSError:
                pass
        return total

    def files(self) -> list[str]:
        """Every file this image consists of (descriptor first)."""
        return [self.path] if self.path else []

    def flush(self) -> None:
        pass

    def _sync(self, *fds: int | None) -> None:
        if self.durable:
            for fd in fds:
                if fd is not None:
                    os.fsync(fd)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.writable:
                self.flush()
        finally:
            self.closed = True
            self._close()
            if self.backing is not None:
                self.backing.close()

    def _close(self) -> None:
        pass

    def __enter__(self) -> Image:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.writable:
            # a failed write must not pretend to be a finished image: skip flush
            self.writable = False
        self.close()

    # -- guards --------------------------------------------------------------
    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise FormatError(
                f"{self.format}: access at {offset:#x} (+{n:#x}) is outside the "
                f"virtual size {self.size:#x}"
            )

    def _check_writable(self) -> None:
        if self.closed:
            raise FormatError(f"{self.format}: image is closed")
        if not self.writable:
            raise FormatError(f"{self.format}: image is opened read-only")

"""The conversion engine: one pipeline for local images, remote disks and partitions.

    source.extents() -> chunks (aligned to the target's clusters) -> read on a pool
    (or viewed where they lie: a raw file's lease-guarded mapping, formats/mapped.py)
    -> zero detection per cluster or zero grain (numpy) -> target.encode() on the pool
    (compression) -> target.write_encoded() on this thread, which plans the metadata
    -> the data pwrites, deferred to one writer thread (preallocated when large)

A fresh target reads as zeros, so zero clusters are never written (qemu's
`--target-is-zero`, always true for what we create). With a backing image, clusters that
equal the backing's are skipped and clusters that became zero are written as zeros; we
compare against what the new backing really reads, which is where `qemu-img convert -B`
of a chain goes wrong (INTEROP.md). Memory is bounded by the chunks in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import functools
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError
from .extents import Extent, Kind, coalesce, from_ranges, intersect_data, overlay, union_data
from .fileio import contiguous, preallocate, punch_hole, pwritev_all, start_writeback
from .image import Image, Location, PendingWrite
from .mapped import MappedFile
from .transfer import Mover, output_device, shares_blocks
from .zeros import differ_mask, mask_runs, nonzero_mask

#: bytes read per task, as qemu-img's requests (writes never cover whole 2 MiB-aligned
#: ranges, whatever the chunk: fileio.pwritev_all)
CHUNK = 2 << 20
MAX_CHUNK = 8 << 20
#: runs moved without being read (shared, copied in the kernel) go in chunks this large:
#: no buffer holds them, and each costs a placement and a system call (32 MiB: 4 GiB
#: shared in 128 clones instead of 2048)
MOVE_CHUNK = 32 << 20
#: a durable output's writeback is started every this many bytes
WRITEBACK_EVERY = 32 << 20
#: zero detection below this size would cost more than it saves
MIN_GRAIN = 4096

Progress = Callable[[int, int], None]


@dataclass
class ConvertStats:
    virtual_size: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zero_written: int = 0
    bytes_skipped: int = 0
    #: read through a mapping of the source (formats/mapped.py) instead of a buffer
    bytes_mapped: int = 0
    #: how the data reached the output (formats/transfer.py): blocks shared with the
    #: source, copied by the kernel, copied through this process's memory
    bytes_shared: int = 0
    bytes_copied_in_kernel: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    output: str | None = None
    output_format: str | None = None


@dataclass
class _Piece:
    """What a worker hands back for one chunk: runs ready for the writer."""

    offset: int
    length: int
    runs: list[tuple[int, Any, int]] = field(default_factory=list)  # (offset, encoded, n)
    zero_runs: list[tuple[int, int]] = field(default_factory=list)
    read: int = 0
    buffers: list[mmap.mmap] = field(default_factory=list)
    #: runs stored plainly in a source file on the output's filesystem: moved, not read
    moves: list[Location] = field(default_factory=list)
    mapped: bool = False  # the data is a view of the source's mapping, given back once written


class _BufferPool:
    """Chunk buffers reused across chunks: fresh memory costs a page fault per page
    (and a memset), which at conversion speed is as much as the read itself. They are
    anonymous mmaps, so page-aligned: the kernel copies into a bytearray's 16-byte-aligned
    data five times slower than into an aligned buffer on this VM (measured: 1.2 GiB read
    from page cache in 0.48 s against 0.09 s)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def get(self) -> mmap.mmap:
        with self.lock:
            if self.free:
                return self.free.pop()
        return mmap.mmap(-1, self.size)

    def put(self, buf: mmap.mmap) -> None:
        try:
            # a writer still holding a view of the chunk must not see it overwritten:
            # mmap refuses to resize while views exist, so such a buffer is dropped
            buf.resize(self.size)
        except BufferError:
            return
        with self.lock:
            self.free.append(buf)


def _align_down(x: int, a: int) -> int:
    return x - x % a


def chunk_ranges(
    extents: Iterable[Extent], grain: int, size: int, chunk: int, widen: int | None = None
) -> Iterator[Extent]:
    """DATA extents widened to whole `widen` units (default: grains), merged where they
    share a grain, then cut at chunk boundaries."""
    widen = widen or grain
    start = end = -1
    for e in extents:
        if e.kind != Kind.DATA:
            continue
        s, t = _align_down(e.start, widen), min(-(-e.end // widen) * widen, size)
        if _align_down(s, grain) < end or s <= end:
            end = max(end, t)
            continue
        if end > start:
            yield from _cut(start, end, chunk)
        start, end = s, t
    if end > start:
        yield from _cut(start, end, chunk)


def _cut(start: int, end: int, chunk: int) -> Iterator[Extent]:
    pos = start
    while pos < end:
        # cut at multiples of `chunk` so chunks line up with the target's tables
        nxt = min(_align_down(pos, chunk) + chunk, end)
        yield Extent(pos, nxt - pos, Kind.DATA)
        pos = nxt


class _Engine:
    def __init__(
        self,
        src: Image,
        dst: Image,
        *,
        backing: Image | None,
        workers: int,
        chunk: int,
        progress: Progress | None,
        share: bool = True,
    ) -> None:
        if dst.size < src.size:
            raise FormatError(f"target size {dst.size} is smaller than the source's {src.size}")
        self.src, self.dst, self.backing = src, dst, backing
        self.grain = max(MIN_GRAIN, min(dst.cluster_size, MAX_CHUNK))
        self.chunk = max(chunk - chunk % self.grain, self.grain)
        self.workers = workers
        self.progress = progress
        self.stats = ConvertStats(virtual_size=src.size)
        self.done = 0
        self.buffers = _BufferPool(self.chunk)
        self.writes: collections.deque[cf.Future[None]] = collections.deque()
        self.unsynced: dict[int, int] = {}
        self.data_writer = _DataWriter(dst)
        self.views: MappedFile | None = None
        self.mover = Mover()
        self.moved = 0
        self.placer = _Placer(dst, MOVE_CHUNK) if self._moves_runs(share) else None
        self.dst_dev = output_device(dst.files()[0]) if self.placer is not None else -1

    def _moves_runs(self, share: bool) -> bool:
        """Whether runs stored plainly in a source file on the output's filesystem are
        moved there without being read: where that filesystem shares blocks, which costs
        neither time nor space. Elsewhere reading pays: zero detection keeps the output
        sparse, which a copy in the kernel cannot. An output that compresses or takes
        writes in order only must read every byte."""
        dst = self.dst
        if not share or dst.encodes or dst.is_sequential:
            return False
        files = dst.files()
        return bool(files) and shares_blocks(os.path.dirname(os.path.abspath(files[0])))

    @functools.cached_property
    def zgrain(self) -> int:
        """The size at which zeros are found: the grain, or the writer's finer zero_grain."""
        z = self.dst.zero_grain
        return z if MIN_GRAIN <= z < self.grain and self.grain % z == 0 else self.grain

    def _buffer(self, piece: _Piece, n: int) -> memoryview:
        """A chunk buffer whose bytes past n (up to the next grain) are zero."""
        buf = self.buffers.get()
        piece.buffers.append(buf)
        padded = -(-n // self.zgrain) * self.zgrain
        mv = memoryview(buf)[:padded]
        if padded > n:
            mv[n:] = bytes(padded - n)
        return mv

    def _work(self, rng: Extent) -> _Piece:
        piece = _Piece(rng.start, rng.length)
        if self.placer is None:
            self._read(piece, rng)
            return piece
        todo: Extent | None = None  # neighbouring runs that must be read, read at once
        for loc in self._movable(rng):
            if loc.fd is not None:
                if todo is not None:
                    self._read(piece, todo)
                    todo = None
                piece.moves.append(loc)
            elif todo is None:
                todo = Extent(loc.start, loc.length, Kind.DATA)
            else:
                todo = Extent(todo.start, loc.start + loc.length - todo.start, Kind.DATA)
        if todo is not None:
            self._read(piece, todo)
        return piece

    def _movable(self, rng: Extent) -> Iterator[Location]:
        """The source's locations over `rng`, fd None where the run must be read: not
        stored plainly on the output's filesystem, or, with a backing image, where the
        backing holds data (the run is compared with it and only what differs is kept)."""
        for loc in self.src.locate(rng.start, rng.length):
            if loc.fd is None or not self.mover.can_move(loc.fd, self.dst_dev):
                yield Location(loc.start, loc.length)
            elif self.backing is None or loc.start >= self.backing.size:
                yield loc
            else:
                end = min(loc.start + loc.length, self.backing.size)
                for e in self.backing.extents(loc.start, end):
                    fd = loc.fd if e.kind == Kind.ZERO else None
                    yield Location(e.start, e.length, fd, loc.offset + e.start - loc.start)
                if end < loc.start + loc.length:
                    yield Location(
                        end, loc.start + loc.length - end, loc.fd, loc.offset + end - loc.start
                    )

    def _read(self, piece: _Piece, rng: Extent) -> None:
        """Read `rng` of the piece's chunk in pieces no larger than a chunk buffer."""
        pos = rng.start
        while pos < rng.end:
            end = min(_align_down(pos, self.chunk) + self.chunk, rng.end)
            self._read_part(piece, Extent(pos, end - pos, Kind.DATA))
            pos = end

    def _read_part(self, piece: _Piece, rng: Extent) -> None:
        """Read `rng` of the piece's chunk; hand its non-zero runs (encoded) to the piece."""
        n = rng.length
        piece.read += n
        zg = self.zgrain
        mv = self._view(piece) if rng.length == piece.length else None
        if mv is None:
            mv = self._buffer(piece, n)
            self.src.readinto(rng.start, mv[:n])
        if self.backing is not None:
            base = self._buffer(piece, n)
            bn = max(0, min(n, self.backing.size - rng.start))
            base[bn:n] = bytes(n - bn)
            if bn:
                self.backing.readinto(rng.start, base[:bn])
            write = differ_mask(mv, base, n, zg)
            nonzero = nonzero_mask(mv, n, zg)
            for first, count in mask_runs(write & ~nonzero):
                s, e = self._span(rng, first, count)
                piece.zero_runs.append((s, e - s))
            write &= nonzero
        else:
            write = nonzero_mask(mv, n, zg)
        for first, count in mask_runs(write):
            s, e = self._span(rng, first, count)
            data = mv[s - rng.start : e - rng.start]
            piece.runs.append((s, self.dst.encode(s, data), e - s))

    def _view(self, piece: _Piece) -> memoryview | None:
        """The chunk's bytes straight from the source's mapping, when it has one and the
        chunk ends on a zero grain (a short last chunk is read into a padded buffer)."""
        if self.views is None or piece.length % self.zgrain:
            return None
        mv = self.views.view(piece.offset, piece.length)
        piece.mapped = mv is not None
        return mv

    def _span(self, rng: Extent, first: int, count: int) -> tuple[int, int]:
        zg = self.zgrain
        s = rng.start + first * zg
        return s, min(s + count * zg, rng.end)

    def _store(self, piece: _Piece, pool: cf.Executor) -> None:
        pending = self._apply(piece)
        if pending:
            # the data itself goes out on the pool while this thread plans the next chunk
            self.writes.append(pool.submit(self._issue, pending, piece))
        else:
            self._recycle(piece)
        self._advance(piece.length)

    def _apply(self, piece: _Piece) -> list[PendingWrite | _Move]:
        """Hand the piece to the writer; returns the data writes it deferred. Once this
        returns, every view of the chunk buffer is in that list or gone, so recycling
        can tell when the buffer is free."""
        writes: list[PendingWrite | _Move] = []
        with self.dst.deferred_writes() as pending:
            for off, n in piece.zero_runs:
                self.dst.write_zeroes(off, n)
                self.stats.bytes_zero_written += n
            for off, enc, n in piece.runs:
                self.dst.write_encoded(off, enc)
                self.stats.bytes_written += n
            piece.runs.clear()
        writes += pending
        self.stats.bytes_read += piece.read
        if piece.mapped:
            self.stats.bytes_mapped += piece.read
        for loc in piece.moves:
            assert self.placer is not None
            placed, placing = self.placer.place(loc)
            if placed:
                writes += placing
                self.moved += loc.length
            else:
                self._write_read_back(loc, placing)
            self.stats.bytes_written += loc.length
        piece.moves.clear()
        return writes

    def _write_read_back(self, loc: Location, writes: list[PendingWrite | _Move]) -> None:
        """A run the output did not place: the writes it asked for, then the run written
        the ordinary way over them, at once, after the writes in flight (the output may
        read around it)."""
        self._reap_writes(0)
        self.data_writer.write(writes, self.mover)
        buf = bytearray(loc.length)
        self.src.readinto(loc.start, buf)
        self.dst.write(loc.start, buf)
        self.stats.bytes_read += loc.length

    def _issue(self, pending: list[PendingWrite | _Move], piece: _Piece) -> None:
        self.data_writer.write(pending, self.mover)  # its frame and views end before recycling
        if self.dst.durable:
            self._writeback(pending)
        pending.clear()
        self._recycle(piece)

    def _writeback(self, pending: list[PendingWrite | _Move]) -> None:
        """Start the kernel's writeback every WRITEBACK_EVERY bytes, so the disk works
        while we convert instead of all at the close's fsync (runs on the writer thread)."""
        for w in pending:
            if isinstance(w, _Move):
                continue  # nothing dirty in the page cache (a kernel copy's pages aside)
            fd, data, _ = w
            self.unsynced[fd] = self.unsynced.get(fd, 0) + len(data)
            if self.unsynced[fd] >= WRITEBACK_EVERY:
                self.unsynced[fd] = 0
                start_writeback(fd)

    def _recycle(self, piece: _Piece) -> None:
        for buf in piece.buffers:
            self.buffers.put(buf)
        piece.buffers.clear()
        if piece.mapped and self.views is not None:
            self.views.unview(piece.offset)
            piece.mapped = False

    def _reap_writes(self, keep: int) -> None:
        """Wait until at most `keep` data writes are in flight; their errors surface here."""
        while self.writes and (len(self.writes) > keep or self.writes[0].done()):
            self.writes.popleft().result()

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.src.size)

    def run(self, extents: Iterable[Extent]) -> ConvertStats:
        t0 = time.monotonic()
        planned = 0
        inflight: collections.deque[cf.Future[_Piece]] = collections.deque()
        limit = 2 * self.workers + 2
        # data writes go out on one thread of their own: parallel writers to one file
        # only contend for its inode lock
        # a raw source is viewed through its mapping, unless its runs are moved
        mapping = self.src.mapped() if self.placer is None else contextlib.nullcontext()
        with (
            mapping as self.views,
            cf.ThreadPoolExecutor(self.workers, thread_name_prefix="p2v-convert") as pool,
            cf.ThreadPoolExecutor(1, thread_name_prefix="p2v-write") as writer,
        ):
            try:
                # merged per grain, but widened only to zero grains: a writer with a finer
                # zero_grain takes writes of its pieces, and a resumed copy starts where asked
                chunk = self.chunk if self.placer is None else max(self.chunk, MOVE_CHUNK)
                ranges = chunk_ranges(extents, self.grain, self.src.size, chunk, self.zgrain)
                for rng in ranges:
                    if rng.start > planned:
                        self.stats.bytes_skipped += rng.start - planned
                        self._advance(rng.start - planned)
                    planned = rng.end
                    inflight.append(pool.submit(self._work, rng))
                    while len(inflight) >= limit:
                        self._drain_one(inflight, writer)
                while inflight:
                    self._drain_one(inflight, writer)
                self._reap_writes(0)
                self.data_writer.trim()
            except BaseException:
                for f in inflight:
                    f.cancel()
                for w in self.writes:
                    w.cancel()
                raise
        if planned < self.src.size:
            self.stats.bytes_skipped += self.src.size - planned
            self._advance(self.src.size - planned)
        counts = self.mover.counts
        self.stats.bytes_shared = counts.shared
        self.stats.bytes_copied_in_kernel = counts.copied_in_kernel
        self.stats.bytes_copied = self.stats.bytes_written - self.moved + counts.copied
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _drain_one(self, inflight: collections.deque[cf.Future[_Piece]], pool: cf.Executor) -> None:
        self._reap_writes(self.workers)
        if self.dst.is_sequential or self.workers == 1:  # one reader finishes in order
            self._store(inflight.popleft().result(), pool)
            return
        # writers that allow it take whichever chunk is ready first
        done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
        for f in list(done):
            inflight.remove(f)
            self._store(f.result(), pool)


@dataclass
class _Move:
    """A data write whose bytes come from a source file instead of memory."""

    src_fd: int
    src_offset: int
    fd: int
    offset: int
    length: int


class _Placer:
    """Learns where the output stores a run it has not seen: the run is written, deferred,
    as a marker buffer, and the data writes that the output issues from slices of the
    marker are where the run's bytes go. Its other writes (a VHD block's sector bitmap)
    stand. A writer that copies the data instead (a partial cluster merged with what
    surrounds it, a compressing writer) leaves the run unplaced: it is then written the
    ordinary way, over whatever the writer put there."""

    def __init__(self, dst: Image, size: int) -> None:
        self.dst = dst
        # never touched, so it costs no memory: the writer takes it through encode(),
        # which tells the writers that keep zeros as holes that it holds none
        self.marker = mmap.mmap(-1, size)
        self.base = _address(memoryview(self.marker))

    def place(self, loc: Location) -> tuple[bool, list[PendingWrite | _Move]]:
        """Whether the output took the run as slices of the marker, and the writes that
        store it (source bytes moved); when it did not, only its other writes."""
        assert loc.fd is not None
        n = loc.length
        marker = memoryview(self.marker)[:n]
        with self.dst.deferred_writes() as pending:
            self.dst.write_encoded(loc.start, self.dst.encode(loc.start, marker))
        out: list[PendingWrite | _Move] = []
        covered: list[tuple[int, int]] = []
        for fd, data, offset in pending:
            at = _address(data) - self.base
            if at >= 0 and at + len(data) <= n and data.contiguous:
                out.append(_Move(loc.fd, loc.offset + at, fd, offset, len(data)))
                covered.append((at, len(data)))
            else:
                out.append((fd, data, offset))
        covered.sort()
        pos = 0
        for at, length in covered:
            if at != pos:
                break
            pos += length
        if pos != n:
            return False, [w for w in out if not isinstance(w, _Move)]
        return True, out


def _address(mv: memoryview) -> int:
    return int(np.frombuffer(mv, np.uint8).ctypes.data) if len(mv) else -1


#: data writes at least this long are preallocated first (smaller ones lose by it)
PREALLOCATE_MIN = 256 << 10
#: an appending target is preallocated this far ahead of its writes at a time: one
#: fallocate per 2 MiB write is a journal transaction each (609 calls, 80 ms of a 1.2 GiB
#: raw->qcow2 copy; 32 MiB steps: 40 calls, 10 ms, the writes themselves unchanged)
PREALLOCATE_AHEAD = 32 << 20


class _DataWriter:
    """Issues the deferred data writes (on the writer thread), preallocating the ranges
    they cover so that ext4 takes them into allocated blocks. A target that appends fresh
    clusters at the end of its file gets whole steps ahead, and what lies beyond the
    file's end afterwards is released by `trim`. So does a target that `prealloc_ahead`
    allows (a fresh raw file or dynamic VHDX, where only the engine's data lands past its
    first write): there `trim` also punches back what was preallocated and not written,
    the holes the output must keep. Other targets get exactly the ranges they write:
    their holes must stay holes, and their metadata may land anywhere in the file."""

    def __init__(self, dst: Image) -> None:
        self.ahead_of_writes = dst.appends or dst.prealloc_ahead
        self.punch_back = dst.prealloc_ahead
        #: outputs that cannot preallocate (block devices, some filesystems)
        self.refused: set[int] = set()
        #: per file: where its preallocation ends
        self.ahead: dict[int, int] = {}
        #: per file, with punch_back: the ranges preallocated and the ranges written
        self.preallocated: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        self.written: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)

    def write(self, pending: list[PendingWrite | _Move], mover: Mover) -> None:
        run: list[PendingWrite] = []  # writes from memory, issued together
        for w in pending:
            if not isinstance(w, _Move):
                run.append(w)
                continue
            if run:
                self._write(run)
                run = []
            # no preallocation: shared blocks replace whatever lies there
            mover.move(w.src_fd, w.src_offset, w.fd, w.offset, w.length)
            if self.punch_back:
                self.written[w.fd].append((w.offset, w.offset + w.length))
        if run:
            self._write(run)

    def _write(self, pending: list[PendingWrite]) -> None:
        # pieces that follow one another in a file (a VHD block's bitmap and its data) go
        # out in one pwritev
        for fd, group in itertools.groupby(pending, key=lambda w: w[0]):
            for offset, bufs in contiguous([(off, data) for _, data, off in group]):
                n = sum(len(b) for b in bufs)
                if n >= PREALLOCATE_MIN and fd not in self.refused:
                    self._preallocate(fd, offset, n)
                pwritev_all(fd, bufs, offset)
                if self.punch_back:
                    self.written[fd].append((offset, offset + n))

    def _preallocate(self, fd: int, offset: int, n: int) -> None:
        start, end = offset, offset + n
        if self.ahead_of_writes:
            done = self.ahead.get(fd, 0)
            if end <= done:  # (or out of order, below the mark: left as it is)
                return
            start = max(start, done)
            end = max(end, start + PREALLOCATE_AHEAD)
        if preallocate(fd, start, end - start):
            if self.ahead_of_writes:
                self.ahead[fd] = end
            if self.punch_back:
                self.preallocated[fd].append((start, end))
        else:
            self.refused.add(fd)

    def trim(self) -> None:
        """Give back what was preallocated and not written: past the end of each file by
        truncating it to its own size (ext4 does not punch holes beyond the end), inside
        a `prealloc_ahead` target's file by punching holes."""
        for fd, end in self.ahead.items():
            size = os.fstat(fd).st_size
            for hole in self._unwritten(fd, size):
                punch_hole(fd, hole.start, hole.length)
            if end > size:
                os.ftruncate(fd, size)
        self.ahead.clear()

    def _unwritten(self, fd: int, size: int) -> Iterator[Extent]:
        """Ranges of [0, size) preallocated ahead of the writes that none covered."""
        spans = self.preallocated.pop(fd, [])
        if not spans:
            return
        written = self.written.pop(fd, [])
        for start, length, pre, wrote in overlay(
            from_ranges(spans, size), from_ranges(written, size)
        ):
            if pre == Kind.DATA and wrote == Kind.ZERO:
                yield Extent(start, length, Kind.ZERO)


def default_workers(src: Image | None = None, dst: Image | None = None) -> int:
    """One more than the cores when chunks are (de)compressed: reads block on I/O while
    others compress. A plain copy is kernel work (the copies in and out of the page
    cache) plus the writer's bookkeeping under the GIL: more reader threads only contend
    with those (4 GiB disk, warm cache: 0.41 s with one reader, 0.49 s with three)."""
    if src is not None and dst is not None and not (src.decodes or dst.encodes):
        return 1
    return (os.cpu_count() or 2) + 1


def convert_image(
    src: Image,
    dst: Image,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    backing: Image | None = None,
    only: Iterable[Extent] | None = None,
    chunk: int = CHUNK,
    share: bool = True,
) -> ConvertStats:
    """Copy `src` into a freshly created `dst`.

    `only` restricts the copy to DATA extents of that map (e.g. blocks a filesystem uses);
    everything else reads as zeros in the output. With `backing`, the output is written as
    an overlay: only clusters that differ from what `backing` reads are stored. Without
    `share`, every byte is read and written (no block shared with the source).
    """
    extents: Iterable[Extent] = src.extents()
    if only is not None:
        extents = intersect_data(extents, coalesce(only))
    if backing is not None:
        # where the backing has data and the source has none, the overlay must say zero
        extents = union_data(extents, backing.extents(0, min(backing.size, src.size)))
        if backing.size < src.size:
            extents = _pad(extents, backing.size, src.size)
    engine = _Engine(
        src,
        dst,
        backing=backing,
        workers=workers or default_workers(src, dst),
        chunk=chunk,
        progress=progress,
        share=share,
    )
    return engine.run(extents)


def _pad(extents: Iterable[Extent], start: int, end: int) -> Iterator[Extent]:
    """Append the source's own map beyond a shorter backing image."""
    last = start
    for e in extents:
        last = max(last, e.end)
        yield e
    if last < end:
        yield Extent(last, end - last, Kind.DATA)


def convert(
    src: Image,
    dst_path: str,
    out_fmt: str,
    *,
    options: dict[str, Any] | None = None,
    force: bool = False,
    compress: bool = False,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    backing_dirs: tuple[str, ...] | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    only: Iterable[Extent] | None = None,
    sources: tuple[str, ...] | None = None,
    durable: bool = True,
    share: bool = True,
) -> ConvertStats:
    """Convert an opened image into a new file: written as DST.partial, renamed on success
    (after an fsync unless `durable` is off)."""
    from . import normalize_format
    from . import open as open_image
    from .output import atomic_create

    out_fmt = normalize_format(out_fmt)
    opts = dict(options or {})
    if compress:
        opts["compress"] = True
    backing: Image | None = None
    if backing_file is not None:
        opts["backing_file"] = backing_file
        if backing_fmt:
            opts["backing_fmt"] = backing_fmt
        base_dir = os.path.dirname(os.path.abspath(dst_path))
        backing_path = os.path.join(base_dir, backing_file)
        backing = open_image(backing_path, backing_fmt, backing_dirs=backing_dirs)
    if sources is None:
        sources = tuple(src.files())
    try:
        with atomic_create(
            dst_path, out_fmt, src.size, force=force, sources=sources, durable=durable, **opts
        ) as dst:
            stats = convert_image(
                src,
                dst,
                progress=progress,
                workers=workers,
                backing=backing,
                only=only,
                share=share,
            )
    finally:
        if backing is not None:
            backing.close()
    stats.output = dst_path
    stats.output_format = out_fmt
    return stats

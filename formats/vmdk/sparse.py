"""Hosted sparse extents (magic KDMV): monolithicSparse, twoGbMaxExtentSparse pieces and
streamOptimized, read and (uncompressed) written in place.

Spec: "Virtual Disk Format 5.0", "Hosted Sparse Extents" and "Stream-Optimized Compressed
Sparse Extents". Grain tables are '<u4' numpy arrays loaded on demand, adjacent tables with
one read; grains that follow each other in the file are read or written with one call.

A huge extent (qemu-img makes them up to 128 TiB: 8 GiB of preallocated, mostly unwritten
grain tables) costs memory and time for its data, not its size: a read-only extent caches
at most CACHE_BYTES of tables, and tables lying in holes of the file (or never allocated)
are known to be empty without being read.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from construct import ConstructError

from ..errors import CorruptImage, UnsupportedFeature
from ..extents import runs
from ..fileio import file_size, pread_exact, punch_hole, pwrite_all
from . import descriptor as dd
from . import layout as L
from .esx import open_cowd
from .extent import (
    DATA,
    MAP_WINDOW,
    MAX_REPORTED,
    RESERVE_STEP,
    UNALLOCATED,
    ExtentFile,
    Under,
    file_runs,
    gte_states,
    open_fd,
    read_runs,
)

#: a compressed grain read pulls in its neighbours up to this far in one system call
READ_SPAN = 4 << 20
#: the most grain tables read with one system call (8 MiB of 512-entry tables)
MAX_TABLE_READ = 4096
#: grain tables a read-only extent keeps (a writable one keeps those it may change)
CACHE_BYTES = 32 << 20
#: past this many data segments the file's holes are not worth mapping: tables are read
MAX_SEGMENTS = 1 << 16


def _data_segments(fd: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends) of the file's data, from SEEK_DATA/SEEK_HOLE; None when the
    filesystem cannot tell or the file is too fragmented to be worth it."""
    starts: list[int] = []
    ends: list[int] = []
    end = file_size(fd)
    pos = 0
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            return None
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        starts.append(data)
        ends.append(hole)
        if len(starts) > MAX_SEGMENTS:
            return None
        pos = hole
    return np.array(starts, np.int64), np.array(ends, np.int64)


def _in_holes(fd: int, sectors: np.ndarray, length: int) -> np.ndarray:
    """Which of the ranges [sector * 512, + length) lie wholly in holes of the file,
    so read as zeros without being read (all False when holes cannot be known)."""
    segments = _data_segments(fd)
    if segments is None or not len(sectors):
        return np.zeros(len(sectors), bool)
    starts, ends = segments
    holes = np.ones(len(sectors), bool)
    if not len(starts):
        return holes
    for at in range(0, len(sectors), 1 << 20):  # a piece at a time: millions of tables
        offs = sectors[at : at + (1 << 20)].astype(np.int64) * L.SECTOR
        # the first data segment ending after a range's start is the only one to test
        i = np.searchsorted(ends, offs, side="right")
        hit = i < len(starts)
        hit[hit] = starts[i[hit]] < offs[hit] + length
        holes[at : at + len(offs)] = ~hit
    return holes


class SparseExtent(ExtentFile):
    """A hosted sparse extent (KDMV): monolithicSparse, twoGbMaxExtentSparse pieces,
    streamOptimized. Grain tables are '<u4' numpy arrays loaded on demand, contiguous
    tables with one read."""

    type = "SPARSE"

    def __init__(
        self, path: str, fd: int, header: Any, gd_offset: int, *, writable: bool, length: int
    ) -> None:
        super().__init__(path, length, writable=writable)
        self.fd = fd
        self.header = header
        self.version = header.version
        self.flags = header.flags
        self.compressed = bool(header.flags & L.FLAG_COMPRESSED)
        self.has_markers = bool(header.flags & L.FLAG_MARKERS)
        self.grain_sectors = header.grainSize
        self.grain = header.grainSize * L.SECTOR
        self.cluster_size = self.grain
        self.per_gt = header.numGTEsPerGT
        self.gt_bytes = self.per_gt * 4
        self.gt_sectors = -(-self.gt_bytes // L.SECTOR)
        self.capacity = header.capacity * L.SECTOR
        self.grains = -(-header.capacity // header.grainSize)
        self.gts = -(-self.grains // self.per_gt)
        self.gd_offset = gd_offset
        self.file_end = file_size(fd)
        self.gd = self._read_directory(gd_offset, "grain directory")
        self.rgd: np.ndarray | None = None
        if header.flags & L.FLAG_REDUNDANT_GT and header.rgdOffset and not self.compressed:
            self.rgd = self._read_directory(header.rgdOffset, "redundant grain directory")
        self._tables: dict[int, np.ndarray] = {}
        self._zero_table = np.zeros(self.per_gt, np.uint32)
        self._zero_table.flags.writeable = False  # written to only through a copy
        self._cache_limit = max(CACHE_BYTES // self.gt_bytes, 2 * (MAP_WINDOW // self.per_gt + 1))
        #: tables known to hold only zeros (never allocated, or in a hole of the file);
        #: only for a read-only extent, whose tables cannot change under it
        self._hollow: np.ndarray | None = None
        if not writable:
            self._hollow = (self.gd == 0) | _in_holes(fd, self.gd, self.gt_bytes)
        self._lock = threading.Lock()
        self._dirty_tables: set[int] = set()
        self._dirty_directory = False
        self.alloc_end = self.file_end + (-self.file_end) % L.SECTOR
        self._reserved = self.file_end

    # -- metadata ----------------------------------------------------------------------
    def _read_directory(self, offset: int, what: str) -> np.ndarray:
        n = self.gts * 4
        if offset * L.SECTOR + n > self.file_end or offset == 0:
            raise CorruptImage(
                f"vmdk: {self.path}: {what} at sector {offset} (+{n:#x} bytes) lies outside "
                f"the file ({self.file_end:#x} bytes)"
            )
        gd = np.frombuffer(
            pread_exact(self.fd, n, offset * L.SECTOR, f"vmdk: {self.path}"), "<u4"
        ).astype(np.uint32)
        # compared in sectors: no 64-bit copy of a directory that may hold millions
        last = (self.file_end - self.gt_bytes) // L.SECTOR
        if last < 0:
            bad = np.arange(len(gd))
        else:
            bad = np.flatnonzero(gd > np.uint32(min(last, 0xFFFF_FFFF)))
        if len(bad):
            k = int(bad[0])
            raise CorruptImage(
                f"vmdk: {self.path}: {what} entry {k} points at sector {int(gd[k])}, past the "
                f"end of the file ({self.file_end:#x} bytes)"
            )
        return gd

    def _load(self, first: int, last: int, validate: bool = True) -> list[np.ndarray]:
        """Grain tables first..last, through the cache; tables that follow each other in
        the file are read with one system call. The list stays valid when another thread
        evicts them from the cache."""
        cache = self._tables
        try:
            return [cache[k] for k in range(first, last + 1)]
        except KeyError:
            pass
        with self._lock:
            out: dict[int, np.ndarray] = {}
            want = []
            for k in range(first, last + 1):
                table = cache.get(k)
                if table is None and self._hollow is not None and self._hollow[k]:
                    table = self._zero_table  # not cached: it costs nothing to know
                elif table is None and self.gd[k] == 0:
                    table = cache[k] = self._zero_table
                if table is None:
                    want.append(k)
                else:
                    out[k] = table
            if want:
                self._read_tables(np.array(want, dtype=np.int64), out, validate)
            if self._hollow is not None and len(cache) > self._cache_limit:
                for k in list(itertools.islice(cache, len(cache) - self._cache_limit)):
                    del cache[k]  # the oldest first; a read-only extent has none dirty
            return [out[k] for k in range(first, last + 1)]

    def _read_tables(self, ks: np.ndarray, out: dict[int, np.ndarray], validate: bool) -> None:
        """Read tables `ks` (all allocated) into `out` and the cache."""
        offs = self.gd[ks].astype(np.int64)
        order = np.argsort(offs, kind="stable")
        ks, offs = ks[order], offs[order]
        # one read per run of adjacent tables, at most MAX_TABLE_READ tables long
        breaks = np.flatnonzero(np.diff(offs) != self.gt_sectors) + 1
        cuts = np.arange(MAX_TABLE_READ, len(offs), MAX_TABLE_READ)
        breaks = np.union1d(breaks, cuts)
        for group_k, group_o in zip(np.split(ks, breaks), np.split(offs, breaks)):
            count = len(group_k)
            raw = pread_exact(
                self.fd,
                count * self.gt_sectors * L.SECTOR,
                int(group_o[0]) * L.SECTOR,
                f"vmdk: {self.path}: grain table",
            )
            tables = np.frombuffer(raw, "<u4").reshape(count, -1)[:, : self.per_gt]
            tables = tables.astype(np.uint32)
            if validate:
                self._validate(group_k, tables)
            for k, t in zip(group_k.tolist(), tables):
                self._tables[k] = out[k] = t

    def _grain_limit(self) -> int:
        """Bytes a grain entry needs before the end of file."""
        return L.GRAIN_MARKER_SIZE if self.compressed else min(self.grain, L.SECTOR)

    def _validate(self, ks: np.ndarray, tables: np.ndarray) -> None:
        ends = tables.astype(np.uint64) * L.SECTOR + self._grain_limit()
        bad = np.argwhere((tables > L.GTE_ZERO) & (ends > max(self.file_end, self.alloc_end)))
        if len(bad):
            row, col = (int(x) for x in bad[0])
            raise CorruptImage(
                f"vmdk: {self.path}: grain table {int(ks[row])} entry {col} points at sector "
                f"{int(tables[row, col])}, past the end of the file ({self.file_end:#x} bytes)"
            )

    def _gtes(self, g0: int, g1: int) -> np.ndarray:
        """Grain table entries of grains g0..g1-1 (a copy when it spans tables)."""
        k0, k1 = g0 // self.per_gt, (g1 - 1) // self.per_gt
        parts = self._load(k0, k1)
        if k0 == k1:
            return parts[0][g0 - k0 * self.per_gt : g1 - k0 * self.per_gt]
        flat = np.concatenate(parts)
        return flat[g0 - k0 * self.per_gt : g1 - k0 * self.per_gt]

    def _set_gtes(self, grains: np.ndarray, values: np.ndarray) -> None:
        ks = grains // self.per_gt
        # grains arrive sorted: cut them where the table changes
        cuts = [0, *(np.flatnonzero(np.diff(ks)) + 1).tolist(), len(ks)]
        for a, b in itertools.pairwise(cuts):
            k = int(ks[a])
            sel = slice(a, b)
            table = self._tables[k]
            if not table.flags.writeable:
                table = table.copy()
                self._tables[k] = table
            table[grains[sel] - k * self.per_gt] = values[sel]
            self._dirty_tables.add(k)

    # -- reading -----------------------------------------------------------------------
    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        g = start // self.grain
        last = -(-end // self.grain)
        while g < last:
            stop = min(last, g + MAP_WINDOW)
            if self._empty(g, stop):
                # a run of windows whose tables are all empty is one step, unread
                first = g
                while g < last and self._empty(g, min(last, g + MAP_WINDOW)):
                    g = min(last, g + MAP_WINDOW)
                yield (
                    max(first * self.grain, start),
                    min(g * self.grain, end) - max(first * self.grain, start),
                    UNALLOCATED,
                )
                continue
            st = gte_states(self._gtes(g, stop))
            for first, count, value in runs(st):
                s = max((g + first) * self.grain, start)
                e = min((g + first + count) * self.grain, end)
                if s < e:
                    yield s, e - s, value
            g = stop

    def _empty(self, g0: int, g1: int) -> bool:
        """Grains g0..g1-1 are mapped by tables known to be empty."""
        if self._hollow is None:
            return False
        return bool(self._hollow[g0 // self.per_gt : (g1 - 1) // self.per_gt + 1].all())

    def _pieces(self, offset: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        g0, g1 = offset // self.grain, -(-(offset + n) // self.grain)
        gtes = self._gtes(g0, g1).astype(np.int64)
        return file_runs(gte_states(gtes), gtes * L.SECTOR, self.grain, g0, offset, n)

    def locate(self, offset: int, n: int) -> Iterator[tuple[int, int, int | None, int]]:
        if self.compressed:
            yield 0, n, None, 0
            return
        for at, length, state, foff in self._pieces(offset, n):
            yield at, length, self.fd if state == DATA else None, foff

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        if self.compressed:
            self._read_compressed(offset, buf, under)
            return
        read_runs(self.fd, self._pieces(offset, len(buf)), offset, buf, under)

    def _read_compressed(self, offset: int, buf: memoryview, under: Under) -> None:
        g0, g1 = offset // self.grain, -(-(offset + len(buf)) // self.grain)
        gtes = self._gtes(g0, g1).astype(np.int64) * L.SECTOR
        window = b""
        wstart = 0
        slack = self.grain + self.grain // 8 + 1024  # deflate's worst case plus a marker
        for i in range(g1 - g0):
            g = g0 + i
            vs, ve = max(g * self.grain, offset), min((g + 1) * self.grain, offset + len(buf))
            part = buf[vs - offset : ve - offset]
            entry = int(gtes[i])
            if entry == 0:
                under(vs, part)
                continue
            if entry == L.GTE_ZERO * L.SECTOR:
                part[:] = bytes(len(part))
                continue
            if not (wstart <= entry and entry + slack <= wstart + len(window)):
                later = gtes[i:]
                near = later[(later >= entry) & (later < entry + READ_SPAN)]
                span = int(near.max()) - entry + slack
                window = os.pread(self.fd, span, entry)
                wstart = entry
            grain = self._inflate(window, entry - wstart, g)
            lo = vs - g * self.grain
            part[:] = grain[lo : lo + len(part)]

    def _inflate(self, window: bytes, pos: int, g: int) -> bytes:
        where = f"vmdk: {self.path}: grain {g}"
        view = memoryview(window)
        need = min(self.grain, self.capacity - g * self.grain)
        if self.has_markers:
            if pos + L.GRAIN_MARKER_SIZE > len(window):
                raise CorruptImage(f"{where}: grain marker runs past the end of the file")
            # one marker per grain: the struct twin of layout.GrainMarker, not construct
            lba, size = L.GRAIN_MARKER.unpack_from(window, pos)
            if lba != g * self.grain_sectors:
                raise CorruptImage(
                    f"{where}: grain marker names sector {lba}, expected {g * self.grain_sectors}"
                )
            start = pos + L.GRAIN_MARKER_SIZE
            if size == 0 or start + size > len(window):
                raise CorruptImage(f"{where}: compressed size {size} is out of range")
            try:
                out = zlib.decompress(view[start : start + size], bufsize=self.grain)
            except zlib.error:
                out = b""  # not a zlib stream: maybe raw deflate, tried below
            if len(out) >= need:
                return out if len(out) == self.grain else out.ljust(self.grain, b"\0")
            data = view[start : start + size]
        else:
            data = view[pos:]
        try:
            d = zlib.decompressobj()
            out = d.decompress(data, self.grain)
        except zlib.error:
            try:
                d = zlib.decompressobj(-15)  # a raw deflate stream, without zlib's header
                out = d.decompress(data, self.grain)
            except zlib.error as exc:
                raise CorruptImage(f"{where}: compressed data is damaged ({exc})") from exc
        if len(out) < need:
            raise CorruptImage(f"{where}: inflates to {len(out)} bytes, expected {need}")
        return out if len(out) == self.grain else out.ljust(self.grain, b"\0")

    # -- writing (uncompressed extents) -------------------------------------------------
    def write(self, offset: int, data: memoryview, under: Under) -> None:
        if self.compressed:
            raise UnsupportedFeature(
                f"vmdk: {self.path}: compressed (streamOptimized) extents are read-only"
            )
        gb = self.grain
        end = offset + len(data)
        if offset % gb or (end % gb and end != self.length):
            # whole grains only: fill the edges from what the disk reads there now
            s, e = offset - offset % gb, min(-(-end // gb) * gb, self.length)
            whole = bytearray(e - s)
            mv = memoryview(whole)
            self.read(s, mv[: min(gb, e - s)], under)
            if e - gb > s:
                self.read(e - gb, mv[e - gb - s :], under)
            mv[offset - s : end - s] = data
            offset, data = s, mv
        self._write_grains(offset, data)

    def _write_grains(self, offset: int, data: memoryview) -> None:
        gb = self.grain
        g0, g1 = offset // gb, -(-(offset + len(data)) // gb)
        self._ensure_tables(g0 // self.per_gt, (g1 - 1) // self.per_gt)
        gtes = self._gtes(g0, g1)
        count = g1 - g0
        if count == 1 or not gtes.any():
            # the common case of a conversion: fresh grains, appended with one write
            fresh = int(gtes[0]) <= L.GTE_ZERO if count == 1 else True
            if fresh:
                foff = self.alloc_end
                self._allocate(np.arange(g0, g1, dtype=np.int64))
                self.pwrite(self.fd, data, foff)
                return
        missing = np.flatnonzero(gtes <= L.GTE_ZERO)
        if len(missing):
            self._allocate(g0 + missing)
        for at, n, _state, foff in self._pieces(offset, len(data)):
            self.pwrite(self.fd, data[at : at + n], foff)

    def _allocate(self, grains: np.ndarray) -> None:
        """Give `grains` (ascending) the next places in file order, so that a sequential
        copy stays one run."""
        first = self.alloc_end // L.SECTOR
        values = first + np.arange(len(grains), dtype=np.int64) * self.grain_sectors
        if values[-1] > 0xFFFF_FFFF:
            raise UnsupportedFeature(f"vmdk: {self.path}: extent file exceeds 2 TiB")
        self._set_gtes(grains, values.astype(np.uint32))
        self.alloc_end += len(grains) * self.grain
        self.file_end = max(self.file_end, self.alloc_end)
        self._reserve(self.alloc_end)

    def _reserve(self, end: int) -> None:
        """Lengthen the file ahead of appended grains: writes past the end of a file cost
        ext4 and XFS about three times more than writes inside it. flush() trims it."""
        if end > self._reserved:
            self._reserved = end + RESERVE_STEP
            os.ftruncate(self.fd, self._reserved)

    def _ensure_tables(self, k0: int, k1: int) -> None:
        """Give grain tables that were never allocated a place at the end of the file."""
        self._load(k0, k1)
        for k in range(k0, k1 + 1):
            if self.gd[k] == 0:
                self.gd[k] = self._allocate_table()
                if self.rgd is not None:
                    self.rgd[k] = self._allocate_table()
                self._dirty_directory = True
                self._dirty_tables.add(k)

    def _allocate_table(self) -> int:
        at = self.alloc_end // L.SECTOR
        pwrite_all(self.fd, bytes(self.gt_sectors * L.SECTOR), self.alloc_end)
        self.alloc_end += self.gt_sectors * L.SECTOR
        self.file_end = max(self.file_end, self.alloc_end)
        return at

    def write_zeroes(self, offset: int, n: int, under: Under, has_backing: bool) -> None:
        gb = self.grain
        s, e = -(-offset // gb) * gb, (offset + n) // gb * gb
        if offset + n == self.length:
            e = offset + n
        if s >= e:
            self.write(offset, memoryview(bytes(n)), under)
            return
        if offset < s:
            self.write(offset, memoryview(bytes(s - offset)), under)
        if e < offset + n:
            self.write(e, memoryview(bytes(offset + n - e)), under)
        for at, length, state, foff in self._pieces(s, e - s):
            if state == DATA:
                if not punch_hole(self.fd, foff, length):
                    pwrite_all(self.fd, bytes(length), foff)
            elif state == UNALLOCATED and has_backing:
                # the parent's data must be hidden: store real zeros
                pos = 0
                while pos < length:
                    step = min(8 << 20, length - pos)
                    self._write_grains(s + at + pos, memoryview(bytes(step)))
                    pos += step

    def flush(self, durable: bool = True) -> None:
        if not self.writable:
            return
        for k in sorted(self._dirty_tables):
            table = self._tables[k].astype("<u4").tobytes()
            pwrite_all(self.fd, table, int(self.gd[k]) * L.SECTOR)
            if self.rgd is not None and self.rgd[k]:
                pwrite_all(self.fd, table, int(self.rgd[k]) * L.SECTOR)
        self._dirty_tables.clear()
        if self._dirty_directory:
            pwrite_all(self.fd, self.gd.astype("<u4").tobytes(), self.gd_offset * L.SECTOR)
            if self.rgd is not None:
                rgd = self.rgd.astype("<u4").tobytes()
                pwrite_all(self.fd, rgd, self.header.rgdOffset * L.SECTOR)
            self._dirty_directory = False
        if file_size(self.fd) != self.alloc_end:
            os.ftruncate(self.fd, self.alloc_end)
        self._reserved = self.alloc_end
        if durable:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    # -- checking ----------------------------------------------------------------------
    def check(self) -> list[str]:
        """Grains past the end of the file, sharing sectors, overlapping metadata; redundant
        tables that differ. Tables are visited a cache-full at a time: memory follows the
        allocated grains, not the capacity."""
        problems: list[str] = []
        where = f"{os.path.basename(self.path or '')}"
        used, entries = self._allocated_grains()
        offs = entries * L.SECTOR
        beyond = offs + self._grain_limit() > self.file_end
        for g, e in zip(used[beyond][:MAX_REPORTED].tolist(), entries[beyond].tolist()):
            problems.append(f"{where}: grain {g} at sector {e} lies beyond the end of the file")
        if beyond.sum() > MAX_REPORTED:
            problems.append(f"{where}: {int(beyond.sum())} grains beyond the end of the file")
        # every grain and every table must own its sectors
        order = np.argsort(offs, kind="stable")
        sorted_offs = offs[order]
        dup = np.flatnonzero(np.diff(sorted_offs) == 0) if not self.compressed else np.array([])
        for i in dup[:MAX_REPORTED].tolist():
            a, b = int(used[order[i]]), int(used[order[i + 1]])
            problems.append(
                f"{where}: grains {a} and {b} share sector {int(sorted_offs[i]) // 512}"
            )
        if not self.compressed:
            overlap = np.flatnonzero(np.diff(sorted_offs) < self.grain)
            overlap = overlap[np.diff(sorted_offs)[overlap] > 0]
            for i in overlap[:MAX_REPORTED].tolist():
                a, b = int(used[order[i]]), int(used[order[i + 1]])
                problems.append(f"{where}: grains {a} and {b} overlap in the file")
            grain_len = self.grain
        else:
            grain_len = L.GRAIN_MARKER_SIZE
        for start, stop, what in self._metadata_ranges():
            hit = np.flatnonzero((offs < stop) & (offs + grain_len > start))
            for i in hit[:MAX_REPORTED].tolist():
                problems.append(f"{where}: grain {int(used[i])} overlaps the {what}")
        for gd, name in ((self.gd, "grain table"), (self.rgd, "redundant grain table")):
            if gd is not None:
                problems += self._overlapping_tables(used, offs, grain_len, gd, name, where)
        if self.compressed and self.has_markers:
            problems += self._check_markers(used, entries, where)
        if self.rgd is not None:
            problems += self._check_redundant(where)
        return problems

    def _batches(self) -> Iterator[tuple[int, int]]:
        """First and last table of each cache-full of tables, skipping known empty ones."""
        step = max(1, self._cache_limit // 2)
        for k0 in range(0, self.gts, step):
            k1 = min(self.gts, k0 + step) - 1
            if self._hollow is None or not self._hollow[k0 : k1 + 1].all():
                yield k0, k1

    def _allocated_grains(self) -> tuple[np.ndarray, np.ndarray]:
        """Every grain with data (or a compressed grain) and its grain table entry."""
        used: list[np.ndarray] = []
        entries: list[np.ndarray] = []
        for k0, k1 in self._batches():
            base = k0 * self.per_gt
            gtes = np.concatenate(self._load(k0, k1, validate=False))[: self.grains - base]
            idx = np.flatnonzero(gtes > L.GTE_ZERO)
            used.append(idx.astype(np.int64) + base)
            entries.append(gtes[idx].astype(np.int64))
        if not used:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(used), np.concatenate(entries)

    def _overlapping_tables(
        self,
        used: np.ndarray,
        offs: np.ndarray,
        grain_len: int,
        gd: np.ndarray,
        name: str,
        where: str,
    ) -> list[str]:
        """Grains overlapping a grain table: tables are all the same length, so the last
        table starting before a grain's end is the only one to test."""
        starts = np.sort(gd[gd != 0]).astype(np.int64) * L.SECTOR
        if not len(starts) or not len(offs):
            return []
        i = np.searchsorted(starts, offs + grain_len, side="left") - 1
        hit = np.flatnonzero((i >= 0) & (starts[np.maximum(i, 0)] + self.gt_bytes > offs))
        problems = []
        for j in hit[:MAX_REPORTED].tolist():
            k = int(np.flatnonzero(gd == int(starts[i[j]]) // L.SECTOR)[0])
            problems.append(f"{where}: grain {int(used[j])} overlaps the {name} {k}")
        return problems

    def _check_redundant(self, where: str) -> list[str]:
        """Each redundant grain table holds what its grain table holds; tables both lying
        in holes of the file are equal unread."""
        assert self.rgd is not None
        problems: list[str] = []
        rgd_hollow = (self.rgd == 0) | _in_holes(self.fd, self.rgd, self.gt_bytes)
        for k0, k1 in self._batches():
            tables = self._load(k0, k1, validate=False)
            for k in range(k0, k1 + 1):
                if self.rgd[k] == 0 or self.gd[k] == 0:
                    continue
                table = tables[k - k0]
                if rgd_hollow[k] and not table.any():
                    continue
                raw = os.pread(self.fd, self.gt_bytes, int(self.rgd[k]) * L.SECTOR)
                if raw != table.astype("<u4").tobytes():
                    problems.append(f"{where}: redundant grain table {k} differs from table {k}")
                    if len(problems) > MAX_REPORTED:
                        return problems
        return problems

    def _metadata_ranges(self) -> list[tuple[int, int, str]]:
        """The header, descriptor and directories (the tables are tested apart)."""
        out = [(0, L.SECTOR, "header")]
        h = self.header
        if h.descriptorOffset and h.descriptorSize:
            s = h.descriptorOffset * L.SECTOR
            out.append((s, s + h.descriptorSize * L.SECTOR, "embedded descriptor"))
        for gd, name in ((self.gd, "grain directory"), (self.rgd, "redundant grain directory")):
            if gd is None:
                continue
            off = self.gd_offset if gd is self.gd else h.rgdOffset
            out.append((off * L.SECTOR, off * L.SECTOR + self.gts * 4, name))
        return out

    def _check_markers(self, used: np.ndarray, entries: np.ndarray, where: str) -> list[str]:
        problems = []
        for g, e in zip(used.tolist(), entries.tolist()):
            raw = os.pread(self.fd, L.GRAIN_MARKER_SIZE, e * L.SECTOR)
            if len(raw) < L.GRAIN_MARKER_SIZE:
                continue  # already reported as beyond the end
            m = L.GrainMarker.parse(raw)
            if m.lba != g * self.grain_sectors or not 0 < m.size <= 2 * self.grain:
                problems.append(f"{where}: grain {g} has a bad grain marker (lba {m.lba})")
                if len(problems) >= MAX_REPORTED:
                    break
        return problems

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["virtual-size"] = self.length
        return out


def read_sparse_header(fd: int, path: str) -> tuple[Any, int]:
    """The header of a hosted sparse extent and its grain directory sector (from the
    footer for a stream-optimized file whose header says GD_AT_END)."""
    raw = pread_exact(fd, L.SECTOR, 0, f"vmdk: {path}")
    try:
        header = L.SparseExtentHeader.parse(raw)
    except ConstructError as exc:
        raise CorruptImage(f"vmdk: {path}: not a VMDK sparse extent (bad magic)") from exc
    _validate_header(header, path)
    gd_offset = header.gdOffset
    if gd_offset == L.GD_AT_END:
        footer = _read_footer(fd, path)
        for name in ("capacity", "grainSize", "numGTEsPerGT"):
            if footer[name] != header[name]:
                raise CorruptImage(f"vmdk: {path}: footer's {name} differs from the header's")
        gd_offset = footer.gdOffset
        header = footer
        if gd_offset == L.GD_AT_END:
            raise CorruptImage(f"vmdk: {path}: footer does not say where the grain directory is")
    return header, gd_offset


def _validate_header(h: Any, path: str) -> None:
    where = f"vmdk: {path}"
    if h.version > 3:
        raise UnsupportedFeature(f"{where}: sparse extent version {h.version}")
    unknown = h.flags & L.INCOMPATIBLE_FLAGS_MASK & ~L.KNOWN_FLAGS
    if unknown:
        raise UnsupportedFeature(f"{where}: unknown incompatible flags {unknown:#x}")
    if h.flags & L.FLAG_VALID_NEWLINE and any(h[k] != v for k, v in L.NEWLINE_BYTES.items()):
        raise CorruptImage(f"{where}: newline detection bytes are damaged (copied in text mode?)")
    if h.flags & L.FLAG_COMPRESSED and h.compressAlgorithm != L.COMPRESSION_DEFLATE:
        raise UnsupportedFeature(f"{where}: compression algorithm {h.compressAlgorithm}")
    g = h.grainSize
    if not (1 <= g <= 2048 and g & (g - 1) == 0):
        raise CorruptImage(f"{where}: grain size of {g} sectors is invalid")
    n = h.numGTEsPerGT
    if not (1 <= n <= 4096 and n & (n - 1) == 0):
        raise CorruptImage(f"{where}: {n} entries per grain table is invalid")
    if h.capacity > dd.MAX_SECTORS:
        raise CorruptImage(f"{where}: capacity of {h.capacity} sectors is out of range")
    if h.descriptorSize > dd.MAX_DESCRIPTOR_BYTES // L.SECTOR:
        raise CorruptImage(f"{where}: embedded descriptor of {h.descriptorSize} sectors")


def _read_footer(fd: int, path: str) -> Any:
    size = file_size(fd)
    if size < 4 * L.SECTOR or size % L.SECTOR:
        raise CorruptImage(f"vmdk: {path}: stream-optimized file without footer (truncated?)")
    tail = pread_exact(fd, 3 * L.SECTOR, size - 3 * L.SECTOR, f"vmdk: {path}")
    try:
        marker = L.MetadataMarker.parse(tail[: L.SECTOR])
        footer = L.SparseExtentHeader.parse(tail[L.SECTOR : 2 * L.SECTOR])
    except ConstructError as exc:
        raise CorruptImage(
            f"vmdk: {path}: grain directory is at the end but no footer precedes the "
            "end-of-stream marker (truncated?)"
        ) from exc
    if marker.type != L.MARKER_FOOTER or tail[2 * L.SECTOR :] != bytes(L.SECTOR):
        raise CorruptImage(f"vmdk: {path}: footer or end-of-stream marker missing (truncated?)")
    _validate_header(footer, path)
    return footer


def open_sparse_file(path: str, *, writable: bool, length: int | None = None) -> ExtentFile:
    """A SPARSE or VMFSSPARSE extent file, told apart by magic."""
    fd = open_fd(path, writable)
    try:
        magic = os.pread(fd, 4, 0)
        if magic == L.COWD_MAGIC:
            if writable:
                raise UnsupportedFeature(f"vmdk: {path}: vmfsSparse (COWD) extents are read-only")
            return open_cowd(path, fd, length)
        header, gd_offset = read_sparse_header(fd, path)
        if writable and header.flags & L.FLAG_COMPRESSED:
            raise UnsupportedFeature(
                f"vmdk: {path}: streamOptimized images are read-only (convert them instead)"
            )
        if writable and header.version == 3:
            # version 3 carries VMware's changed-block tracking, which writes would betray
            raise UnsupportedFeature(f"vmdk: {path}: version 3 sparse extents are read-only")
        capacity = header.capacity * L.SECTOR
        if length is not None and length > capacity:
            raise CorruptImage(
                f"vmdk: {path}: descriptor gives the extent {length} bytes, its header {capacity}"
            )
        return SparseExtent(
            path,
            fd,
            header,
            gd_offset,
            writable=writable,
            length=capacity if length is None else length,
        )
    except BaseException:
        os.close(fd)
        raise

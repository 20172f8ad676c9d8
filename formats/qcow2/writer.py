"""Writing qcow2: cluster allocation, refcounts, compressed clusters, create().

The writer keeps the refcounts of the whole host file in memory (refcounts.Refcounts)
and L2 tables in the bounded write-back cache; flush() writes refcount blocks, the
refcount table, L2 tables, the L1 table and the header, in that order, so a crash in
between leaves leaks at worst, never a cluster in use with a count of 0. With
lazy_refcounts the header is marked dirty from the first write until that flush, so a
killed writer leaves an image that qemu (and we) repair on open.

A write of contiguous clusters allocates contiguous host clusters and becomes one pwrite.
Partial clusters are read-modify-written (partial subclusters with extended L2 entries);
allocated clusters are overwritten in place. Compressed clusters are packed back to back
at the end of the file; a cluster whose compressed form is not smaller is stored as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backing import BackingPolicy
from ..errors import CorruptImage, FormatError, UnsupportedFeature
from ..extents import runs
from ..fileio import file_size, pread_exact, punch_hole, pwrite_all
from ..options import parse_bool, parse_choice, parse_size
from . import compression
from . import layout as L
from .image import Metadata, Qcow2Image, Snapshot, open_file
from .refcounts import Refcounts, dtype_for, rebuild_refcounts, unpack

_ZEROS = bytes(8 << 20)


@dataclass
class Compressed:
    """What encode() hands the writer: the chunk and, per cluster, its compressed bytes
    (None where compression did not make it smaller)."""

    data: bytes | memoryview
    blobs: list[bytes | None]


def check_writable(
    path: str, meta: Metadata, snapshots: list[Snapshot], policy: BackingPolicy
) -> None:
    if meta.incompatible & L.INCOMPAT_CORRUPT:
        raise CorruptImage(
            f"qcow2: {path}: image is marked corrupt; it can only be opened read-only "
            f"(repair it with qemu-img check -r all)"
        )
    if snapshots:
        raise UnsupportedFeature(
            f"qcow2: {path}: writing to images with internal snapshots is not supported "
            f"({len(snapshots)} snapshots); read them, or convert the image first"
        )
    if (meta.backing_name or meta.has_data_file) and not policy.allow:
        raise UnsupportedFeature(
            f"qcow2: {path}: writing needs its backing or data file, but backing files are disabled"
        )


def open_writer(path: str, policy: BackingPolicy | None = None) -> Qcow2Writer:
    writer = open_file(path, Qcow2Writer, writable=True, policy=policy, check=check_writable)
    assert isinstance(writer, Qcow2Writer)
    return writer


class Qcow2Writer(Qcow2Image):
    """A qcow2 image open for writing."""

    appends = True  # fresh clusters come from the end (not after preallocate_metadata)

    def start_writing(self) -> None:
        meta = self.meta
        hdr = meta.header
        cs = self.cluster_size
        self.compress = False
        self.reftable_offset = hdr.refcount_table_offset
        self.reftable = self._read_reftable(hdr.refcount_table_offset, hdr.refcount_table_clusters)
        if meta.incompatible & L.INCOMPAT_DIRTY:
            # lazy refcounts left stale: rebuild them from the tables, as qemu does on open
            counts = rebuild_refcounts(self)
        else:
            counts = self._read_refcounts()
        used = np.flatnonzero(counts)
        end = max(-(-meta.file_size // cs), int(used[-1]) + 1 if len(used) else 0)
        self.rc = Refcounts(cs, meta.refcount_order, counts, end)
        self.rc_max = self.rc.max
        self._started = False
        self._l1_dirty = False
        self._reftable_dirty = bool(meta.incompatible & L.INCOMPAT_DIRTY)
        if self._reftable_dirty:
            self.rc.dirty.update(range(self.rc.blocks_needed()))
        self._header_dirty = False
        #: next free byte of the compressed area (inside the file's last cluster), or None
        self._cz_pos: int | None = None
        self._grew()
        if self._reftable_dirty:
            self._begin()  # the rebuilt refcounts are written back even if nothing else is

    def _read_reftable(self, offset: int, clusters: int) -> np.ndarray:
        raw = pread_exact(self.fd, clusters * self.cluster_size, offset, "qcow2: refcount table")
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        bad = np.flatnonzero(
            ((table & np.uint64(L.REFTABLE_RESERVED_MASK)) != 0)
            | ((table != 0) & (table + np.uint64(self.cluster_size) > self.meta.file_size))
        )
        if len(bad):
            i = int(bad[0])
            raise CorruptImage(
                f"qcow2: {self.path}: refcount table entry {i} ({int(table[i]):#x}) is "
                f"misaligned or points past the end of the file"
            )
        return table

    def _read_refcounts(self) -> np.ndarray:
        cs = self.cluster_size
        be = cs * 8 >> self.meta.refcount_order
        nclusters = -(-self.meta.file_size // cs)
        nblocks = min(len(self.reftable), -(-nclusters // be))
        counts = np.zeros(max(nblocks * be, 1), dtype=dtype_for(self.meta.refcount_order))
        for b in np.flatnonzero(self.reftable[:nblocks]).tolist():
            raw = pread_exact(self.fd, cs, int(self.reftable[b]), "qcow2: refcount block")
            counts[b * be : (b + 1) * be] = unpack(raw, self.meta.refcount_order)
        return counts

    def _grew(self) -> None:
        self.host_limit = max(self.meta.file_size, self.rc.end << self.cluster_bits)

    def _data_out(self) -> int:
        assert self.data_fd is not None, "an external data file is open with its image"
        return self.data_fd

    def _store_l2(self, offset: int, table: np.ndarray) -> None:
        pwrite_all(self.fd, table.astype(">u8").tobytes(), offset)

    # -- header state ---------------------------------------------------------------
    def _begin(self) -> None:
        """First change since open or flush: clear what we do not maintain, and with
        lazy refcounts mark the image dirty on disk before anything else changes."""
        if self._started:
            return
        self._started = True
        meta, hdr = self.meta, self.meta.header
        if meta.version >= 3:
            keep = meta.autoclear & L.AUTOCLEAR_DATA_FILE_RAW
            if keep != meta.autoclear:
                # bitmaps (and unknown auto-clear data) go stale once we write
                meta.autoclear = hdr.autoclear_features = keep
                self._header_dirty = True
            if meta.compatible & L.COMPAT_LAZY_REFCOUNTS:
                meta.incompatible |= L.INCOMPAT_DIRTY
                hdr.incompatible_features = meta.incompatible
                self._write_header()
                os.fsync(self.fd)

    def _write_header(self) -> None:
        hdr = self.meta.header
        raw = L.Header.build(hdr)
        pwrite_all(self.fd, raw[: L.header_bytes(self.meta.version, self.meta.header_length)], 0)
        self._header_dirty = False

    # -- tables -----------------------------------------------------------------------
    def _l2_for_write(self, li: int) -> tuple[int, np.ndarray]:
        entry = int(self.l1[li])
        off = entry & L.OFFSET_MASK
        if off:
            if not entry & L.OFLAG_COPIED:
                if int(self.rc.counts[off >> self.cluster_bits]) != 1:
                    raise CorruptImage(
                        f"qcow2: {self.path}: L2 table at {off:#x} is shared; refusing to write"
                    )
                self.l1[li] = np.uint64(entry | L.OFLAG_COPIED)
                self._l1_dirty = True
            return off, self.cache.get(off)
        off = int(self.rc.alloc(1)[0]) << self.cluster_bits
        self._grew()
        table = np.zeros(self.cluster_size // 8, dtype=np.uint64)
        self.cache.put_new(off, table)
        self.l1[li] = np.uint64(off | L.OFLAG_COPIED)
        self._l1_dirty = True
        return off, table

    def _groups(self, c0: int, c1: int):
        """(L1 index, table offset, table, first index, end index, first cluster) per L2
        table covering clusters [c0, c1), tables allocated where missing."""
        per = self.l2_entries
        c = c0
        while c < c1:
            li, i0 = divmod(c, per)
            i1 = min(per, i0 + (c1 - c))
            off, table = self._l2_for_write(li)
            yield li, off, table, i0, i1, c
            c += i1 - i0

    def _gather(self, groups) -> tuple[np.ndarray, np.ndarray | None]:
        descs, bmps = [], []
        for _, _, table, i0, i1, _ in groups:
            if self.extended:
                descs.append(table[2 * i0 : 2 * i1 : 2].copy())
                bmps.append(table[2 * i0 + 1 : 2 * i1 : 2].copy())
            else:
                descs.append(table[i0:i1].copy())
        desc = np.concatenate(descs) if len(descs) > 1 else descs[0]
        if not self.extended:
            return desc, None
        return desc, np.concatenate(bmps) if len(bmps) > 1 else bmps[0]

    def _scatter(self, groups, desc: np.ndarray, bmp: np.ndarray | None) -> None:
        pos = 0
        for _, off, table, i0, i1, _ in groups:
            n = i1 - i0
            if bmp is not None:
                table[2 * i0 : 2 * i1 : 2] = desc[pos : pos + n]
                table[2 * i0 + 1 : 2 * i1 : 2] = bmp[pos : pos + n]
            else:
                table[i0:i1] = desc[pos : pos + n]
            self.cache.mark_dirty(off, table)
            pos += n

    def _release(self, desc: np.ndarray) -> None:
        """Drop the host references of entries being replaced."""
        if self.external or not desc.any():  # fresh clusters, the common case: nothing to drop
            return
        comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
        off = desc & np.uint64(L.OFFSET_MASK)
        std = ~comp & (off != 0)
        idx = [(off[std] >> np.uint64(self.cluster_bits)).astype(np.int64)]
        if comp.any():
            coff, nbytes = self._compressed_spans(desc[comp])
            first = (coff >> np.uint64(self.cluster_bits)).astype(np.int64)
            last = ((coff + nbytes - np.uint64(1)) >> np.uint64(self.cluster_bits)).astype(np.int64)
            # the descriptor's sector rounding never reaches past the last used cluster
            for j in range(int((last - first).max()) + 1):
                idx.append(first[first + j <= last] + j)
        freed = self.rc.decref(np.concatenate(idx))
        cursor = self._cz_pos
        if cursor is not None and np.any(freed == (cursor - 1) >> self.cluster_bits):
            self._cz_pos = None  # its cluster may be reused for anything now

    # -- writing ----------------------------------------------------------------------
    def _write(self, offset: int, data: memoryview) -> None:
        self._begin()
        cb, cs, ub, unit = self.cluster_bits, self.cluster_size, self.unit_bits, self.unit
        end = offset + len(data)
        c0, c1 = offset >> cb, -(-end >> cb)
        groups = list(self._groups(c0, c1))
        desc, bmp = self._gather(groups)
        off = desc & np.uint64(L.OFFSET_MASK)
        comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
        if self.external:
            inplace = ~comp & ((off != 0) | ((desc & np.uint64(L.OFLAG_COPIED)) != 0))
        else:
            inplace = ~comp & (off != 0) & ((desc & np.uint64(L.OFLAG_COPIED)) != 0)
        s = self._edge(offset, 0, desc, bmp, inplace, down=True)
        e = self._edge(end, len(desc) - 1, desc, bmp, inplace, down=False)
        if s != offset or e != end:
            buf = bytearray(e - s)
            mv = memoryview(buf)
            if s < offset:
                self._read_mapped(s, mv[: offset - s], self.l1)
            if end < e:
                self._read_mapped(end, mv[end - s :], self.l1)
            mv[offset - s : end - s] = data
            data = mv
        need = ~inplace
        host = off.copy()
        if need.any():
            if self.external:
                host[need] = (np.arange(c0, c1, dtype=np.uint64) << np.uint64(cb))[need]
            else:
                new = self.rc.alloc(int(need.sum()))
                self._grew()
                host[need] = new.astype(np.uint64) << np.uint64(cb)
                self._release(desc[need])
        # one pwrite per run of host-contiguous clusters
        hc = (host >> np.uint64(cb)).astype(np.int64)
        breaks = np.flatnonzero(np.diff(hc) != 1) + 1
        starts = [0, *breaks.tolist()]
        stops = [*breaks.tolist(), len(hc)]
        fd = self._data_out() if self.external else self.fd
        for ka, kb in zip(starts, stops):
            gs = max(s, (c0 + ka) << cb)
            ge = min(e, (c0 + kb) << cb)
            self._pwrite(fd, data[gs - s : ge - s], int(host[ka]) + gs - ((c0 + ka) << cb))
        new_desc = host | np.uint64(L.OFLAG_COPIED)
        new_bmp = None
        if bmp is not None:
            first = np.arange(c0, c1, dtype=np.int64) << cb
            lo = (np.clip(s - first, 0, cs) >> ub).astype(np.uint64)
            hi = (-(-np.clip(e - first, 0, cs) // unit)).astype(np.uint64)
            one = np.uint64(1)
            mask = ((one << hi) - one) & ~((one << lo) - one)
            alloc = (bmp & np.uint64(L.ALL_SUBCLUSTERS)) | mask
            zero = (bmp >> np.uint64(32)) & ~mask
            new_bmp = alloc | (zero << np.uint64(32))
        self._scatter(groups, new_desc, new_bmp)

    def _edge(
        self,
        pos: int,
        k: int,
        desc: np.ndarray,
        bmp: np.ndarray | None,
        inplace: np.ndarray,
        down: bool,
    ) -> int:
        """Where a write reaching `pos` must really start (down) or end: a new host
        cluster is filled whole, a subcluster being allocated is filled whole."""
        cs, unit = self.cluster_size, self.unit
        if pos % cs == 0:
            return pos
        cluster_edge = pos - pos % cs if down else pos - pos % cs + cs
        unit_edge = pos - pos % unit if down else -(-pos // unit) * unit
        if bmp is None:
            # a preallocated zero cluster keeps stale bytes: it is filled whole as well
            direct = inplace[k] and not int(desc[k]) & L.OFLAG_ZERO
            return pos if direct else cluster_edge
        d = int(desc[k])
        if inplace[k]:
            if unit_edge == pos:
                return pos
            sub = (pos % cs) // unit
            allocated = int(bmp[k]) >> sub & 1
            return pos if allocated else unit_edge
        cow = d & L.OFLAG_COMPRESSED or (d & L.OFFSET_MASK and not self.external)
        return cluster_edge if cow else unit_edge

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._begin()
        g = self.unit
        end = offset + n
        a, b = -(-offset // g) * g, end - end % g
        if a >= b:
            self._zero_partial(offset, end)
            return
        if offset < a:
            self._zero_partial(offset, a)
        if b < end:
            self._zero_partial(b, end)
        back = self.backing is not None
        if back and self.meta.version < 3:
            # version 2 has no zero flag: over a backing file only real zeros hide it
            for pos in range(a, b, len(_ZEROS)):
                self._write(pos, memoryview(_ZEROS)[: min(len(_ZEROS), b - pos)])
            return
        self._discard(a, b, zero=back)
        raw_data = self.external and self.meta.autoclear & L.AUTOCLEAR_DATA_FILE_RAW
        # a raw data file must read as the disk on its own
        if raw_data and not punch_hole(self._data_out(), a, b - a):
            for pos in range(a, b, len(_ZEROS)):
                pwrite_all(self._data_out(), memoryview(_ZEROS)[: min(len(_ZEROS), b - pos)], pos)

    def _zero_partial(self, s: int, e: int) -> None:
        if s < e and not self._reads_zero(s, e):
            self._write(s, memoryview(_ZEROS)[: e - s])

    def _reads_zero(self, s: int, e: int) -> bool:
        """True when [s, e) reads as zeros by metadata alone (no data to look at)."""
        cb = self.cluster_bits
        c0 = s >> cb
        kind, _, _ = self._classify(c0, -(-e >> cb))
        first = (s >> self.unit_bits) - (c0 << (cb - self.unit_bits))
        kind = kind[first : first + (-(-e >> self.unit_bits) - (s >> self.unit_bits))]
        from .image import UNALLOCATED, ZERO

        below_zero = self.backing is None or s >= self.backing.size
        return bool(np.all((kind == ZERO) | ((kind == UNALLOCATED) & below_zero)))

    def _discard(self, a: int, b: int, *, zero: bool) -> None:
        """Make units [a, b) read as zeros by metadata alone: the zero flag (zero=True),
        or unallocated. Host clusters no longer used are freed."""
        cb, cs, ub = self.cluster_bits, self.cluster_size, self.unit_bits
        c0, c1 = a >> cb, -(-b >> cb)
        if self.extended:
            # a compressed cluster partly covered becomes a normal cluster first
            for c in {c0, c1 - 1}:
                cs_, ce = max(a, c << cb), min(b, (c + 1) << cb)
                if ce - cs_ == cs:
                    continue
                d, _ = self._entries(c, c + 1)
                if int(d[0]) & L.OFLAG_COMPRESSED:
                    self._write(cs_, memoryview(_ZEROS)[: ce - cs_])
        per = self.l2_entries
        c = c0
        while c < c1:
            li, i0 = divmod(c, per)
            i1 = min(per, i0 + (c1 - c))
            cnext = c + (i1 - i0)
            if not zero and not int(self.l1[li]) & L.OFFSET_MASK:
                c = cnext  # unallocated already
                continue
            group = [(li, *self._l2_for_write(li), i0, i1, c)]
            desc, bmp = self._gather(group)
            if bmp is None:
                self._release(desc)
                desc[:] = np.uint64(L.OFLAG_ZERO if zero else 0)
            else:
                first = np.arange(c, cnext, dtype=np.int64) << cb
                lo = (np.clip(a - first, 0, cs) >> ub).astype(np.uint64)
                hi = (np.clip(b - first, 0, cs) >> ub).astype(np.uint64)
                one = np.uint64(1)
                mask = ((one << hi) - one) & ~((one << lo) - one)
                comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
                alloc = np.where(comp, np.uint64(0), bmp & np.uint64(L.ALL_SUBCLUSTERS) & ~mask)
                zbits = (bmp >> np.uint64(32)) & ~mask
                if zero:
                    zbits |= mask
                # a host cluster with no allocated subcluster left is given back
                drop = (alloc == 0) & ((desc & np.uint64(L.OFFSET_MASK)) != 0) | comp
                self._release(desc[drop])
                desc[drop] = np.uint64(0)
                bmp[:] = alloc | (zbits << np.uint64(32))
            self._scatter(group, desc, bmp)
            c = cnext

    # -- compressed clusters ------------------------------------------------------------
    def encode(self, offset: int, data: bytes | memoryview) -> Any:
        cs = self.cluster_size
        if not self.compress or offset % cs:
            return data
        mv = memoryview(data)
        blobs: list[bytes | None] = []
        for pos in range(0, len(mv), cs):
            chunk = mv[pos : pos + cs]
            if len(chunk) < cs:
                chunk = memoryview(bytes(chunk) + bytes(cs - len(chunk)))
            blob = compression.compress(self.ctype, chunk)
            # qemu stores a compressed cluster even when it grew; we never do
            blobs.append(blob if len(blob) < cs else None)
        return Compressed(data, blobs)

    def write_encoded(self, offset: int, encoded: Any) -> None:
        if not isinstance(encoded, Compressed):
            self.write(offset, encoded)
            return
        self._check_writable()
        data = memoryview(encoded.data).cast("B")
        self._check_range(offset, len(data))
        cs, cb = self.cluster_size, self.cluster_bits
        flags = np.array([b is not None for b in encoded.blobs], dtype=np.uint8)
        for first, count, packed in runs(flags):
            s = offset + first * cs
            e = min(offset + (first + count) * cs, offset + len(data))
            if packed:
                self._write_compressed(s >> cb, encoded.blobs[first : first + count])
            else:
                self.write(s, data[s - offset : e - offset])

    def _write_compressed(self, c0: int, blobs: list) -> None:
        self._begin()
        c1 = c0 + len(blobs)
        groups = list(self._groups(c0, c1))
        old, bmp = self._gather(groups)
        lens = np.array([len(b) for b in blobs], dtype=np.int64)
        pos = self._place_compressed(lens)
        ends = pos + lens
        breaks = np.flatnonzero(pos[1:] != ends[:-1]) + 1
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(blobs)]):
            self._pwrite(self.fd, b"".join(blobs[a:b]), int(pos[a]))
        nsect = ((ends - 1) >> 9) - (pos >> 9)
        desc = (
            np.uint64(L.OFLAG_COMPRESSED)
            | (nsect.astype(np.uint64) << np.uint64(self.cz_off_bits))
            | pos.astype(np.uint64)
        )
        self._release(old)
        self._scatter(groups, desc, None if bmp is None else np.zeros_like(bmp))

    def _place_compressed(self, lens: np.ndarray) -> np.ndarray:
        """Host offsets for compressed clusters, packed after each other at the end of
        the file; a shared host cluster never counts more references than refcount_bits
        can hold."""
        cs, cb = self.cluster_size, self.cluster_bits
        rc = self.rc
        pos = self._cz_pos
        if pos is None or pos % cs == 0 or (pos >> cb) != rc.end - 1:
            pos = rc.end << cb
        starts = pos + np.concatenate(([0], np.cumsum(lens)[:-1]))
        ends = starts + lens
        first, last = starts >> cb, (ends - 1) >> cb
        idx = [first]
        for j in range(1, int((last - first).max()) + 1):
            idx.append(first[first + j <= last] + j)
        refs = np.concatenate(idx)
        base = int(first[0])
        need = np.bincount(refs - base)
        if pos % cs:  # the first cluster already holds earlier compressed clusters
            need[0] += int(rc.counts[base])
        if int(need.max()) <= rc.max:
            rc.append(int(last[-1]) + 1 - rc.end)
            rc.incref(refs)
            self._cz_pos = int(ends[-1])
            self._grew()
            return starts
        # narrow refcounts: place one at a time, starting a new cluster when one is full
        out = np.empty(len(lens), dtype=np.int64)
        for i, n in enumerate(lens.tolist()):
            p = self._cz_pos
            if p is None or p % cs == 0 or (p >> cb) != rc.end - 1 or rc.counts[p >> cb] >= rc.max:
                p = rc.end << cb
            lastc = (p + n - 1) >> cb
            rc.append(lastc + 1 - rc.end)
            rc.incref(np.arange(p >> cb, lastc + 1, dtype=np.int64))
            out[i] = p
            self._cz_pos = p + n
        self._grew()
        return out

    # -- resizing -----------------------------------------------------------------------
    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk (qemu-img resize); new space reads as zeros."""
        self._check_writable()
        if new_size < 0:
            raise FormatError(f"qcow2: invalid size {new_size}")
        new_size = -(-new_size // L.SECTOR) * L.SECTOR
        old = self.size
        if new_size == old:
            return
        self._begin()
        cb = self.cluster_bits
        span = self.l2_entries << cb
        if new_size < old:
            first = -(-new_size >> cb)
            last = -(-old >> cb)
            if first < last:
                self._discard(first << cb, last << cb, zero=False)
            # tables wholly past the end are given back
            for li in range(-(-new_size // span), len(self.l1)):
                off = int(self.l1[li]) & L.OFFSET_MASK
                if off:
                    self.cache.discard(off)
                    self.rc.decref(np.array([off >> cb], dtype=np.int64))
                    self.l1[li] = np.uint64(0)
                    self._l1_dirty = True
            self.size = self.meta.size = self.meta.header.size = new_size
        else:
            needed = -(-new_size // span)
            if needed > len(self.l1):
                self._grow_l1(needed)
            self.size = self.meta.size = self.meta.header.size = new_size
            if self.external and file_size(self._data_out()) < new_size:
                os.ftruncate(self._data_out(), new_size)  # as qemu grows the data file
            # bytes past the old end must read as zeros, whatever a backing file holds
            stop = min(new_size, -(-old >> cb) << cb)
            if self.backing is not None:
                stop = min(new_size, max(stop, self.backing.size))
            if stop > old:
                self._write_zeroes(old, stop - old)
        self._header_dirty = True

    def _grow_l1(self, entries: int) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        if entries * 8 > L.MAX_L1_BYTES:
            raise UnsupportedFeature("qcow2: the L1 table would exceed 32 MiB")
        hdr = self.meta.header
        old_clusters = -(-hdr.l1_size * 8 // cs)
        clusters = -(-entries * 8 // cs)
        start = self.rc.alloc_contiguous(clusters)
        self._grew()
        grown = np.zeros(entries, dtype=np.uint64)
        grown[: len(self.l1)] = self.l1
        old_off = hdr.l1_table_offset
        self.l1 = grown
        hdr.l1_table_offset = start << cb
        hdr.l1_size = entries
        pwrite_all(self.fd, bytes(clusters * cs), start << cb)
        self._l1_dirty = True
        if old_clusters:
            self.rc.release(old_off >> cb, old_clusters)

    # -- preallocation ------------------------------------------------------------------
    def preallocate_metadata(self) -> None:
        """Every L2 table and every data cluster allocated up front (host clusters stay
        sparse holes until written); with a backing file only extended L2 entries can do
        this without hiding it, so the clusters are allocated but marked unallocated."""
        self._begin()
        self.appends = False
        cb, cs = self.cluster_bits, self.cluster_size
        per = self.l2_entries
        nclusters = -(-self.size >> cb)
        ntables = -(-nclusters // per)
        if ntables == 0:
            return
        tables = self.rc.alloc(ntables)
        self._grew()
        for li in range(ntables):
            c, cend = li * per, min(nclusters, (li + 1) * per)
            if self.external:
                host = np.arange(c, cend, dtype=np.uint64) << np.uint64(cb)
            else:
                host = self.rc.alloc(cend - c).astype(np.uint64) << np.uint64(cb)
            desc = host | np.uint64(L.OFLAG_COPIED)
            table = np.zeros(cs // 8, dtype=np.uint64)
            if self.extended:
                table[0 : 2 * len(desc) : 2] = desc
                if self.backing is None:
                    table[1 : 2 * len(desc) : 2] = np.uint64(L.ALL_SUBCLUSTERS)
            else:
                table[: len(desc)] = desc
            off = int(tables[li]) << cb
            self._store_l2(off, table)
            self.l1[li] = np.uint64(off | L.OFLAG_COPIED)
        self._l1_dirty = True
        self._grew()

    # -- flushing -----------------------------------------------------------------------
    def _sync_refcount_structures(self) -> None:
        """Give every host cluster a refcount block, growing the table as needed; the
        blocks and table are themselves clusters, so this runs to a fixed point."""
        rc, cs, cb = self.rc, self.cluster_size, self.cluster_bits
        while True:
            nb = rc.blocks_needed()
            if nb > len(self.reftable):
                entries = max(nb + nb // 2 + 1, 2 * len(self.reftable))
                clusters = -(-entries * 8 // cs)
                if clusters * cs > L.MAX_REFTABLE_BYTES:
                    raise UnsupportedFeature("qcow2: the refcount table would exceed 8 MiB")
                start = rc.alloc_contiguous(clusters)
                grown = np.zeros(clusters * cs // 8, dtype=np.uint64)
                grown[: len(self.reftable)] = self.reftable
                old_off = self.reftable_offset
                old_clusters = -(-len(self.reftable) * 8 // cs)
                self.reftable = grown
                self.reftable_offset = start << cb
                self.meta.header.refcount_table_offset = self.reftable_offset
                self.meta.header.refcount_table_clusters = clusters
                rc.release(old_off >> cb, old_clusters)
                self._reftable_dirty = self._header_dirty = True
                continue
            missing = np.flatnonzero(self.reftable[:nb] == 0)
            if len(missing):
                blocks = rc.alloc(len(missing))
                self.reftable[missing] = blocks.astype(np.uint64) << np.uint64(cb)
                rc.dirty.update(missing.tolist())
                self._reftable_dirty = True
                continue
            break
        self._grew()

    def flush(self) -> None:
        if self.closed or not self.writable:
            return
        if self._started:
            cb = self.cluster_bits
            self._sync_refcount_structures()
            # the file covers every allocated cluster (a compressed tail may end mid-cluster)
            if file_size(self.fd) < self.rc.end << cb:
                os.ftruncate(self.fd, self.rc.end << cb)
            for b in sorted(self.rc.dirty):
                pwrite_all(self.fd, self.rc.block(b), int(self.reftable[b]))
            self.rc.dirty.clear()
            if self._reftable_dirty:
                pwrite_all(self.fd, self.reftable.astype(">u8").tobytes(), self.reftable_offset)
                self._write_header()  # the table may have moved
                self._reftable_dirty = False
            self.cache.flush()
            if self._l1_dirty:
                hdr = self.meta.header
                pwrite_all(self.fd, self.l1.astype(">u8").tobytes(), hdr.l1_table_offset)
                self._l1_dirty = False
            self.meta.incompatible &= ~L.INCOMPAT_DIRTY
            if self.meta.version >= 3:
                self.meta.header.incompatible_features = self.meta.incompatible
            self._write_header()
            self.meta.file_size = max(self.meta.file_size, file_size(self.fd))
            self._started = False
        self._sync(self.fd, self.data_fd)


# ---------------------------------------------------------------------------------------
# creating

_OPTIONS = (
    "compat",
    "cluster_size",
    "refcount_bits",
    "compression_type",
    "preallocation",
    "backing_file",
    "backing_fmt",
    "compress",
    "extended_l2",
    "lazy_refcounts",
    "data_file",
    "data_file_raw",
)


def create(path: str, size: int, *, final_path: str | None = None, **options: Any) -> Qcow2Image:
    """Create a qcow2 image (qemu-img create -f qcow2 -o ... semantics)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if any(k.startswith("encrypt") for k in unknown):
        raise UnsupportedFeature("qcow2: creating encrypted images is not supported")
    if unknown:
        raise FormatError(
            f"qcow2: unknown options {', '.join(unknown)} (known: {', '.join(_OPTIONS)})"
        )
    compat = str(options.get("compat", "1.1"))
    if compat in ("1.1", "v3", "3"):
        version = 3
    elif compat in ("0.10", "v2", "2"):
        version = 2
    else:
        raise FormatError(f"qcow2: invalid compat {compat!r} (0.10 or 1.1)")
    cs = parse_size(options.get("cluster_size", 65536), "cluster_size")
    if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
        raise FormatError(f"qcow2: cluster size {cs} must be a power of two in 512..2M")
    cb = cs.bit_length() - 1
    refcount_bits = int(parse_size(options.get("refcount_bits", 16), "refcount_bits"))
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise FormatError(f"qcow2: refcount_bits {refcount_bits} must be a power of two <= 64")
    ctype_name = parse_choice(
        str(options.get("compression_type", "zlib")), "compression_type", ("zlib", "zstd")
    )
    ctype = L.COMPRESSION_ZSTD if ctype_name == "zstd" else L.COMPRESSION_ZLIB
    prealloc = parse_choice(
        str(options.get("preallocation", "off")), "preallocation", ("off", "metadata")
    )
    compress = parse_bool(options.get("compress", False), "compress")
    extended = parse_bool(options.get("extended_l2", False), "extended_l2")
    lazy = parse_bool(options.get("lazy_refcounts", False), "lazy_refcounts")
    backing_file = options.get("backing_file") or None
    backing_fmt = options.get("backing_fmt") or None
    data_file = options.get("data_file") or None
    data_raw = parse_bool(options.get("data_file_raw", False), "data_file_raw")
    if version == 2:
        for what, bad in (
            ("refcount_bits other than 16", refcount_bits != 16),
            ("zstd compression", ctype != L.COMPRESSION_ZLIB),
            ("extended_l2", extended),
            ("lazy_refcounts", lazy),
            ("data_file", data_file is not None),
        ):
            if bad:
                raise FormatError(f"qcow2: {what} needs compat=1.1")
    if extended and cs < 1 << L.MIN_EXTENDED_L2_CLUSTER_BITS:
        raise FormatError("qcow2: extended_l2 needs a cluster size of at least 16k")
    if data_raw and data_file is None:
        raise FormatError("qcow2: data_file_raw needs data_file")
    if data_file is not None and (compress or (backing_file and data_raw)):
        raise FormatError(
            "qcow2: an external data file cannot hold compressed clusters, and a raw one "
            "cannot have a backing file"
        )
    if prealloc == "metadata" and backing_file and not extended:
        raise FormatError("qcow2: preallocation with a backing file needs extended_l2=on")
    for what, value in (("backing_file", backing_file), ("backing_fmt", backing_fmt)):
        if value is not None and len(os.fsencode(value)) > L.MAX_BACKING_NAME:
            raise FormatError(f"qcow2: {what} is longer than 1023 bytes")
    size = -(-size // L.SECTOR) * L.SECTOR

    incompat = 0
    if ctype != L.COMPRESSION_ZLIB:
        incompat |= L.INCOMPAT_COMPRESSION
    if extended:
        incompat |= L.INCOMPAT_EXTL2
    if data_file is not None:
        incompat |= L.INCOMPAT_DATA_FILE
    header_length = L.HEADER_V3_LENGTH if version == 3 else L.HEADER_V2_LENGTH

    # header cluster: header, extensions, end marker, backing file name
    exts = b""
    if backing_fmt:
        exts += _extension(L.EXT_BACKING_FORMAT, os.fsencode(backing_fmt))
    if data_file is not None:
        exts += _extension(L.EXT_DATA_FILE, os.fsencode(data_file))
    table = b"".join(
        L.FeatureNameEntry.build({"type": t, "bit": b, "name": n.encode().ljust(46, b"\0")})
        for t, b, n in L.FEATURE_NAMES
    )
    name = os.fsencode(backing_file) if backing_file else b""
    if version == 3 and header_length + len(exts) + 8 + len(table) + 8 + len(name) <= cs:
        exts += _extension(L.EXT_FEATURE_TABLE, table)  # for tools that do not know a bit
    exts += b"\0" * 8
    backing_offset = header_length + len(exts) if name else 0
    if header_length + len(exts) + len(name) > cs:
        raise FormatError(f"qcow2: header, extensions and backing name do not fit in {cs} bytes")

    # layout like qemu's: header, refcount table, refcount blocks, L1 table
    l2_entries = cs // (16 if extended else 8)
    l1_size = -(-size // (l2_entries * cs))
    if l1_size * 8 > L.MAX_L1_BYTES:
        raise FormatError(f"qcow2: {size} bytes need an L1 table over 32 MiB; use bigger clusters")
    l1_clusters = -(-l1_size * 8 // cs)
    order = refcount_bits.bit_length() - 1
    be = cs * 8 // refcount_bits
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        blocks = -(-total // be)
        tclusters = -(-blocks * 8 // cs)
        if (blocks, tclusters) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = blocks, tclusters
    rt_off = cs
    rb_off = rt_off + rt_clusters * cs
    l1_off = rb_off + rb_count * cs
    total = 1 + rt_clusters + rb_count + l1_clusters

    hdr = {
        "version": version,
        "backing_file_offset": backing_offset,
        "backing_file_size": len(name),
        "cluster_bits": cb,
        "size": size,
        "crypt_method": L.CRYPT_NONE,
        "l1_size": l1_size,
        "l1_table_offset": l1_off,
        "refcount_table_offset": rt_off,
        "refcount_table_clusters": rt_clusters,
        "nb_snapshots": 0,
        "snapshots_offset": 0,
        "incompatible_features": incompat if version == 3 else None,
        "compatible_features": (L.COMPAT_LAZY_REFCOUNTS if lazy else 0) if version == 3 else None,
        "autoclear_features": (L.AUTOCLEAR_DATA_FILE_RAW if data_raw else 0)
        if version == 3
        else None,
        "refcount_order": order if version == 3 else None,
        "header_length": header_length if version == 3 else None,
        "compression_type": ctype if version == 3 else None,
        "padding": bytes(7) if version == 3 else None,
    }
    head = bytearray(cs)
    raw = L.Header.build(hdr) + exts
    head[: len(raw)] = raw
    if name:
        head[backing_offset : backing_offset + len(name)] = name
    reftable = np.zeros(rt_clusters * cs // 8, dtype=np.uint64)
    reftable[:rb_count] = rt_off + rt_clusters * cs + np.arange(rb_count, dtype=np.uint64) * cs
    counts = np.zeros(rb_count * be, dtype=dtype_for(order))
    counts[:total] = 1
    from .refcounts import pack

    blob = (
        bytes(head)
        + reftable.astype(">u8").tobytes()
        + pack(counts, order)
        + bytes(l1_clusters * cs)
    )

    data_path = None
    if data_file is not None:
        base = os.path.dirname(os.path.abspath(path))
        data_path = os.path.join(base, data_file)
        try:
            dfd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise FormatError(f"qcow2: data file {data_path} exists; remove it first") from None
        try:
            os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            pwrite_all(fd, blob, 0)
        finally:
            os.close(fd)
        dirs = [os.path.dirname(os.path.realpath(path))]
        if backing_file:
            bpath = os.path.join(os.path.dirname(os.path.abspath(path)), backing_file)
            dirs.append(os.path.dirname(os.path.realpath(bpath)))
        if data_path:
            dirs.append(os.path.dirname(os.path.realpath(data_path)))
        img = open_writer(path, BackingPolicy(dirs=tuple(dirs)))
    except BaseException:
        os.unlink(path)
        if data_path:
            os.unlink(data_path)
        raise
    assert isinstance(img, Qcow2Writer)
    img.compress = img.encodes = compress
    if prealloc == "metadata":
        img.preallocate_metadata()
    return img


def _extension(etype: int, data: bytes) -> bytes:
    return L.HeaderExtension.build(
        {"type": etype, "length": len(data), "data": data, "padding": bytes(-len(data) % 8)}
    )

"""ESX's own sparse extents: vmfsSparse ("COWD", spec "ESX Server Sparse Extents") and
seSparse (ESXi 6.5+ snapshots; not in the 5.0 spec, read to the layout qemu reads). Both
are read-only, as in qemu."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from construct import ConstructError

from ..errors import CorruptImage, UnsupportedFeature
from ..extents import runs
from ..fileio import file_size, pread_exact
from . import descriptor as dd
from . import layout as L
from .extent import (
    DATA,
    MAP_WINDOW,
    UNALLOCATED,
    ZERO,
    ExtentFile,
    Under,
    file_runs,
    gte_states,
    open_fd,
    read_runs,
)


def open_cowd(path: str, fd: int, length: int | None) -> CowdExtent:
    """A COWD extent on an open file (the caller closes `fd` if this raises)."""
    raw = pread_exact(fd, L.COWDisk_Header.sizeof(), 0, f"vmdk: {path}")
    try:
        h = L.COWDisk_Header.parse(raw)
    except ConstructError as exc:
        raise CorruptImage(f"vmdk: {path}: not a COWD extent (bad magic)") from exc
    if h.version != 1 or not (1 <= h.grainSize <= 2048) or h.grainSize & (h.grainSize - 1):
        raise CorruptImage(f"vmdk: {path}: COWD header is invalid")
    size = h.numSectors * L.SECTOR
    return CowdExtent(path, fd, h, length=size if length is None else length)


class CowdExtent(ExtentFile):
    """ESX's vmfsSparse extent (COWD): one level of 4096-entry grain tables."""

    type = "VMFSSPARSE"

    def __init__(self, path: str, fd: int, header: Any, *, length: int) -> None:
        super().__init__(path, length, writable=False)
        self.fd = fd
        self.grain_sectors = header.grainSize
        self.grain = header.grainSize * L.SECTOR
        self.cluster_size = self.grain
        fsize = file_size(fd)
        need = -(-header.numSectors // header.grainSize)
        gts = -(-need // L.COWD_GTES_PER_GT)
        if header.numGDEntries < gts or header.gdOffset * L.SECTOR + gts * 4 > fsize:
            raise CorruptImage(f"vmdk: {path}: COWD grain directory is out of range")
        gd = np.frombuffer(
            pread_exact(fd, gts * 4, header.gdOffset * L.SECTOR, f"vmdk: {path}"), "<u4"
        )
        table_bytes = L.COWD_GTES_PER_GT * 4
        if np.any(gd.astype(np.uint64) * L.SECTOR + table_bytes > fsize):
            raise CorruptImage(f"vmdk: {path}: COWD grain directory points past the file")
        # ESX sparse files are small (delta disks): the whole map fits in memory
        gtes = np.zeros(gts * L.COWD_GTES_PER_GT, np.int64)
        for k in np.flatnonzero(gd).tolist():
            raw = pread_exact(fd, table_bytes, int(gd[k]) * L.SECTOR, f"vmdk: {path}")
            gtes[k * L.COWD_GTES_PER_GT : (k + 1) * L.COWD_GTES_PER_GT] = np.frombuffer(raw, "<u4")
        if np.any((gtes > 1) & (gtes * L.SECTOR + self.grain > fsize)):
            raise CorruptImage(f"vmdk: {path}: COWD grain table points past the end of the file")
        self.gtes = gtes[:need]

    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        g0, g1 = start // self.grain, -(-end // self.grain)
        st = gte_states(self.gtes[g0:g1])
        for first, count, value in runs(st):
            s = max((g0 + first) * self.grain, start)
            e = min((g0 + first + count) * self.grain, end)
            yield s, e - s, value

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        g0, g1 = offset // self.grain, -(-(offset + len(buf)) // self.grain)
        gtes = self.gtes[g0:g1]
        runs_ = file_runs(gte_states(gtes), gtes * L.SECTOR, self.grain, g0, offset, len(buf))
        read_runs(self.fd, runs_, offset, buf, under)

    def close(self) -> None:
        os.close(self.fd)


class SeSparseExtent(ExtentFile):
    """ESXi's seSparse extent (read-only, as in qemu): 64-bit grain directory and table
    entries, 4 KiB grains, tables of 4096 entries in their own area of the file."""

    type = "SESPARSE"

    def __init__(self, path: str, fd: int, header: Any, *, length: int) -> None:
        super().__init__(path, length, writable=False)
        self.fd = fd
        self.header = header
        self.grain = L.SESPARSE_GRAIN_SECTORS * L.SECTOR
        self.cluster_size = self.grain
        self.per_gt = L.SESPARSE_GT_SECTORS * L.SECTOR // 8
        self.file_end = file_size(fd)
        self.grains = -(-header.capacity // L.SESPARSE_GRAIN_SECTORS)
        gts = -(-self.grains // self.per_gt)
        where = f"vmdk: {path}"
        gd_at = header.grain_dir_offset * L.SECTOR
        if header.grain_dir_size * L.SECTOR < gts * 8 or gd_at + gts * 8 > self.file_end:
            raise CorruptImage(f"{where}: seSparse grain directory is out of range")
        gd = np.frombuffer(pread_exact(fd, gts * 8, gd_at, where), "<u8").astype(np.uint64)
        used = gd != 0
        if np.any(used & ((gd >> np.uint64(32)) != L.SESPARSE_GD_ALLOCATED)):
            raise CorruptImage(f"{where}: seSparse grain directory entry of an unknown kind")
        index = (gd & np.uint64(0xFFFF_FFFF)).astype(np.int64)
        offs = (header.grain_tables_offset + index * L.SESPARSE_GT_SECTORS) * L.SECTOR
        if np.any(used & (offs + self.per_gt * 8 > self.file_end)):
            raise CorruptImage(f"{where}: seSparse grain table lies past the end of the file")
        self.table_offsets = np.where(used, offs, 0)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _table(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Grain states and file offsets of table k, decoded once."""
        got = self._tables.get(k)
        if got is not None:
            return got
        with self._lock:
            at = int(self.table_offsets[k])
            if at == 0:
                decoded = (np.zeros(self.per_gt, np.uint8), np.zeros(self.per_gt, np.int64))
            else:
                raw = pread_exact(self.fd, self.per_gt * 8, at, f"vmdk: {self.path}")
                decoded = self._decode(np.frombuffer(raw, "<u8").astype(np.uint64), k)
            self._tables[k] = decoded
            return decoded

    def _decode(self, e: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kind = (e >> np.uint64(60)).astype(np.uint8)
        st = np.full(len(e), UNALLOCATED, np.uint8)
        st[(kind == L.SESPARSE_UNMAPPED) | (kind == L.SESPARSE_ZERO)] = ZERO
        st[kind == L.SESPARSE_ALLOCATED] = DATA
        bad = ((kind == L.SESPARSE_UNALLOCATED) & (e != 0)) | (kind > L.SESPARSE_ALLOCATED)
        # the grain number is stored with its top 12 bits above the low 48
        index = ((e & np.uint64(0x0FFF_0000_0000_0000)) >> np.uint64(48)) | (
            (e & np.uint64(0x0000_FFFF_FFFF_FFFF)) << np.uint64(12)
        )
        index = np.where(st == DATA, index, 0).astype(np.int64)
        foff = (self.header.grains_offset + index * L.SESPARSE_GRAIN_SECTORS) * L.SECTOR
        bad |= (st == DATA) & ((index >= 1 << 40) | (foff + self.grain > self.file_end))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise CorruptImage(
                f"vmdk: {self.path}: seSparse grain table {k} entry {j} ({int(e[j]):#x}) is "
                "invalid or points past the end of the file"
            )
        return st, np.where(st == DATA, foff, 0)

    def _entries(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        k0, k1 = g0 // self.per_gt, (g1 - 1) // self.per_gt
        tables = [self._table(k) for k in range(k0, k1 + 1)]
        st = np.concatenate([t[0] for t in tables])
        foff = np.concatenate([t[1] for t in tables])
        base = k0 * self.per_gt
        return st[g0 - base : g1 - base], foff[g0 - base : g1 - base]

    def states(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        g = start // self.grain
        last = -(-end // self.grain)
        while g < last:
            stop = min(last, g + MAP_WINDOW)
            st, _ = self._entries(g, stop)
            for first, count, value in runs(st):
                s = max((g + first) * self.grain, start)
                e = min((g + first + count) * self.grain, end)
                if s < e:
                    yield s, e - s, value
            g = stop

    def read(self, offset: int, buf: memoryview, under: Under) -> None:
        g0, g1 = offset // self.grain, -(-(offset + len(buf)) // self.grain)
        st, foff = self._entries(g0, g1)
        read_runs(
            self.fd, file_runs(st, foff, self.grain, g0, offset, len(buf)), offset, buf, under
        )

    def close(self) -> None:
        os.close(self.fd)


def open_sesparse_file(path: str, length: int | None = None) -> SeSparseExtent:
    fd = open_fd(path, False)
    try:
        where = f"vmdk: {path}"
        try:
            h = L.SESparseConstHeader.parse(pread_exact(fd, L.SECTOR, 0, where))
        except ConstructError as exc:
            raise CorruptImage(f"{where}: not a seSparse extent (bad magic)") from exc
        if h.version != L.SESPARSE_VERSION:
            raise UnsupportedFeature(f"{where}: seSparse version {h.version:#x}")
        if h.grain_size != L.SESPARSE_GRAIN_SECTORS or h.grain_table_size != L.SESPARSE_GT_SECTORS:
            raise UnsupportedFeature(f"{where}: seSparse grain or table size is not ESXi's")
        if h.flags or any(h.reserved):
            raise UnsupportedFeature(f"{where}: seSparse flags {h.flags:#x}")
        if h.capacity > dd.MAX_SECTORS:
            raise CorruptImage(f"{where}: capacity of {h.capacity} sectors is out of range")
        try:
            vol = L.SESparseVolatileHeader.parse(
                pread_exact(fd, L.SECTOR, h.volatile_header_offset * L.SECTOR, where)
            )
        except ConstructError as exc:
            raise CorruptImage(f"{where}: seSparse volatile header is damaged") from exc
        if vol.replay_journal:
            raise UnsupportedFeature(
                f"{where}: seSparse journal needs replaying (power the VM on in ESXi first)"
            )
        capacity = h.capacity * L.SECTOR
        if length is not None and length > capacity:
            raise CorruptImage(f"{where}: descriptor gives the extent more than its capacity")
        return SeSparseExtent(path, fd, h, length=capacity if length is None else length)
    except BaseException:
        os.close(fd)
        raise

"""Host cluster reference counts: the packed on-disk widths, and the writer's in-memory
copy with its free space.

qcow2.txt "Host cluster management": refcount blocks hold `cluster_size * 8 /
refcount_bits` entries of 1 to 64 bits; sub-byte entries fill each byte from its least
significant bit. The writer keeps every count of the host file in one numpy array (its
size follows the host file, not the virtual disk) and writes back the blocks it changed.
"""

from __future__ import annotations

import bisect
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CorruptImage, FormatError
from ..fileio import file_size
from . import layout as L

if TYPE_CHECKING:
    from .image import Qcow2Image

#: problems listed per kind (by check and on the way); beyond this, summed up in one line
MAX_MESSAGES = 1000

_DTYPES = {
    0: np.uint8,
    1: np.uint8,
    2: np.uint8,
    3: np.uint8,
    4: np.uint16,
    5: np.uint32,
    6: np.uint64,
}
_BIG = {4: ">u2", 5: ">u4", 6: ">u8"}


def dtype_for(order: int) -> np.dtype:
    return np.dtype(_DTYPES[order])


def unpack(buf: bytes | memoryview, order: int) -> np.ndarray:
    """The counts a refcount block's bytes hold, in cluster order."""
    bits = 1 << order
    if bits >= 16:
        return np.frombuffer(buf, _BIG[order]).astype(_DTYPES[order])
    raw = np.frombuffer(buf, np.uint8)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)


def pack(counts: np.ndarray, order: int) -> bytes:
    bits = 1 << order
    if bits >= 16:
        return counts.astype(_BIG[order]).tobytes()
    if bits == 8:
        return counts.astype(np.uint8).tobytes()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = counts.astype(np.uint8).reshape(-1, per) << shifts
    return np.bitwise_or.reduce(vals, axis=1).astype(np.uint8).tobytes()


class Refcounts:
    """The writer's refcounts: one count per host cluster, free runs, dirty blocks."""

    def __init__(self, cluster_size: int, order: int, counts: np.ndarray, end: int) -> None:
        self.cluster_size = cluster_size
        self.order = order
        self.max = (1 << (1 << order)) - 1
        self.block_entries = cluster_size * 8 >> order
        self.counts = counts
        #: clusters [0, end) are the host file; allocation past it appends
        self.end = end
        self.dirty: set[int] = set()
        #: sorted [start, count] runs of clusters below `end` with a count of 0
        self.free: list[list[int]] = []
        self._ensure(end)
        zero = (self.counts[:end] == 0).astype(np.int8)
        if zero.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], zero, [0]))))
            self.free = [[s, e - s] for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist())]

    # -- capacity and dirtiness ---------------------------------------------------
    def _ensure(self, n: int) -> None:
        if n > len(self.counts):
            grown = np.zeros(max(n, 2 * len(self.counts), 1024), dtype=self.counts.dtype)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def _touch(self, first: int, last: int) -> None:
        """Mark the blocks covering clusters [first, last] dirty."""
        be = self.block_entries
        self.dirty.update(range(first // be, last // be + 1))

    def _touch_many(self, idx: np.ndarray) -> None:
        if len(idx):
            self.dirty.update(np.unique(idx // self.block_entries).tolist())

    def blocks_needed(self) -> int:
        return -(-self.end // self.block_entries)

    def block(self, b: int) -> bytes:
        be = self.block_entries
        self._ensure((b + 1) * be)
        return pack(self.counts[b * be : (b + 1) * be], self.order)

    # -- allocation ---------------------------------------------------------------
    def alloc(self, n: int) -> np.ndarray:
        """n clusters with a count of 1: reused free runs first, then the file's end."""
        parts: list[np.ndarray] = []
        want = n
        while want and self.free:
            run = self.free[0]
            take = min(want, run[1])
            parts.append(np.arange(run[0], run[0] + take, dtype=np.int64))
            run[0] += take
            run[1] -= take
            if run[1] == 0:
                self.free.pop(0)
            want -= take
        if want:
            parts.append(np.arange(self.end, self.end + want, dtype=np.int64))
            self._ensure(self.end + want)
            self.end += want
        idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.counts[idx] = 1
        if len(parts) == 1:
            self._touch(int(idx[0]), int(idx[-1]))
        else:
            self._touch_many(idx)
        return idx

    def alloc_contiguous(self, n: int) -> int:
        """n adjacent clusters (tables must be contiguous); first fit, else at the end."""
        for i, run in enumerate(self.free):
            if run[1] >= n:
                start = run[0]
                run[0] += n
                run[1] -= n
                if run[1] == 0:
                    self.free.pop(i)
                break
        else:
            start = self.end
            self._ensure(self.end + n)
            self.end += n
        self.counts[start : start + n] = 1
        self._touch(start, start + n - 1)
        return start

    def append(self, n: int) -> int:
        """n clusters at the end with a count of 0, for the caller to count."""
        start = self.end
        self._ensure(start + n)
        self.end += n
        return start

    # -- counting -----------------------------------------------------------------
    def incref(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        add = np.bincount(idx - idx.min()) if len(idx) > 1 else np.ones(1, dtype=np.int64)
        base = int(idx.min())
        where = np.flatnonzero(add) + base
        new = self.counts[where].astype(np.uint64) + add[add != 0].astype(np.uint64)
        if (new > self.max).any():
            raise FormatError(f"qcow2: refcount overflow (more than {self.max} references)")
        self.counts[where] = new.astype(self.counts.dtype)
        self._touch_many(where)

    def decref(self, idx: np.ndarray) -> np.ndarray:
        """Drop one reference per index (repeats allowed); returns clusters now free."""
        if not len(idx):
            return idx
        uniq, times = np.unique(idx, return_counts=True)
        if (uniq >= self.end).any() or (uniq < 0).any():
            raise CorruptImage("qcow2: freeing a cluster outside the file")
        cur = self.counts[uniq].astype(np.int64)
        if (cur < times).any():
            bad = int(uniq[np.flatnonzero(cur < times)[0]])
            raise CorruptImage(f"qcow2: refcount of cluster {bad} would drop below zero")
        self.counts[uniq] = (cur - times).astype(self.counts.dtype)
        self._touch_many(uniq)
        freed = uniq[cur == times]
        self.add_free(freed)
        return freed

    def add_free(self, idx: np.ndarray) -> None:
        """Record clusters whose count is now 0 as reusable (sorted unique input)."""
        if not len(idx):
            return
        idx = np.asarray(idx, dtype=np.int64)
        edges = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(idx)]))
        for s, e in zip(idx[starts].tolist(), (idx[ends - 1] + 1).tolist()):
            self._add_run(s, e - s)

    def _add_run(self, start: int, count: int) -> None:
        i = bisect.bisect_left(self.free, [start, 0])
        self.free.insert(i, [start, count])
        # coalesce with neighbours
        if i + 1 < len(self.free) and self.free[i][0] + self.free[i][1] == self.free[i + 1][0]:
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == self.free[i][0]:
            self.free[i - 1][1] += self.free.pop(i)[1]

    def release(self, start: int, count: int) -> None:
        """Set clusters [start, start+count) to 0 (a table that moved) and reuse them."""
        self.counts[start : start + count] = 0
        self._touch(start, start + count - 1)
        self._add_run(start, count)


# -- what the tables reference (qemu-img check, and repairing a dirty image) --------

# owners, for overlap detection
META, L2, DATA, COMPRESSED = range(4)


class References:
    """Cluster references collected by owner, plus the problems found on the way."""

    def __init__(self, img: Qcow2Image, fsize: int) -> None:
        self.img = img
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.fsize = fsize
        self.nclusters = -(-fsize // self.cs)
        #: (cluster indices, how many times each is referenced) by owner
        self.parts: dict[int, list[tuple[np.ndarray, int]]] = {
            META: [],
            L2: [],
            DATA: [],
            COMPRESSED: [],
        }
        self.corruptions: list[str] = []
        #: (L2 entry, host cluster) of active standard clusters, for the COPIED check
        self.copied: list[tuple[np.ndarray, np.ndarray]] = []

    def error(self, msg: str) -> None:
        self.corruptions.append(msg)

    def add(self, owner: int, idx: np.ndarray, weight: int = 1) -> None:
        self.parts[owner].append((np.asarray(idx, dtype=np.int64), weight))

    def add_range(self, owner: int, what: str, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        if offset % self.cs:
            self.error(f"{what} at {offset:#x} is not cluster aligned")
            return False
        if offset + length > self.fsize:
            self.error(f"{what} at {offset:#x} (+{length:#x}) runs past the end of the file")
            return False
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        self.add(owner, np.arange(first, last + 1))
        return True


def _read(fd: int, n: int, offset: int) -> bytes | None:
    data = os.pread(fd, n, offset)
    return data if len(data) == n else None


def _l1_tables(refs: References, l1: np.ndarray, what: str, active: bool) -> np.ndarray:
    """Count an L1 table's references to L2 tables; return their offsets."""
    cs, cb = refs.cs, refs.cb
    reserved = (l1 & np.uint64(L.L1_RESERVED_MASK)) != 0
    for i in np.flatnonzero(reserved)[:MAX_MESSAGES].tolist():
        refs.error(f"{what} entry {i} ({int(l1[i]):#x}) has reserved bits set")
    off = l1 & np.uint64(L.OFFSET_MASK)
    ok = off != 0
    bad = np.flatnonzero(ok & ((off % np.uint64(cs) != 0) | (off + np.uint64(cs) > refs.fsize)))
    for i in bad[:MAX_MESSAGES].tolist():
        refs.error(
            f"{what} entry {i}: L2 table at {int(off[i]):#x} is misaligned or outside the file"
        )
    ok[bad] = False
    ok &= ~reserved
    tables = (off[ok] >> np.uint64(cb)).astype(np.int64)
    refs.add(L2, tables)
    if active:
        refs.copied.append((l1[ok], tables))
    return off[ok]


def _walk_tables(refs: References, active: np.ndarray, others: np.ndarray) -> None:
    """Count each L2 table's clusters once per L1 reference to it, as qemu does: after
    a snapshot, a shared L2 table and every cluster in it count two references."""
    uniq, times = np.unique(np.concatenate((active, others)), return_counts=True)
    in_active = set(active.tolist())
    for t, n in zip(uniq.tolist(), times.tolist()):
        raw = _read(refs.img.fd, refs.cs, t)
        if raw is None:
            refs.error(f"L2 table at {t:#x} cannot be read")
            continue
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        _walk_l2(refs, t, table, t in in_active, n)


def _walk_l2(refs: References, t: int, table: np.ndarray, active: bool, weight: int) -> None:
    img, cb = refs.img, refs.cb
    where = f"L2 table at {t:#x}"
    desc = table[0::2] if img.extended else table
    comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
    off = desc & np.uint64(L.OFFSET_MASK)
    reserved = L.L2_STANDARD_RESERVED_MASK
    if img.extended or img.meta.version < 3:
        reserved |= L.OFLAG_ZERO
    bad = np.flatnonzero(~comp & ((desc & np.uint64(reserved)) != 0))
    for i in bad[:MAX_MESSAGES].tolist():
        refs.error(f"{where}, entry {i} ({int(desc[i]):#x}): reserved bits set")
    std = ~comp & (off != 0)
    std[bad] = False
    if comp.any():
        ci = np.flatnonzero(comp)
        if img.external:
            refs.error(f"{where}: {len(ci)} compressed clusters in an image with a data file")
        else:
            coff, nbytes = img._compressed_spans(desc[ci])
            outside = (coff == 0) | (coff + nbytes > np.uint64(refs.fsize + L.SECTOR))
            for i in ci[outside][:MAX_MESSAGES].tolist():
                refs.error(
                    f"{where}, entry {i} ({int(desc[i]):#x}): compressed cluster outside the file"
                )
            copied = np.flatnonzero(desc[ci] & np.uint64(L.OFLAG_COPIED))
            for i in ci[copied][:MAX_MESSAGES].tolist():
                refs.error(f"{where}, entry {i}: compressed cluster with OFLAG_COPIED")
            coff, nbytes = coff[~outside], nbytes[~outside]
            if len(coff):
                first = (coff >> np.uint64(cb)).astype(np.int64)
                last = ((coff + nbytes - np.uint64(1)) >> np.uint64(cb)).astype(np.int64)
                last = np.minimum(last, refs.nclusters - 1)
                for j in range(int((last - first).max()) + 1):
                    refs.add(COMPRESSED, first[first + j <= last] + j, weight)
    if img.extended:
        bmp = table[1::2]
        both = np.flatnonzero(bmp & (bmp >> np.uint64(32)) & np.uint64(L.ALL_SUBCLUSTERS))
        for i in both[:MAX_MESSAGES].tolist():
            refs.error(f"{where}, entry {i}: subclusters both allocated and zero")
        cbad = np.flatnonzero(comp & (bmp != 0))
        for i in cbad[:MAX_MESSAGES].tolist():
            refs.error(f"{where}, entry {i}: compressed cluster with a subcluster bitmap")
        if not img.external:
            nooff = np.flatnonzero(~comp & (off == 0) & ((bmp & np.uint64(L.ALL_SUBCLUSTERS)) != 0))
            for i in nooff[:MAX_MESSAGES].tolist():
                refs.error(f"{where}, entry {i}: allocated subclusters without a host cluster")
    if img.external:
        return
    bad = np.flatnonzero(std & (off >= refs.fsize))
    for i in bad[:MAX_MESSAGES].tolist():
        refs.error(f"{where}, entry {i}: data cluster at {int(off[i]):#x} is outside the file")
    std[bad] = False
    idx = (off[std] >> np.uint64(cb)).astype(np.int64)
    refs.add(DATA, idx, weight)
    if active:
        refs.copied.append((desc[std], idx))


def _bitmaps(refs: References) -> None:
    ext = refs.img.meta.bitmaps
    if ext is None:
        return
    img = refs.img
    size, offset = ext.bitmap_directory_size, ext.bitmap_directory_offset
    if ext.nb_bitmaps > L.MAX_BITMAPS or size > L.MAX_BITMAP_DIRECTORY_BYTES:
        refs.error(f"bitmap directory of {ext.nb_bitmaps} bitmaps ({size} bytes) is too big")
        return
    if not refs.add_range(META, "bitmap directory", offset, size):
        return
    raw = _read(img.fd, size, offset) or b""
    pos = 0
    tables = 0
    for n in range(ext.nb_bitmaps):
        if pos + L.BITMAP_DIRECTORY_FIXED > len(raw):
            refs.error(f"bitmap directory entry {n} runs past the directory")
            return
        try:
            e = L.BitmapDirectoryEntry.parse(raw[pos:])
        except Exception:
            refs.error(f"bitmap directory entry {n} is truncated")
            return
        pos += L.BITMAP_DIRECTORY_FIXED + e.extra_data_size + e.name_size + len(e.padding)
        tsize = e.bitmap_table_size * 8
        tables += tsize
        if tsize > L.MAX_L1_BYTES or tables > refs.fsize:
            # distinct tables must fit in the file together: this bounds what we read
            refs.error(f"bitmap {n}: table of {e.bitmap_table_size} entries is too big")
            return
        if not refs.add_range(META, f"bitmap {n} table", e.bitmap_table_offset, tsize):
            continue
        table = np.frombuffer(_read(img.fd, tsize, e.bitmap_table_offset) or b"", ">u8")
        off = table.astype(np.uint64) & np.uint64(L.OFFSET_MASK)
        off = off[off != 0]
        inside = (off % np.uint64(refs.cs) == 0) & (off + np.uint64(refs.cs) <= refs.fsize)
        if not inside.all():
            refs.error(f"bitmap {n}: data clusters misaligned or outside the file")
        refs.add(META, (off[inside] >> np.uint64(refs.cb)).astype(np.int64))


def collect_references(img: Qcow2Image, fsize: int) -> tuple[References, np.ndarray, np.ndarray]:
    """References by owner, the refcount table entries and the on-disk refcounts."""
    refs = References(img, fsize)
    meta, hdr, cs = img.meta, img.meta.header, img.cluster_size
    refs.add(META, np.zeros(1, dtype=np.int64))  # the header cluster
    active = others = np.zeros(0, dtype=np.uint64)
    if refs.add_range(META, "L1 table", hdr.l1_table_offset, hdr.l1_size * 8):
        raw = _read(img.fd, hdr.l1_size * 8, hdr.l1_table_offset) or b""
        active = _l1_tables(refs, np.frombuffer(raw, ">u8").astype(np.uint64), "L1 table", True)
    table_bytes = 0
    tables = []
    for snap in img.snapshots:
        table_bytes += snap.table_bytes
        what = f"snapshot {snap.name!r} L1 table"
        if snap.l1_size and refs.add_range(META, what, snap.l1_table_offset, snap.l1_size * 8):
            tables.append(_read(img.fd, snap.l1_size * 8, snap.l1_table_offset) or b"")
    if tables:
        # every snapshot's L2 references at once (their sum is bounded by the file size)
        l1s = np.frombuffer(b"".join(tables), ">u8").astype(np.uint64)
        others = _l1_tables(refs, l1s, "snapshot L1 tables", False)
    _walk_tables(refs, active, others)
    if img.snapshots:
        # qemu may end the file right after the last entry, without its padding
        table_bytes = min(table_bytes, max(fsize - hdr.snapshots_offset, table_bytes - 7))
        refs.add_range(META, "snapshot table", hdr.snapshots_offset, table_bytes)
    if meta.crypto is not None:
        refs.add_range(META, "encryption header", meta.crypto.offset, meta.crypto.length)
    _bitmaps(refs)
    rt_bytes = hdr.refcount_table_clusters * cs
    reftable = np.zeros(0, dtype=np.uint64)
    if refs.add_range(META, "refcount table", hdr.refcount_table_offset, rt_bytes):
        raw = _read(img.fd, rt_bytes, hdr.refcount_table_offset) or b""
        reftable = np.frombuffer(raw, ">u8").astype(np.uint64)
    bad = (reftable & np.uint64(L.REFTABLE_RESERVED_MASK)) != 0
    bad |= (reftable != 0) & (reftable + np.uint64(cs) > fsize)
    for i in np.flatnonzero(bad)[:MAX_MESSAGES].tolist():
        refs.error(
            f"refcount table entry {i}: block at {int(reftable[i]):#x} is misaligned or outside the file"
        )
    reftable = np.where(bad, np.uint64(0), reftable)
    blocks = np.flatnonzero(reftable)
    refs.add(META, (reftable[blocks] >> np.uint64(refs.cb)).astype(np.int64))
    # on-disk counts, for the clusters of the file only
    order = meta.refcount_order
    be = cs * 8 >> order
    ondisk = np.zeros(refs.nclusters, dtype=dtype_for(order))
    # counts of clusters past the end of the file are ignored, as qemu ignores them
    for b in blocks[blocks * be < refs.nclusters].tolist():
        block = _read(img.fd, cs, int(reftable[b]))
        if block is None:
            continue
        lo = b * be
        n = min(be, refs.nclusters - lo)
        ondisk[lo : lo + n] = unpack(block, order)[:n]
    return refs, reftable, ondisk


def expected_refcounts(refs: References) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    n = refs.nclusters
    by_owner = {}
    for owner, parts in refs.parts.items():
        if not parts:
            by_owner[owner] = np.zeros(n, dtype=np.int64)
            continue
        idx = np.concatenate([p for p, _ in parts])
        w = np.concatenate([np.full(len(p), k, dtype=np.int64) for p, k in parts])
        keep = (idx >= 0) & (idx < n)
        counts = np.bincount(idx[keep], weights=w[keep], minlength=n)
        by_owner[owner] = np.rint(counts).astype(np.int64)
    total = sum(by_owner.values())
    return np.asarray(total), by_owner


def check_overlaps(refs: References, by_owner: dict[int, np.ndarray]) -> None:
    meta, l2, data, comp = (by_owner[k] > 0 for k in (META, L2, DATA, COMPRESSED))
    clash = (
        (by_owner[META] > 1) | (meta & (l2 | data | comp)) | (l2 & (data | comp)) | (data & comp)
    )
    for c in np.flatnonzero(clash)[:MAX_MESSAGES].tolist():
        owners = [
            name
            for name, arr in zip(
                ("metadata", "L2 table", "data", "compressed"), (meta, l2, data, comp)
            )
            if arr[c]
        ]
        refs.error(
            f"cluster {c} is used twice ({', '.join(owners) or 'metadata'}): overlapping metadata"
        )


def rebuild_refcounts(img: Qcow2Image) -> np.ndarray:
    """Refcounts as the tables say they should be (an image left dirty by lazy
    refcounts); refused when the tables themselves are damaged."""
    refs, _, _ = collect_references(img, file_size(img.fd))
    expected, by_owner = expected_refcounts(refs)
    check_overlaps(refs, by_owner)
    if refs.corruptions:
        raise CorruptImage(
            f"qcow2: {img.path}: dirty image with damaged tables, cannot repair refcounts: "
            f"{refs.corruptions[0]}"
        )
    if int(expected.max(initial=0)) > (1 << img.meta.refcount_bits) - 1:
        raise CorruptImage(f"qcow2: {img.path}: a refcount overflows refcount_bits")
    return expected.astype(dtype_for(img.meta.refcount_order))

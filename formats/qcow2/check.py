"""`qemu-img check` for qcow2: expected refcounts rebuilt from every table, compared
with the refcount blocks.

Every structure that owns host clusters adds its cluster indices to one list of numpy
arrays (header, L1 tables, L2 tables, data and compressed clusters, refcount table and
blocks, snapshot table, bitmaps); one bincount gives the expected counts. A count on
disk below the expected one is a corruption (a write could reuse a cluster in use), one
above is a leak, as qemu counts them. Tables pointing outside the file, misaligned or
with reserved bits, invalid compressed descriptors, overlapping metadata and wrong
OFLAG_COPIED flags are corruptions too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import CorruptImage
from ..fileio import file_size
from ..image import CheckResult
from . import layout as L
from .refcounts import dtype_for, unpack

if TYPE_CHECKING:
    from .image import Qcow2Image

#: messages listed per kind; beyond this they are summed up in one line
MAX_MESSAGES = 1000

# owners, for overlap detection
META, L2, DATA, COMPRESSED = range(4)


class _Refs:
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
    import os

    data = os.pread(fd, n, offset)
    return data if len(data) == n else None


def _l1_tables(refs: _Refs, l1: np.ndarray, what: str, active: bool) -> np.ndarray:
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


def _walk_tables(refs: _Refs, active: np.ndarray, others: np.ndarray) -> None:
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


def _walk_l2(refs: _Refs, t: int, table: np.ndarray, active: bool, weight: int) -> None:
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


def _bitmaps(refs: _Refs) -> None:
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


def _collect(img: Qcow2Image, fsize: int) -> tuple[_Refs, np.ndarray, np.ndarray]:
    """References by owner, the refcount table entries and the on-disk refcounts."""
    refs = _Refs(img, fsize)
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


def _expected(refs: _Refs) -> tuple[np.ndarray, dict[int, np.ndarray]]:
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


def _overlaps(refs: _Refs, by_owner: dict[int, np.ndarray]) -> None:
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


def _listed(messages: list[str], more: int, what: str) -> list[str]:
    if more > 0:
        messages.append(f"... and {more} more {what}")
    return messages


def check_image(img: Qcow2Image) -> CheckResult:
    fsize = file_size(img.fd)
    refs, _, ondisk = _collect(img, fsize)
    expected, by_owner = _expected(refs)
    _overlaps(refs, by_owner)
    result = CheckResult()
    if img.meta.incompatible & L.INCOMPAT_DIRTY:
        result.corruptions.append(
            "image is marked dirty (lazy refcounts were not written back): refcounts are "
            "stale until repaired (qemu-img check -r all, or opening it for writing)"
        )
    result.corruptions.extend(refs.corruptions)
    disk = ondisk.astype(np.uint64)
    want = expected.astype(np.uint64)
    low = np.flatnonzero(disk < want)
    high = np.flatnonzero(disk > want)
    result.corruptions.extend(
        f"cluster {c} refcount={int(disk[c])} reference={int(want[c])}"
        for c in low[:MAX_MESSAGES].tolist()
    )
    _listed(result.corruptions, len(low) - MAX_MESSAGES, "clusters with too low a refcount")
    # OFLAG_COPIED must say "refcount is exactly one", in the active tables only
    for entries, idx in refs.copied:
        inside = idx < len(disk)
        flag = (entries[inside] & np.uint64(L.OFLAG_COPIED)) != 0
        one = disk[idx[inside]] == 1
        wrong = np.flatnonzero(flag != one)
        for i in wrong[:MAX_MESSAGES].tolist():
            result.corruptions.append(
                f"OFLAG_COPIED: entry {int(entries[inside][i]):#x} refcount={int(disk[idx[inside][i]])}"
            )
    result.leaks.extend(
        f"cluster {c} refcount={int(disk[c])} reference={int(want[c])}"
        for c in high[:MAX_MESSAGES].tolist()
    )
    _listed(result.leaks, len(high) - MAX_MESSAGES, "leaked clusters")
    return result


def rebuild_refcounts(img: Qcow2Image) -> np.ndarray:
    """Refcounts as the tables say they should be (an image left dirty by lazy
    refcounts); refused when the tables themselves are damaged."""
    refs, _, _ = _collect(img, file_size(img.fd))
    expected, by_owner = _expected(refs)
    _overlaps(refs, by_owner)
    if refs.corruptions:
        raise CorruptImage(
            f"qcow2: {img.path}: dirty image with damaged tables, cannot repair refcounts: "
            f"{refs.corruptions[0]}"
        )
    if int(expected.max(initial=0)) > (1 << img.meta.refcount_bits) - 1:
        raise CorruptImage(f"qcow2: {img.path}: a refcount overflows refcount_bits")
    return expected.astype(dtype_for(img.meta.refcount_order))

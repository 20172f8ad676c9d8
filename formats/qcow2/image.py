"""Reading qcow2 (versions 2 and 3): opening and validating, the cluster map, reads.

Everything read from the file is checked before use: header fields against qemu's
limits, tables against the file size, and each L2 table as a whole (numpy) when it is
loaded, so a hostile image fails with one CorruptImage line, quickly.

Reads follow qemu's semantics: an unallocated cluster reads from the backing image (or
zeros), a zero cluster reads zeros even with a backing image. A read is split into runs
of units (clusters, or subclusters with extended L2 entries) of one kind; host-contiguous
data becomes one pread, and compressed clusters are fetched in merged reads and
decompressed in the calling thread (the engine calls us from its pool).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from construct import ConstructError

from ..backing import BackingPolicy, open_backing, resolve
from ..errors import CorruptImage, FormatError, UnsupportedFeature
from ..extents import Extent, Kind, clip, runs
from ..fileio import file_size, pread_exact, preadinto
from ..image import Image, Location
from . import compression
from . import layout as L
from .cache import DEFAULT_CACHE_BYTES, TableCache

FORMAT = "qcow2"

# unit kinds while mapping a range
UNALLOCATED, ZERO, DATA, COMPRESSED = 0, 1, 2, 3

#: compressed clusters closer than this in the file are fetched in one read
COMPRESSED_MERGE_GAP = 64 << 10
COMPRESSED_MERGE_MAX = 16 << 20


@dataclass
class Snapshot:
    """One entry of the snapshot table."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int | None
    icount: int | None
    table_bytes: int  # this entry's length in the table

    def describe(self) -> dict[str, Any]:
        clock_s, clock_ns = divmod(self.vm_clock_nsec, 10**9)
        h, rem = divmod(clock_s, 3600)
        m, s = divmod(rem, 60)
        date = datetime.datetime.fromtimestamp(self.date_sec, datetime.timezone.utc)
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date": date.strftime("%Y-%m-%d %H:%M:%S"),
            "clock": f"{h:02d}:{m:02d}:{s:02d}.{clock_ns // 10**6:03d}",
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": clock_s,
            "vm-clock-nsec": clock_ns,
        }
        if self.icount is not None and self.icount != 0xFFFF_FFFF_FFFF_FFFF:
            out["icount"] = self.icount
        return out


@dataclass
class Metadata:
    """What the header and its extensions say, validated."""

    header: Any
    version: int
    cluster_bits: int
    size: int
    refcount_order: int
    header_length: int
    incompatible: int
    compatible: int
    autoclear: int
    compression_type: int
    file_size: int
    backing_name: str | None = None
    backing_format: str | None = None
    data_file_name: str | None = None
    bitmaps: Any = None
    crypto: Any = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: where header extensions end (the header cluster's free space starts)
    extensions_end: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & L.INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & L.INCOMPAT_DATA_FILE)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)


def _fail(path: str, msg: str) -> CorruptImage:
    return CorruptImage(f"qcow2: {path}: {msg}")


def read_metadata(path: str, fd: int) -> Metadata:
    """Parse and validate the header and its extensions."""
    fsize = file_size(fd)
    head = os.pread(fd, L.HEADER_V3_LENGTH, 0)
    if len(head) < L.HEADER_V2_LENGTH or head[:4] != L.MAGIC:
        raise _fail(path, f"not a qcow2 image (header of {len(head)} bytes, magic {head[:4]!r})")
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise UnsupportedFeature(f"qcow2: {path}: version {version} (2 and 3 are supported)")
    if version == 3 and len(head) < L.HEADER_V3_MIN_LENGTH:
        raise _fail(path, f"version 3 header truncated at {len(head)} bytes")
    try:
        hdr = L.Header.parse(head)
    except ConstructError as exc:
        raise _fail(path, f"unreadable header: {exc}") from exc
    cb = hdr.cluster_bits
    if not L.MIN_CLUSTER_BITS <= cb <= L.MAX_CLUSTER_BITS:
        raise _fail(path, f"cluster_bits {cb} outside {L.MIN_CLUSTER_BITS}..{L.MAX_CLUSTER_BITS}")
    cs = 1 << cb
    if version == 2:
        meta = Metadata(hdr, 2, cb, hdr.size, 4, L.HEADER_V2_LENGTH, 0, 0, 0, 0, fsize)
    else:
        hl = hdr.header_length
        if hl < L.HEADER_V3_MIN_LENGTH or hl % 8 or hl > cs:
            raise _fail(path, f"header_length {hl} (expected a multiple of 8 in 104..{cs})")
        if hdr.refcount_order > L.MAX_REFCOUNT_ORDER:
            raise _fail(path, f"refcount_order {hdr.refcount_order} exceeds 6")
        ctype = hdr.compression_type or 0
        meta = Metadata(
            hdr,
            3,
            cb,
            hdr.size,
            hdr.refcount_order,
            hl,
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            ctype,
            fsize,
        )
    _read_extensions(path, fd, meta)
    unknown = meta.incompatible & ~L.INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = [meta.feature_names.get((L.FEATURE_INCOMPATIBLE, b), f"bit {b}") for b in bits]
        raise UnsupportedFeature(
            f"qcow2: {path}: unsupported incompatible features: {', '.join(names)}"
        )
    if hdr.crypt_method != L.CRYPT_NONE:
        kind = {L.CRYPT_AES: "AES", L.CRYPT_LUKS: "LUKS"}.get(hdr.crypt_method, "unknown")
        raise UnsupportedFeature(
            f"qcow2: {path}: encrypted images ({kind}, crypt_method {hdr.crypt_method}) are "
            f"not supported; decrypt it first (qemu-img convert --object secret,... )"
        )
    _check_compression(path, meta)
    if meta.extended_l2 and cb < L.MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _fail(path, f"extended L2 entries need clusters of 16k or more, not {cs}")
    if meta.has_data_file and meta.data_file_name is None:
        raise UnsupportedFeature(f"qcow2: {path}: uses an external data file but does not name it")
    if meta.autoclear & L.AUTOCLEAR_DATA_FILE_RAW and not meta.has_data_file:
        raise _fail(path, "raw external data bit set without an external data file")
    _read_backing_name(path, fd, meta)
    _check_tables_in_header(path, meta)
    return meta


def _read_extensions(path: str, fd: int, meta: Metadata) -> None:
    hdr, cs = meta.header, meta.cluster_size
    start = meta.header_length
    end = hdr.backing_file_offset if hdr.backing_file_offset else cs
    end = min(end, cs, meta.file_size)
    meta.extensions_end = start
    if end <= start:
        return
    area = os.pread(fd, end - start, start)
    pos = 0
    seen: set[int] = set()
    while pos + 8 <= len(area):
        etype = int.from_bytes(area[pos : pos + 4], "big")
        length = int.from_bytes(area[pos + 4 : pos + 8], "big")
        if etype == L.EXT_END:
            meta.extensions_end = start + pos + 8
            return
        if length > len(area) - pos - 8:
            raise _fail(
                path,
                f"header extension {etype:#x} at {start + pos:#x} claims {length} bytes, "
                f"past the end of the header area ({start + len(area):#x})",
            )
        data = area[pos + 8 : pos + 8 + length]
        if etype in seen and etype != 0:
            raise _fail(path, f"header extension {etype:#x} appears twice")
        seen.add(etype)
        _parse_extension(path, meta, etype, data)
        pos += 8 + length + (-length % 8)
    meta.extensions_end = start + min(pos, len(area))


def _parse_extension(path: str, meta: Metadata, etype: int, data: bytes) -> None:
    if etype == L.EXT_BACKING_FORMAT:
        meta.backing_format = _text(path, data, "backing format")
    elif etype == L.EXT_DATA_FILE:
        meta.data_file_name = _text(path, data, "data file name")
    elif etype == L.EXT_FEATURE_TABLE:
        n = len(data) // L.FeatureNameEntry.sizeof()
        for i in range(min(n, 192)):  # 3 bitmaps of 64 bits: more is repetition
            e = L.FeatureNameEntry.parse(data[i * 48 : i * 48 + 48])
            name = e.name.split(b"\0", 1)[0].decode("utf-8", "replace")
            meta.feature_names[(e.type, e.bit)] = name
    elif etype == L.EXT_BITMAPS:
        if len(data) < L.BitmapsExtension.sizeof():
            raise _fail(path, f"bitmaps extension of {len(data)} bytes is too short")
        meta.bitmaps = L.BitmapsExtension.parse(data)
    elif etype == L.EXT_CRYPTO_HEADER:
        if len(data) < L.CryptoHeaderExtension.sizeof():
            raise _fail(path, "encryption header extension is too short")
        meta.crypto = L.CryptoHeaderExtension.parse(data)


def _text(path: str, data: bytes, what: str) -> str:
    if len(data) > L.MAX_BACKING_NAME:
        raise _fail(path, f"{what} is {len(data)} bytes long (at most 1023)")
    return os.fsdecode(data)


def _check_compression(path: str, meta: Metadata) -> None:
    has_bit = bool(meta.incompatible & L.INCOMPAT_COMPRESSION)
    if has_bit and meta.compression_type == L.COMPRESSION_ZLIB:
        raise _fail(path, "compression type bit set but compression_type is zlib (0)")
    if not has_bit and meta.compression_type != L.COMPRESSION_ZLIB:
        raise _fail(path, f"compression_type {meta.compression_type} without its feature bit")
    if meta.compression_type not in L.COMPRESSION_NAMES:
        raise UnsupportedFeature(f"qcow2: {path}: unknown compression type {meta.compression_type}")


def _read_backing_name(path: str, fd: int, meta: Metadata) -> None:
    hdr = meta.header
    if not hdr.backing_file_offset:
        return
    n = hdr.backing_file_size
    if n > L.MAX_BACKING_NAME:
        raise _fail(path, f"backing file name is {n} bytes long (at most 1023)")
    if hdr.backing_file_offset + n > min(meta.cluster_size, meta.file_size):
        raise _fail(
            path,
            f"backing file name at {hdr.backing_file_offset:#x} (+{n:#x}) runs past the "
            f"header cluster or the end of the file",
        )
    meta.backing_name = os.fsdecode(pread_exact(fd, n, hdr.backing_file_offset, "qcow2"))
    if not meta.backing_name:
        meta.backing_name = None


def _check_tables_in_header(path: str, meta: Metadata) -> None:
    hdr, cs, fsize = meta.header, meta.cluster_size, meta.file_size
    per_l2 = meta.l2_entries * cs
    needed = -(-meta.size // per_l2)
    if hdr.l1_size * 8 > L.MAX_L1_BYTES:
        raise _fail(path, f"L1 table of {hdr.l1_size} entries exceeds qemu's 32 MiB limit")
    if hdr.l1_size < needed:
        raise _fail(
            path, f"L1 table of {hdr.l1_size} entries cannot map {meta.size} bytes ({needed})"
        )
    _region(path, "L1 table", hdr.l1_table_offset, hdr.l1_size * 8, cs, fsize)
    rt_bytes = hdr.refcount_table_clusters * cs
    if rt_bytes > L.MAX_REFTABLE_BYTES:
        raise _fail(path, f"refcount table of {hdr.refcount_table_clusters} clusters is too big")
    if rt_bytes == 0:
        raise _fail(path, "refcount table is empty")
    _region(path, "refcount table", hdr.refcount_table_offset, rt_bytes, cs, fsize)
    if hdr.nb_snapshots > L.MAX_SNAPSHOTS:
        raise _fail(path, f"{hdr.nb_snapshots} snapshots (at most {L.MAX_SNAPSHOTS})")
    if hdr.nb_snapshots:
        _region(path, "snapshot table", hdr.snapshots_offset, 1, cs, fsize)


def _region(path: str, what: str, offset: int, length: int, cs: int, fsize: int) -> None:
    if length == 0:
        return
    if offset % cs:
        raise _fail(path, f"{what} at {offset:#x} is not aligned to a cluster ({cs:#x})")
    if offset == 0:
        raise _fail(path, f"{what} at offset 0 overlaps the header")
    if offset + length > fsize:
        raise _fail(
            path,
            f"{what} at {offset:#x} (+{length:#x}) runs past end of file ({fsize:#x})",
        )


def read_l1(path: str, fd: int, offset: int, count: int, meta: Metadata, what: str) -> np.ndarray:
    """An L1 table as native uint64, every entry checked."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = pread_exact(fd, count * 8, offset, f"qcow2: {what}")
    l1 = np.frombuffer(raw, ">u8").astype(np.uint64)
    del raw  # a 32 MiB table (qemu's cap) is not held twice
    cs = meta.cluster_size
    # checked a million entries at a time: the temporaries stay small beside the table
    for at in range(0, len(l1), 1 << 20):
        part = l1[at : at + (1 << 20)]
        bad = np.flatnonzero(part & np.uint64(L.L1_RESERVED_MASK))
        if len(bad):
            i = at + int(bad[0])
            raise _fail(path, f"{what} entry {i} ({int(l1[i]):#x}) has reserved bits set")
        off = part & np.uint64(L.OFFSET_MASK)
        bad = np.flatnonzero((off % np.uint64(cs) != 0) | (off + np.uint64(cs) > meta.file_size))
        bad = bad[off[bad] != 0]
        if len(bad):
            i = at + int(bad[0])
            o = int(off[bad[0]])
            if o % cs:
                raise _fail(
                    path, f"{what} entry {i}: L2 table offset {o:#x} is not cluster aligned"
                )
            raise _fail(
                path,
                f"{what} entry {i}: L2 table at {o:#x} runs past end of file ({meta.file_size:#x})",
            )
    return l1


def read_snapshots(path: str, fd: int, meta: Metadata) -> list[Snapshot]:
    """The snapshot table: entries found one after another (their lengths vary), then
    their fixed parts parsed all at once with numpy."""
    hdr = meta.header
    n = hdr.nb_snapshots
    if not n:
        return []
    start = hdr.snapshots_offset
    limit = min(meta.file_size, start + L.MAX_SNAPSHOT_TABLE_BYTES) - start
    buf = os.pread(fd, min(limit, n * 64 + 4096), start)
    fixed = L.SNAPSHOT_FIXED
    offsets = [0] * n
    pos = 0
    for i in range(n):
        if pos + fixed > len(buf):
            buf = _grow(path, fd, start, limit, buf, pos + fixed)
        extra = int.from_bytes(buf[pos + 36 : pos + 40], "big")
        if extra > L.MAX_SNAPSHOT_EXTRA:
            raise _fail(path, f"snapshot {i} has {extra} bytes of extra data (max 1024)")
        used = fixed + extra + int.from_bytes(buf[pos + 12 : pos + 14], "big")
        used += int.from_bytes(buf[pos + 14 : pos + 16], "big")
        if pos + used > len(buf):
            buf = _grow(path, fd, start, limit, buf, pos + used)
        offsets[i] = pos
        pos += used + -used % 8  # qemu may end the file before the last entry's padding
    at = np.array(offsets, dtype=np.int64)
    raw = np.frombuffer(buf, np.uint8)
    heads = raw[at[:, None] + np.arange(fixed)].copy().view(L.SNAPSHOT_HEADER_DTYPE).reshape(-1)
    l1_bytes = heads["l1_size"].astype(np.int64) * 8
    if int(l1_bytes.max()) > L.MAX_L1_BYTES:
        raise _fail(path, "a snapshot's L1 table exceeds qemu's 32 MiB limit")
    # snapshots' L1 tables are distinct clusters: together they fit in the file, which
    # bounds what check() reads
    if int(l1_bytes.sum()) > meta.file_size:
        raise _fail(path, f"snapshot L1 tables ({int(l1_bytes.sum())} bytes) exceed the file")
    l1_off = heads["l1_table_offset"].astype(np.uint64)
    cs = meta.cluster_size
    bad = np.flatnonzero(
        (l1_bytes > 0)
        & (
            (l1_off % np.uint64(cs) != 0)
            | (l1_off == 0)
            | (l1_off + l1_bytes.astype(np.uint64) > meta.file_size)
        )
    )
    if len(bad):
        raise _fail(
            path, f"snapshot {int(bad[0])}: L1 table misaligned or past the end of the file"
        )
    extra_size = heads["extra_data_size"].astype(np.int64)
    if meta.version >= 3 and int(extra_size.min()) < 16:
        raise _fail(
            path, f"snapshot {int(np.argmin(extra_size))}: version 3 needs 16 bytes of extra data"
        )
    padded = np.zeros(n * 24, dtype=np.uint8).reshape(n, 24)
    span = np.minimum(extra_size, 24)
    cols = np.arange(24)
    mask = cols[None, :] < span[:, None]
    padded[mask] = raw[(at[:, None] + fixed + cols[None, :])[mask]]
    extras = padded.view(L.SNAPSHOT_EXTRA_DTYPE).reshape(-1)
    out = []
    ids, names = heads["id_str_size"].tolist(), heads["name_size"].tolist()
    for i, (h, ex, size) in enumerate(zip(heads.tolist(), extras.tolist(), extra_size.tolist())):
        p = offsets[i] + fixed + size
        vm_large, disk, icount = ex
        out.append(
            Snapshot(
                id=buf[p : p + ids[i]].decode("utf-8", "replace"),
                name=buf[p + ids[i] : p + ids[i] + names[i]].decode("utf-8", "replace"),
                l1_table_offset=h[0],
                l1_size=h[1],
                vm_state_size=vm_large if size >= 8 else h[7],
                date_sec=h[4],
                date_nsec=h[5],
                vm_clock_nsec=h[6],
                disk_size=disk if size >= 16 else None,
                icount=icount if size >= 24 else None,
                table_bytes=(offsets[i + 1] if i + 1 < n else pos) - offsets[i],
            )
        )
    return out


def _grow(path: str, fd: int, start: int, limit: int, buf: bytes, need: int) -> bytes:
    if need > limit:
        raise _fail(path, f"snapshot table at {start:#x} runs past the end of the file")
    return os.pread(fd, min(limit, max(need, 2 * len(buf))), start)


class Qcow2Image(Image):
    """A qcow2 image opened for reading (the writer extends it)."""

    format = FORMAT
    #: `decodes` reads at most this many L2 tables to learn whether any cluster is
    #: compressed; a bigger image is assumed to hold some
    DECODE_PROBE_TABLES = 64
    #: memory for cached L2 tables (qemu's default covers 8 GiB of a 64k-cluster image)
    l2_cache_bytes = DEFAULT_CACHE_BYTES

    def __init__(
        self,
        path: str,
        fd: int,
        meta: Metadata,
        *,
        writable: bool = False,
        l1: np.ndarray,
        snapshots: list[Snapshot],
        data_fd: int | None,
        data_path: str | None,
        size: int | None = None,
    ) -> None:
        super().__init__(path, meta.size if size is None else size, writable=writable)
        self.fd = fd
        self.meta = meta
        self.cluster_bits = meta.cluster_bits
        self.cluster_size = meta.cluster_size
        self.extended = meta.extended_l2
        self.l2_entries = meta.l2_entries
        self.unit_bits = self.cluster_bits - (5 if self.extended else 0)
        self.unit = 1 << self.unit_bits
        self.l1 = l1
        self.snapshots = snapshots
        self.data_fd = data_fd
        self.data_path = data_path
        #: external data file: guest offset == host offset, not refcounted
        self.external = meta.has_data_file
        self.ctype = meta.compression_type
        self.cz_off_bits, self.cz_sect_bits = L.compressed_fields(self.cluster_bits)
        #: host bytes an entry may point below (the writer raises it as the file grows)
        self.host_limit = meta.file_size
        self.cache = TableCache(
            self._load_l2, self._store_l2, self.cluster_size, capacity_bytes=self.l2_cache_bytes
        )
        self._decodes: bool | None = None

    @property  # type: ignore[override]
    def decodes(self) -> bool:
        """Whether reading inflates compressed clusters (here or down the backing chain)."""
        if self._decodes is None:
            tables = self.l1 & np.uint64(L.OFFSET_MASK)
            tables = tables[tables != 0]
            if len(tables) > self.DECODE_PROBE_TABLES:
                self._decodes = True
            else:
                flag = np.uint64(L.OFLAG_COMPRESSED)
                step = 2 if self.extended else 1
                self._decodes = any(
                    bool((self.cache.get(int(t))[::step] & flag).any()) for t in tables.tolist()
                )
        return self._decodes or (self.backing is not None and self.backing.decodes)

    @decodes.setter
    def decodes(self, value: bool) -> None:
        self._decodes = value

    # -- tables ---------------------------------------------------------------
    def _load_l2(self, offset: int) -> np.ndarray:
        raw = pread_exact(self.fd, self.cluster_size, offset, "qcow2: L2 table")
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        self._validate_l2(offset, table)
        return table

    def _store_l2(self, offset: int, table: np.ndarray) -> None:
        raise FormatError("qcow2: image is opened read-only")

    def _validate_l2(self, offset: int, table: np.ndarray) -> None:
        """Check a whole L2 table at once: reserved bits, alignment, bounds."""
        desc = table[0::2] if self.extended else table
        comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
        std = desc[~comp]
        reserved = L.L2_STANDARD_RESERVED_MASK
        if self.extended or self.meta.version < 3:
            reserved |= L.OFLAG_ZERO
        bad = np.flatnonzero(std & np.uint64(reserved))
        if len(bad):
            raise self._bad_entry(offset, int(np.flatnonzero(~comp)[bad[0]]), "reserved bits set")
        off = std & np.uint64(L.OFFSET_MASK)
        if not self.external:
            # qemu may end the file inside a cluster it allocated (a subcluster written)
            over = np.flatnonzero(off >= self.host_limit)
            over = over[off[over] != 0]
            if len(over):
                i = int(np.flatnonzero(~comp)[over[0]])
                raise self._bad_entry(offset, i, "points past the end of the file")
        if comp.any():
            cd = desc[comp]
            coff, nbytes = self._compressed_spans(cd)
            if self.external:
                raise self._bad_entry(
                    offset,
                    int(np.flatnonzero(comp)[0]),
                    "is compressed in an image with an external data file",
                )
            # the last sector may run past a file that ends mid-sector (qemu reads zeros)
            over = np.flatnonzero((coff == 0) | (coff + nbytes > self.host_limit + L.SECTOR))
            if len(over):
                i = int(np.flatnonzero(comp)[over[0]])
                raise self._bad_entry(
                    offset, i, "is a compressed cluster outside the file (or at offset 0)"
                )
            if self.extended:
                bmp = table[1::2][comp]
                if (bmp != 0).any():
                    i = int(np.flatnonzero(comp)[np.flatnonzero(bmp)[0]])
                    raise self._bad_entry(offset, i, "is compressed but has a subcluster bitmap")
        if self.extended:
            bmp = table[1::2]
            both = (bmp & (bmp >> np.uint64(32))) & np.uint64(L.ALL_SUBCLUSTERS)
            bad = np.flatnonzero(both)
            if len(bad):
                raise self._bad_entry(
                    offset, int(bad[0]), "has subclusters both allocated and zero"
                )
            alloc = (bmp & np.uint64(L.ALL_SUBCLUSTERS)) != 0
            noff = (desc & np.uint64(L.OFFSET_MASK)) == 0
            if not self.external:
                bad = np.flatnonzero(alloc & noff & ~comp)
                if len(bad):
                    raise self._bad_entry(
                        offset, int(bad[0]), "has allocated subclusters but no offset"
                    )

    def _bad_entry(self, table_off: int, index: int, why: str) -> CorruptImage:
        return CorruptImage(f"qcow2: {self.path}: L2 table at {table_off:#x}, entry {index}: {why}")

    def _compressed_spans(self, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(host offset, bytes to read) of compressed descriptors."""
        ob = self.cz_off_bits
        coff = desc & np.uint64((1 << ob) - 1)
        nsect = (desc >> np.uint64(ob)) & np.uint64((1 << self.cz_sect_bits) - 1)
        nbytes = (nsect + np.uint64(1)) * np.uint64(L.SECTOR) - (coff & np.uint64(L.SECTOR - 1))
        return coff, nbytes

    def _entries(
        self, c0: int, c1: int, l1: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Descriptors (and subcluster bitmaps) of guest clusters [c0, c1)."""
        l1 = self.l1 if l1 is None else l1
        per = self.l2_entries
        descs: list[np.ndarray] = []
        bmps: list[np.ndarray] = []
        c = c0
        while c < c1:
            li, i0 = divmod(c, per)
            i1 = min(per, i0 + (c1 - c))
            l2off = int(l1[li]) & L.OFFSET_MASK if li < len(l1) else 0
            if l2off == 0:
                descs.append(np.zeros(i1 - i0, dtype=np.uint64))
                if self.extended:
                    bmps.append(np.zeros(i1 - i0, dtype=np.uint64))
            else:
                table = self.cache.get(l2off)
                if self.extended:
                    descs.append(table[2 * i0 : 2 * i1 : 2].copy())
                    bmps.append(table[2 * i0 + 1 : 2 * i1 : 2].copy())
                else:
                    descs.append(table[i0:i1].copy())
            c += i1 - i0
        desc = descs[0] if len(descs) == 1 else np.concatenate(descs)
        if not self.extended:
            return desc, None
        return desc, bmps[0] if len(bmps) == 1 else np.concatenate(bmps)

    def _classify(
        self, c0: int, c1: int, l1: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per unit of clusters [c0, c1): kind, host offset, descriptor."""
        desc, bmp = self._entries(c0, c1, l1)
        comp = (desc & np.uint64(L.OFLAG_COMPRESSED)) != 0
        off = desc & np.uint64(L.OFFSET_MASK)
        if bmp is None:
            kind = np.full(len(desc), UNALLOCATED, dtype=np.uint8)
            zero = (desc & np.uint64(L.OFLAG_ZERO)) != 0
            present = off != 0
            if self.external:
                present |= (desc & np.uint64(L.OFLAG_COPIED)) != 0
            kind[present] = DATA
            kind[zero] = ZERO
            kind[comp] = COMPRESSED
            return kind, off, desc
        n = L.SUBCLUSTERS
        shifts = np.arange(n, dtype=np.uint64)
        alloc = ((bmp[:, None] >> shifts) & np.uint64(1)).astype(bool)
        zero = ((bmp[:, None] >> (shifts + np.uint64(n))) & np.uint64(1)).astype(bool)
        kind = np.where(alloc, DATA, np.where(zero, ZERO, UNALLOCATED)).astype(np.uint8)
        kind[comp] = COMPRESSED
        host = (off[:, None] + shifts * np.uint64(self.unit)).reshape(-1)
        return kind.reshape(-1), host, np.repeat(desc, n)

    # -- reading --------------------------------------------------------------
    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._read_mapped(offset, buf, self.l1)

    def _runs(
        self, offset: int, n: int, l1: np.ndarray
    ) -> Iterator[tuple[int, int, int, int, int]]:
        """(start, end, kind, host offset of start, descriptor) of each run of [offset,
        offset + n) stored alike: contiguous data, zeros, unallocated, one compressed
        cluster."""
        end = offset + n
        cb, ub = self.cluster_bits, self.unit_bits
        c0, c1 = offset >> cb, -(-end >> cb)
        kind, host, desc = self._classify(c0, c1, l1)
        u0 = (offset >> ub) - (c0 << (cb - ub))
        u1 = (-(-end >> ub)) - (c0 << (cb - ub))
        kind, host, desc = kind[u0:u1], host[u0:u1], desc[u0:u1]
        base = ((c0 << (cb - ub)) + u0) << ub  # guest offset of the first unit
        unit = self.unit
        m = len(kind)
        brk = np.ones(m, dtype=bool)
        if m > 1:
            k1, k0 = kind[1:], kind[:-1]
            # a compressed cluster is one piece, however many units it spans
            first_of_cluster = ((np.arange(1, m) + u0) & ((1 << (cb - ub)) - 1)) == 0
            brk[1:] = (
                (k1 != k0)
                | ((k1 == DATA) & (host[1:] != host[:-1] + np.uint64(unit)))
                | ((k1 == COMPRESSED) & first_of_cluster)
            )
        starts = np.flatnonzero(brk).tolist()
        starts.append(m)
        kinds = kind[starts[:-1]].tolist()
        hosts = host[starts[:-1]].tolist()
        descs = desc[starts[:-1]].tolist()
        for a, b, k, h, d in zip(starts[:-1], starts[1:], kinds, hosts, descs):
            s = max(offset, base + a * unit)
            e = min(end, base + b * unit)
            yield s, e, k, h + (s - (base + a * unit)), d

    def _data_fd(self) -> int:
        fd = self.data_fd if self.external else self.fd
        if fd is None:
            raise UnsupportedFeature(
                f"qcow2: {self.path}: its data is in the external data file "
                f"{self.meta.data_file_name!r}, not opened (backing files disabled)"
            )
        return fd

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        for s, e, k, h, _ in self._runs(offset, n, self.l1):
            yield Location(s, e - s, self._data_fd(), h) if k == DATA else Location(s, e - s)

    def _read_mapped(self, offset: int, buf: memoryview, l1: np.ndarray) -> None:
        pending: list[tuple[int, int, int, memoryview]] = []
        for s, e, k, h, d in self._runs(offset, len(buf), l1):
            dst = buf[s - offset : e - offset]
            if k == DATA:
                preadinto(self._data_fd(), dst, h)
            elif k == ZERO:
                _zero(dst)
            elif k == UNALLOCATED:
                self._read_below(s, dst)
            else:
                cstart = (s >> self.cluster_bits) << self.cluster_bits
                pending.append((d, s - cstart, 0, dst))
        if pending:
            self._read_compressed(pending)

    def _read_below(self, offset: int, dst: memoryview) -> None:
        """What an unallocated range reads: the backing image's bytes, then zeros."""
        back = self.backing
        n = len(dst)
        got = 0
        if back is not None and offset < back.size:
            got = min(n, back.size - offset)
            back.readinto(offset, dst[:got])
        if got < n:
            _zero(dst[got:])

    def _read_compressed(self, pieces: list[tuple[int, int, int, memoryview]]) -> None:
        descs = np.array([p[0] for p in pieces], dtype=np.uint64)
        coff, nbytes = self._compressed_spans(descs)
        starts, ends = coff.tolist(), (coff + nbytes).tolist()
        cs = self.cluster_size
        i = 0
        while i < len(pieces):
            j = i + 1
            lo, hi = starts[i], ends[i]
            while (
                j < len(pieces)
                and lo <= starts[j] <= hi + COMPRESSED_MERGE_GAP
                and max(hi, ends[j]) - lo <= COMPRESSED_MERGE_MAX
            ):
                hi = max(hi, ends[j])
                j += 1
            raw = bytearray(hi - lo)
            preadinto(self.fd, memoryview(raw), lo)
            view = memoryview(raw)
            for k in range(i, j):
                _, within, _, dst = pieces[k]
                data = compression.decompress(
                    self.ctype, view[starts[k] - lo : ends[k] - lo], cs, starts[k]
                )
                dst[:] = data[within : within + len(dst)]
            i = j

    # -- extents --------------------------------------------------------------
    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        for s, e, k in self._map(start, end, self.l1):
            if k == UNALLOCATED:
                yield from self._extents_below(s, e)
            else:
                yield Extent(s, e - s, Kind.DATA if k in (DATA, COMPRESSED) else Kind.ZERO)

    def _extents_below(self, s: int, e: int) -> Iterator[Extent]:
        back = self.backing
        if back is not None and s < back.size:
            be = min(e, back.size)
            yield from clip(back.extents(s, be), s, be)
            s = be
        if s < e:
            yield Extent(s, e - s, Kind.ZERO)

    def _map(self, start: int, end: int, l1: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """(start, end, kind) runs over [start, end); unallocated L1 ranges in one step."""
        if start >= end:
            return  # an empty range inside an L2 table's span would classify no clusters
        cb = self.cluster_bits
        span = self.l2_entries << cb
        li0, li1 = start // span, -(-end // span)
        entries = np.zeros(li1 - li0, dtype=np.uint64)
        avail = l1[li0 : min(li1, len(l1))]
        entries[: len(avail)] = avail & np.uint64(L.OFFSET_MASK)
        allocated = (entries != 0).astype(np.uint8)
        for first, count, value in runs(allocated):
            s = max(start, (li0 + first) * span)
            e = min(end, (li0 + first + count) * span)
            if not value:
                yield s, e, UNALLOCATED
                continue
            for li in range(li0 + first, li0 + first + count):
                ts, te = max(s, li * span), min(e, (li + 1) * span)
                c0, c1 = ts >> cb, -(-te >> cb)
                kind, _, _ = self._classify(c0, c1, l1)
                kind = np.where(kind == COMPRESSED, DATA, kind).astype(np.uint8)
                base = c0 << cb
                for f, cnt, v in runs(kind):
                    rs = max(ts, base + (f << self.unit_bits))
                    re_ = min(te, base + ((f + cnt) << self.unit_bits))
                    if rs < re_:
                        yield rs, re_, v

    # -- metadata -------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        m = self.meta
        out: dict[str, Any] = {"cluster-size": self.cluster_size}
        if m.backing_name:
            out["backing-filename"] = m.backing_name
        if m.backing_format:
            out["backing-format"] = m.backing_format
        out["compat"] = "1.1" if m.version >= 3 else "0.10"
        out["compression-type"] = L.COMPRESSION_NAMES.get(m.compression_type, "?")
        if m.version >= 3:
            out["lazy-refcounts"] = bool(m.compatible & L.COMPAT_LAZY_REFCOUNTS)
        out["refcount-bits"] = m.refcount_bits
        if m.has_data_file:
            out["data-file"] = m.data_file_name
            out["data-file-raw"] = bool(m.autoclear & L.AUTOCLEAR_DATA_FILE_RAW)
        if m.version >= 3:
            out["corrupt"] = bool(m.incompatible & L.INCOMPAT_CORRUPT)
            out["extended-l2"] = m.extended_l2
        out["dirty-flag"] = bool(m.incompatible & L.INCOMPAT_DIRTY)
        if self.snapshots:
            out["snapshots"] = [s.describe() for s in self.snapshots]
        return out

    def check(self):
        from .check import check_image

        if self.writable:
            self.flush()
        return check_image(self)

    def files(self) -> list[str]:
        out = [self.path] if self.path else []
        if self.data_path and self.data_path not in out:
            out.append(self.data_path)
        return out

    def snapshot(self, name: str) -> SnapshotView:
        """A read-only view of internal snapshot `name` (or its id)."""
        for s in self.snapshots:
            if name in (s.name, s.id):
                return SnapshotView(self, s)
        known = ", ".join(s.name for s in self.snapshots) or "none"
        raise FormatError(f"qcow2: {self.path}: no snapshot {name!r} (snapshots: {known})")

    def _close(self) -> None:
        os.close(self.fd)
        if self.data_fd is not None:
            os.close(self.data_fd)


class SnapshotView(Image):
    """An internal snapshot's disk, read through its own L1 table."""

    format = FORMAT

    def __init__(self, parent: Qcow2Image, snap: Snapshot) -> None:
        size = snap.disk_size if snap.disk_size is not None else parent.size
        super().__init__(parent.path, size, writable=False)
        self.parent = parent
        self.snap = snap
        self.cluster_size = parent.cluster_size
        self.decodes = True
        needed = -(-size // (parent.l2_entries << parent.cluster_bits))
        if snap.l1_size < needed:
            raise _fail(
                parent.path or "?",
                f"snapshot {snap.name!r}: L1 of {snap.l1_size} entries cannot map {size} bytes",
            )
        self.l1 = read_l1(
            parent.path or "?",
            parent.fd,
            snap.l1_table_offset,
            snap.l1_size,
            parent.meta,
            f"snapshot {snap.name!r} L1 table",
        )

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self.parent._read_mapped(offset, buf, self.l1)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        for s, e, k in self.parent._map(start, end, self.l1):
            if k == UNALLOCATED:
                yield from self.parent._extents_below(s, e)
            else:
                yield Extent(s, e - s, Kind.DATA if k in (DATA, COMPRESSED) else Kind.ZERO)

    def close(self) -> None:
        self.closed = True  # the parent owns the file


def _zero(dst: memoryview) -> None:
    np.frombuffer(dst, dtype=np.uint8)[:] = 0


# -- opening --------------------------------------------------------------------------


def open_data_file(
    path: str, meta: Metadata, policy: BackingPolicy, writable: bool
) -> tuple[int, str]:
    """The external data file, resolved with the backing files' confinement rules."""
    name = meta.data_file_name or ""
    real = resolve(path, name, BackingPolicy(allow=True, dirs=policy.dirs, chain=policy.chain))
    try:
        fd = os.open(real, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"qcow2: {path}: data file {name!r}: {exc.strerror}") from exc
    return fd, real


def open_file(
    path: str,
    cls: type[Qcow2Image],
    *,
    writable: bool,
    policy: BackingPolicy | None = None,
    check: Callable[[str, Metadata, list[Snapshot], BackingPolicy], None] | None = None,
) -> Qcow2Image:
    """`path` opened as `cls` (the reader, or the writer with `writable`); `check` may
    refuse the image once its metadata is read."""
    policy = policy or BackingPolicy()
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    data_fd = None
    img: Qcow2Image | None = None
    try:
        meta = read_metadata(path, fd)
        l1 = read_l1(path, fd, meta.header.l1_table_offset, meta.header.l1_size, meta, "L1 table")
        snapshots = read_snapshots(path, fd, meta)
        if check is not None:
            check(path, meta, snapshots, policy)
        data_path = None
        if meta.has_data_file and policy.allow:
            # like a backing file, the data file is another file the header names: with
            # backing files disabled (check, untrusted input) it stays closed
            data_fd, data_path = open_data_file(path, meta, policy, writable)
        img = cls(
            path,
            fd,
            meta,
            writable=writable,
            l1=l1,
            snapshots=snapshots,
            data_fd=data_fd,
            data_path=data_path,
        )
        if meta.backing_name and policy.allow:
            img.backing = open_backing(path, meta.backing_name, meta.backing_format, policy)
        if writable:
            img.start_writing()  # type: ignore[attr-defined]
        return img
    except BaseException:
        if img is not None and img.backing is not None:
            img.backing.close()
        os.close(fd)
        if data_fd is not None:
            os.close(data_fd)
        raise

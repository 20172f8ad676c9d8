"""VDI: VirtualBox's disk image, static (preallocated) and dynamic (normal).

Layout from VirtualBox's VDICore.h (header version 1.1, little-endian):

    pre-header (72) | header (cbHeader bytes) | ... | block map at offBlocks | blocks at offData

The block map holds one '<u4' per virtual block: the index of the block in the data area,
0xFFFFFFFF when never written (reads as zeros) and 0xFFFFFFFE when written as zeros.
Block i of the data area lives at offData + i * (cbBlockExtra + cbBlock) + cbBlockExtra.
"""

from __future__ import annotations

import os
import uuid
import uuid as _uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from construct import Bytes, ConstructError, Int32ul, Int64ul, Struct

from .backing import BackingPolicy
from .blocks import LISTED, BlockImage, listed
from .errors import CorruptImage, FormatError, UnsupportedFeature
from .extents import Extent, Kind, from_cluster_kinds
from .fileio import file_size, pread_exact, preadinto, punch_hole, pwrite_all
from .image import CheckResult, Image, Location
from .magic import VDI_SIGNATURE
from .magic import vdi as matches  # noqa: F401  (the probe rule, re-exported)
from .options import parse_bool, parse_choice

FORMAT = "vdi"

SIGNATURE = VDI_SIGNATURE
VERSION_1_1 = 0x0001_0001
PRE_HEADER_SIZE = 72
FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
TYPES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "static", TYPE_UNDO: "undo", TYPE_DIFF: "diff"}
BLOCK_FREE = 0xFFFF_FFFF
BLOCK_ZERO = 0xFFFF_FFFE
SECTOR = 512
DEFAULT_BLOCK_SIZE = 1 << 20
MAX_BLOCK_SIZE = 256 << 20
#: VirtualBox aligns the block map and the data area; so do we (whole-MiB data)
DATA_ALIGN = 1 << 20
HEADER_V1_SIZE = 0x180  # what qemu writes: the header without the LCHS geometry
HEADER_V1PLUS_SIZE = 0x190  # what VirtualBox writes: with it

# VDICore.h: VDIPREHEADER then VDIHEADER1PLUS.
Geometry = Struct(
    "cCylinders" / Int32ul, "cHeads" / Int32ul, "cSectors" / Int32ul, "cbSector" / Int32ul
)
Header = Struct(
    "szFileInfo" / Bytes(64),
    "u32Signature" / Int32ul,
    "u32Version" / Int32ul,
    "cbHeader" / Int32ul,
    "u32Type" / Int32ul,
    "fFlags" / Int32ul,
    "szComment" / Bytes(256),
    "offBlocks" / Int32ul,
    "offData" / Int32ul,
    "LegacyGeometry" / Geometry,
    "u32Dummy" / Int32ul,
    "cbDisk" / Int64ul,
    "cbBlock" / Int32ul,
    "cbBlockExtra" / Int32ul,
    "cBlocks" / Int32ul,
    "cBlocksAllocated" / Int32ul,
    "uuidCreate" / Bytes(16),
    "uuidModify" / Bytes(16),
    "uuidLinkage" / Bytes(16),
    "uuidParentModify" / Bytes(16),
    "LCHSGeometry" / Geometry,
)
HEADER_BYTES = Header.sizeof()  # 472


#: block map entries kept per chunk (256 KiB); a chunk of never-written entries is not
#: kept at all, so a 64 TiB image (a 256 MiB map) holding little data costs little memory
MAP_CHUNK = 1 << 16
#: entries read at a time while the map is scanned at open (4 MiB)
MAP_READ = 1 << 20


class BlockMap:
    """The block map, held in chunks of MAP_CHUNK entries; chunks holding only
    BLOCK_FREE are absent. Lookups return small dense copies; `pieces` walks a huge
    range chunk by chunk; a flush rewrites only the chunks that changed."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.chunks: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()

    def _chunk_len(self, k: int) -> int:
        return min(MAP_CHUNK, self.count - k * MAP_CHUNK)

    @classmethod
    def read(cls, fd: int, offset: int, count: int) -> BlockMap:
        """Scan the on-disk map a few MiB at a time, keeping the chunks in use."""
        m = cls(count)
        for pos in range(0, count, MAP_READ):
            n = min(MAP_READ, count - pos)
            arr = np.frombuffer(pread_exact(fd, 4 * n, offset + 4 * pos, "vdi: block map"), "<u4")
            whole = n - n % MAP_CHUNK
            rows = arr[:whole].reshape(-1, MAP_CHUNK)
            for r in np.flatnonzero((rows != BLOCK_FREE).any(axis=1)).tolist():
                m.chunks[pos // MAP_CHUNK + r] = rows[r].astype(np.uint32)
            if whole < n and (arr[whole:] != BLOCK_FREE).any():
                m.chunks[(pos + whole) // MAP_CHUNK] = arr[whole:].astype(np.uint32)
        return m

    def get(self, first: int, last: int) -> np.ndarray:
        """Entries [first, last) as a fresh array (for ranges of a few blocks)."""
        out = np.full(last - first, BLOCK_FREE, np.uint32)
        for k in range(first // MAP_CHUNK, -(-last // MAP_CHUNK)):
            chunk = self.chunks.get(k)
            if chunk is None:
                continue
            base = k * MAP_CHUNK
            lo, hi = max(first, base), min(last, base + len(chunk))
            out[lo - first : hi - first] = chunk[lo - base : hi - base]
        return out

    def put(self, first: int, values: np.ndarray) -> None:
        last = first + len(values)
        for k in range(first // MAP_CHUNK, -(-last // MAP_CHUNK)):
            chunk = self.chunks.get(k)
            if chunk is None:
                chunk = self.chunks[k] = np.full(self._chunk_len(k), BLOCK_FREE, np.uint32)
            base = k * MAP_CHUNK
            lo, hi = max(first, base), min(last, base + len(chunk))
            chunk[lo - base : hi - base] = values[lo - first : hi - first]
            self.dirty.add(k)

    def pieces(self, first: int, last: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """(first entry, count, entries or None when all are free) covering [first, last)."""
        for k in range(first // MAP_CHUNK, -(-last // MAP_CHUNK)):
            base = k * MAP_CHUNK
            lo, hi = max(first, base), min(last, base + self._chunk_len(k))
            chunk = self.chunks.get(k)
            yield lo, hi - lo, (None if chunk is None else chunk[lo - base : hi - base])

    def allocated(self) -> tuple[np.ndarray, np.ndarray]:
        """(virtual block, data block) of every entry that points into the data area."""
        idx, vals = [], []
        for k in sorted(self.chunks):
            chunk = self.chunks[k]
            where = np.flatnonzero(chunk < BLOCK_ZERO)
            idx.append(where + k * MAP_CHUNK)
            vals.append(chunk[where].astype(np.int64))
        if not idx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(idx), np.concatenate(vals)

    def write(self, fd: int, offset: int, *, everything: bool = False) -> None:
        """Write the changed chunks (or the whole map, free chunks included)."""
        if everything:
            free = np.full(MAP_CHUNK, BLOCK_FREE, "<u4").tobytes()
            for k in range(-(-self.count // MAP_CHUNK)):
                chunk = self.chunks.get(k)
                n = self._chunk_len(k)
                data = free[: 4 * n] if chunk is None else chunk.astype("<u4").tobytes()
                pwrite_all(fd, data, offset + 4 * k * MAP_CHUNK)
        else:
            for k in sorted(self.dirty):
                pwrite_all(fd, self.chunks[k].astype("<u4").tobytes(), offset + 4 * k * MAP_CHUNK)
        self.dirty.clear()


class VdiImage(BlockImage):
    format = FORMAT

    def __init__(self, path: str, fd: int, header, bmap: BlockMap, *, writable: bool) -> None:
        super().__init__(path, header.cbDisk, writable=writable)
        self.fd = fd
        self.header = header
        self.bmap = bmap
        self.block_size = header.cbBlock
        # static images write in place: detect zeros finely, as for raw
        self.cluster_size = 65536 if header.u32Type == TYPE_FIXED else self.block_size
        self.stride = header.cbBlock + header.cbBlockExtra
        _, valid = bmap.allocated()
        self.allocated = max(
            int(header.cBlocksAllocated), int(valid.max()) + 1 if len(valid) else 0
        )
        self._dirty = False

    @property
    def is_static(self) -> bool:
        return self.header.u32Type == TYPE_FIXED

    def _data_offset(self, entry: int) -> int:
        return self.header.offData + entry * self.stride + self.header.cbBlockExtra

    def _pieces(
        self, offset: int, n: int, fresh: np.ndarray | None = None
    ) -> Iterator[tuple[int, int, int, bool]]:
        """(position in the request, length, file offset or -1, in fresh blocks) runs,
        file-contiguous neighbours merged so a sequential layout costs one system call.
        `fresh` flags the blocks (from offset's block on) allocated by this write."""
        bs = self.block_size
        first = offset // bs
        entries = self.bmap.get(first, -(-(offset + n) // bs)).tolist()
        pos, done = offset, 0
        run: list | None = None
        while done < n:
            idx, within = divmod(pos, bs)
            step = min(bs - within, n - done)
            entry = entries[idx - first]
            foff = -1 if entry >= BLOCK_ZERO else self._data_offset(entry) + within
            new = bool(fresh[idx - first]) if fresh is not None else False
            if (
                run is not None
                and run[3] == new
                and (
                    (foff == -1 and run[2] == -1)
                    or (foff != -1 and run[2] != -1 and run[2] + run[1] == foff)
                )
            ):
                run[1] += step
            else:
                if run is not None:
                    yield run[0], run[1], run[2], run[3]
                run = [done, step, foff, new]
            pos += step
            done += step
        if run is not None:
            yield run[0], run[1], run[2], run[3]

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._guard()
        for at, n, foff, _ in self._pieces(offset, len(buf)):
            part = buf[at : at + n]
            if foff < 0:
                part[:] = bytes(n)
            else:
                preadinto(self.fd, part, foff)

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        self._guard()
        for at, length, foff, _ in self._pieces(offset, n):
            yield Location(offset + at, length, self.fd if foff >= 0 else None, max(foff, 0))

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        self._guard()
        bs = self.block_size
        for first, count, entries in self.bmap.pieces(start // bs, -(-end // bs)):
            lo, hi = max(start, first * bs), min(end, (first + count) * bs)
            if entries is None:
                yield Extent(lo, hi - lo, Kind.ZERO)
            else:
                kinds = (entries < BLOCK_ZERO).astype(np.uint8)
                yield from from_cluster_kinds(kinds, bs, first * bs, lo, hi)

    def _write(self, offset: int, data: memoryview) -> None:
        self._guard()
        bs = self.block_size
        first, last = offset // bs, -(-(offset + len(data)) // bs)
        entries = self.bmap.get(first, last)
        fresh = entries >= BLOCK_ZERO
        missing = np.flatnonzero(fresh)
        if len(missing):
            # blocks take the next slots in order, so a sequential write stays contiguous
            limit = 0xFFFF_FFFD
            if self.allocated + len(missing) > limit:
                raise UnsupportedFeature("vdi: block index space exhausted")
            entries[missing] = np.arange(
                self.allocated, self.allocated + len(missing), dtype=np.uint32
            )
            self.bmap.put(first, entries)
            self.allocated += len(missing)
            self._dirty = True
        for at, n, foff, new in self._pieces(offset, len(data), fresh):
            part = data[at : at + n]
            if new:
                for a, z in self._nonzero_runs(data, at, n):
                    self._pwrite(self.fd, part[a:z], foff + a)
            else:
                self._pwrite(self.fd, part, foff)

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._guard()
        # never-written and zero blocks already read as zeros: leave them unallocated
        for _at, length, foff, _ in self._pieces(offset, n):
            if foff >= 0 and not punch_hole(self.fd, foff, length):
                pos = 0
                while pos < length:
                    step = min(8 << 20, length - pos)
                    pwrite_all(self.fd, bytes(step), foff + pos)
                    pos += step

    def flush(self) -> None:
        if not self.writable or self.closed:
            return
        if self._dirty:
            self.bmap.write(self.fd, self.header.offBlocks)
            self.header.cBlocksAllocated = self.allocated
            # rewrite only the header the file declares (qemu's is 16 bytes shorter)
            length = PRE_HEADER_SIZE + min(self.header.cbHeader, HEADER_BYTES - PRE_HEADER_SIZE)
            pwrite_all(self.fd, Header.build(self.header)[:length], 0)
            end = self._data_offset(self.allocated) - self.header.cbBlockExtra
            if file_size(self.fd) < end:
                os.ftruncate(self.fd, end)
            self._dirty = False
        self._sync(self.fd)

    def _close(self) -> None:
        os.close(self.fd)

    def info(self) -> dict[str, Any]:
        h = self.header
        return {
            "subformat": TYPES.get(h.u32Type, str(h.u32Type)),
            "disk-type": h.u32Type,
            "creator": h.szFileInfo.split(b"\0", 1)[0].decode("latin-1").strip("<> \n"),
            "block-size": h.cbBlock,
            "cluster-size": h.cbBlock,
            "blocks": h.cBlocks,
            "allocated-blocks": len(self.bmap.allocated()[0]),
            "uuid": str(uuid.UUID(bytes_le=bytes(h.uuidCreate))),
            "version": f"{h.u32Version >> 16}.{h.u32Version & 0xFFFF}",
        }

    def check(self) -> CheckResult:
        res = CheckResult()
        seen = set()
        for msg in self.problems + bmap_problems(self.bmap, self.header, file_size(self.fd)):
            if msg not in seen:
                seen.add(msg)
                res.corruptions.append(msg)
        return res


def bmap_problems(bmap: BlockMap, header, fsize: int) -> list[str]:
    """What qemu-img check counts: entries out of range or shared, a wrong allocated count;
    and data blocks past the end of the file (a truncated image)."""
    idx, vals = bmap.allocated()
    bad = np.flatnonzero(vals >= header.cBlocks)
    out = listed(
        "vdi",
        [
            f"vdi: block map entry {int(idx[i])} = {int(vals[i])} is out of range "
            f"(< {header.cBlocks})"
            for i in bad[:LISTED].tolist()
        ],
        len(bad),
        "block map entries out of range",
    )
    stride = header.cbBlock + header.cbBlockExtra
    ends = header.offData + (vals + 1) * stride
    past = np.flatnonzero((vals < header.cBlocks) & (ends > fsize))
    out += listed(
        "vdi",
        [
            f"vdi: block {int(idx[i])} (data block {int(vals[i])}) ends at {int(ends[i]):#x}, "
            f"past the end of the file ({fsize:#x})"
            for i in past[:LISTED].tolist()
        ],
        len(past),
        "blocks past the end of the file",
    )
    uniq, counts = np.unique(vals, return_counts=True)
    for v in uniq[counts > 1][:LISTED].tolist():
        users = idx[vals == v][:4].tolist()
        out.append(f"vdi: data block {v} is used by several virtual blocks ({users})")
    if len(idx) != header.cBlocksAllocated and not bad.size:
        out.append(
            f"vdi: header counts {header.cBlocksAllocated} allocated blocks, the block map "
            f"{len(idx)}"
        )
    return out


def open_image(path: str, *, writable: bool = False, policy: BackingPolicy | None = None) -> Image:
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    try:
        return _open_fd(path, fd, writable=writable)
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str, fd: int, *, writable: bool) -> Image:
    fsize = file_size(fd)
    raw = pread_exact(fd, PRE_HEADER_SIZE + 8, 0, "vdi: header")
    if int.from_bytes(raw[64:68], "little") != SIGNATURE:
        raise CorruptImage(f"vdi: {path}: signature {raw[64:68].hex()} is not 7f10dabe")
    version = int.from_bytes(raw[68:72], "little")
    if version >> 16 != 1:
        raise UnsupportedFeature(
            f"vdi: {path}: header version {version >> 16}.{version & 0xFFFF} (only 1.x)"
        )
    cb_header = int.from_bytes(raw[72:76], "little")
    if cb_header < HEADER_V1_SIZE or cb_header > 64 << 10:
        raise CorruptImage(
            f"vdi: {path}: header size {cb_header} (expected {HEADER_V1_SIZE} or more)"
        )
    hraw = os.pread(fd, HEADER_BYTES, 0)
    if len(hraw) < PRE_HEADER_SIZE + HEADER_V1_SIZE:
        raise CorruptImage(f"vdi: {path}: the file ends inside the header")
    hraw = hraw + bytes(HEADER_BYTES - len(hraw))
    if cb_header < HEADER_BYTES - PRE_HEADER_SIZE:  # no LCHS geometry: read it as zeros
        hraw = hraw[: PRE_HEADER_SIZE + cb_header] + bytes(
            HEADER_BYTES - PRE_HEADER_SIZE - cb_header
        )
    try:
        h = Header.parse(hraw)
    except ConstructError as exc:  # pragma: no cover - fixed-size struct
        raise CorruptImage(f"vdi: {path}: cannot parse header: {exc}") from exc
    if h.u32Type not in (TYPE_NORMAL, TYPE_FIXED):
        raise UnsupportedFeature(
            f"vdi: {path}: image type {TYPES.get(h.u32Type, h.u32Type)} is not supported"
        )
    bs = h.cbBlock
    if bs < SECTOR or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise CorruptImage(f"vdi: {path}: block size {bs} is not a power of two in 512..256M")
    if h.LegacyGeometry.cbSector not in (0, SECTOR):
        raise UnsupportedFeature(f"vdi: {path}: sector size {h.LegacyGeometry.cbSector}")
    if h.cbBlockExtra > bs or h.cbBlockExtra % SECTOR:
        raise CorruptImage(f"vdi: {path}: block extra data size {h.cbBlockExtra} is invalid")
    if h.cbDisk > h.cBlocks * bs:
        raise CorruptImage(
            f"vdi: {path}: {h.cBlocks} blocks of {bs} bytes cannot hold {h.cbDisk} bytes"
        )
    if h.cBlocks > -(-h.cbDisk // bs) + 1 or h.cBlocks >= BLOCK_ZERO:
        raise CorruptImage(f"vdi: {path}: {h.cBlocks} blocks for a {h.cbDisk}-byte disk")
    if h.offBlocks < PRE_HEADER_SIZE + HEADER_V1_SIZE or h.offBlocks + 4 * h.cBlocks > fsize:
        raise CorruptImage(
            f"vdi: {path}: block map at {h.offBlocks:#x} (+{4 * h.cBlocks:#x}) is outside the "
            f"file ({fsize:#x})"
        )
    if h.offData < h.offBlocks + 4 * h.cBlocks:
        raise CorruptImage(f"vdi: {path}: data area at {h.offData:#x} overlaps the block map")
    bmap = BlockMap.read(fd, h.offBlocks, h.cBlocks)
    img = VdiImage(path, fd, h, bmap, writable=writable)
    img.problems = [m for m in bmap_problems(bmap, h, fsize) if "allocated blocks" not in m]
    return img


def create(
    path: str,
    size: int,
    *,
    final_path: str | None = None,
    static: bool | str | None = None,
    subformat: str | None = None,
    uuid: str | None = None,
    **options: Any,
) -> Image:
    """Create a VDI; `static=on` (qemu's name) or `subformat=static` preallocates it.
    `uuid` keeps a rewritten disk's identity (VirtualBox registers media by it)."""
    if options:
        raise FormatError(f"vdi: unknown options {', '.join(sorted(options))}")
    is_static = False
    if subformat is not None:
        is_static = (
            parse_choice(str(subformat), "subformat", ("dynamic", "static", "fixed")) != "dynamic"
        )
    if static is not None:
        flag = parse_bool(static, "static")
        if subformat is not None and flag != is_static:
            raise FormatError("vdi: static and subformat disagree")
        is_static = flag
    try:
        image_id = _uuid.UUID(uuid) if uuid is not None else _uuid.uuid4()
    except ValueError:
        raise FormatError(f"vdi: invalid uuid {uuid!r}") from None
    size = -(-size // SECTOR) * SECTOR
    bs = DEFAULT_BLOCK_SIZE
    blocks = -(-size // bs)
    if blocks >= BLOCK_ZERO:
        raise FormatError(f"vdi: {size} bytes needs too many blocks")
    off_blocks = 0x200
    off_data = -(-(off_blocks + 4 * blocks) // DATA_ALIGN) * DATA_ALIGN
    fields = {
        "szFileInfo": FILE_INFO + bytes(64 - len(FILE_INFO)),
        "u32Signature": SIGNATURE,
        "u32Version": VERSION_1_1,
        "cbHeader": HEADER_V1PLUS_SIZE,
        "u32Type": TYPE_FIXED if is_static else TYPE_NORMAL,
        "fFlags": 0,
        "szComment": bytes(256),
        "offBlocks": off_blocks,
        "offData": off_data,
        "LegacyGeometry": {"cCylinders": 0, "cHeads": 0, "cSectors": 0, "cbSector": SECTOR},
        "u32Dummy": 0,
        "cbDisk": size,
        "cbBlock": bs,
        "cbBlockExtra": 0,
        "cBlocks": blocks,
        "cBlocksAllocated": blocks if is_static else 0,
        "uuidCreate": image_id.bytes_le,
        "uuidModify": _uuid.uuid4().bytes_le,
        "uuidLinkage": bytes(16),
        "uuidParentModify": bytes(16),
        "LCHSGeometry": {"cCylinders": 0, "cHeads": 0, "cSectors": 0, "cbSector": SECTOR},
    }
    bmap = BlockMap(blocks)
    if is_static:
        for first in range(0, blocks, MAP_CHUNK):
            bmap.put(first, np.arange(first, min(first + MAP_CHUNK, blocks), dtype=np.uint32))
    raw = Header.build(fields)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        pwrite_all(fd, raw, 0)
        bmap.write(fd, off_blocks, everything=True)
        os.ftruncate(fd, off_data + (blocks * bs if is_static else 0))
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return VdiImage(path, fd, Header.parse(raw), bmap, writable=True)

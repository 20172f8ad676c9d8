"""VHD (qemu's `vpc`): fixed, dynamic and differencing disks.

Layout from Microsoft's "Virtual Hard Disk Image Format Specification" (2006), all
fields big-endian:

    fixed:         data | footer (512)
    dynamic/diff:  footer copy | dynamic header (1024) | BAT | [locators] | blocks | footer

A block is a sector bitmap (one bit per sector, most significant bit first, padded to a
sector) followed by `block_size` bytes of data; the BAT holds each block's sector offset,
0xFFFFFFFF when unallocated. In a differencing disk a clear bitmap bit means "read the
parent"; in a dynamic disk it means "reads as zeros".
"""

from __future__ import annotations

import os
import time
import urllib.parse
import uuid
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
from construct import Array, Bytes, ConstructError, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from .backing import BackingPolicy, open_backing, resolve
from .blocks import BlockImage, bitmap_runs, placement_problems
from .errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from .extents import Extent, Kind, from_cluster_kinds
from .fileio import file_size, pread_exact, preadinto, punch_hole, pwrite_all, write_segments
from .image import CheckResult, Image, Location
from .magic import VHD_COOKIE
from .magic import vpc as matches  # noqa: F401  (the probe rule, re-exported)
from .options import parse_bool, parse_choice, parse_size
from .raw import RawImage

FORMAT = "vpc"

SECTOR = 512
#: where a block's data starts in the file: a filesystem block, so it can be shared
DATA_ALIGN = 4096
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = VHD_COOKIE
HEADER_COOKIE = b"cxsparse"
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
DISK_TYPES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
UNALLOCATED = 0xFFFF_FFFF
#: seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC)
VHD_EPOCH = 946_684_800
#: 65535 cylinders x 16 heads x 255 sectors: the largest geometry the footer can hold
MAX_GEOMETRY = 65535 * 16 * 255
#: 2040 GiB: the largest disk Windows and qemu accept (block offsets are 32-bit sectors)
MAX_SIZE = 0xFF00_0000 * SECTOR
DEFAULT_BLOCK_SIZE = 2 << 20
MAX_BLOCK_SIZE = 256 << 20
MAX_LOCATOR = 64 << 10

#: creators whose disks are sized by the footer's current size, not by CHS (INTEROP.md)
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
CREATOR_APP = b"p2v "
#: qemu's marker for "the current size is exact"; qemu, Hyper-V and Azure all honour it
CREATOR_EXACT = b"qem2"
CREATOR_VERSION = 0x0001_0000
CREATOR_HOST = b"Wi2k"

# Specification section "Hard Disk Footer Format".
Footer = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "file_format_version" / Int32ub,
    "data_offset" / Int64ub,
    "time_stamp" / Int32ub,
    "creator_application" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_host_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "disk_geometry" / Struct("cylinders" / Int16ub, "heads" / Int8ub, "sectors_per_track" / Int8ub),
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)
FOOTER_CHECKSUM_AT = 64

# Specification section "Dynamic Disk Header Format".
ParentLocatorEntry = Struct(
    "platform_code" / Bytes(4),
    "platform_data_space" / Int32ub,
    "platform_data_length" / Int32ub,
    "reserved" / Int32ub,
    "platform_data_offset" / Int64ub,
)
DynamicHeader = Struct(
    "cookie" / Bytes(8),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_time_stamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_unicode_name" / Bytes(512),
    "parent_locator_entries" / Array(8, ParentLocatorEntry),
    "reserved2" / Bytes(256),
)
HEADER_CHECKSUM_AT = 36

# Parent locator platform codes ("Dynamic Disk Header Format", Parent Locator Entries).
W2RU = b"W2ru"  # relative Windows path, UTF-16LE
W2KU = b"W2ku"  # absolute Windows path, UTF-16LE
MACX = b"MacX"  # file:// URL, UTF-8


def checksum(buf: bytes | bytearray, at: int) -> int:
    """One's complement of the byte sum, the checksum field (4 bytes at `at`) counted as 0."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    total = int(arr.sum(dtype=np.uint64)) - int(arr[at : at + 4].sum(dtype=np.uint64))
    return ~total & 0xFFFF_FFFF


def with_checksum(struct: Struct, fields: dict, at: int) -> bytes:
    raw = bytearray(struct.build({**fields, "checksum": 0}))
    raw[at : at + 4] = checksum(raw, at).to_bytes(4, "big")
    return bytes(raw)


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for a sector count, as the specification's appendix computes it."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def chs_bytes(chs: tuple[int, int, int]) -> int:
    c, h, s = chs
    return c * h * s * SECTOR


def size_for(requested: int, *, exact: bool) -> tuple[int, tuple[int, int, int]]:
    """(virtual size, CHS) for a requested size.

    Without `exact`, the size grows to the first CHS capacity that holds the request, as
    Virtual PC sizes disks by geometry (qemu does the same, so 1 GiB becomes 2081/16/63).
    Past the largest geometry the CHS is pinned at its maximum and the size kept.
    """
    sectors = -(-requested // SECTOR)
    chs = geometry(sectors)
    if exact or sectors >= MAX_GEOMETRY:
        return sectors * SECTOR, chs
    n = sectors
    while chs_bytes(chs) < sectors * SECTOR:
        n += 1
        chs = geometry(n)
    return chs_bytes(chs), chs


def uses_current_size(footer) -> bool:
    """INTEROP.md: Hyper-V, qemu's exact mode, Disk2vhd and Xen size by the footer; Virtual
    PC by CHS. A maximal CHS cannot express the size, so it also means the footer."""
    g = footer.disk_geometry
    if (g.cylinders, g.heads, g.sectors_per_track) == (65535, 16, 255):
        return True
    return footer.creator_application in CURRENT_SIZE_CREATORS


def virtual_size(footer) -> int:
    if uses_current_size(footer):
        return footer.current_size
    g = footer.disk_geometry
    return chs_bytes((g.cylinders, g.heads, g.sectors_per_track))


def _parse(struct: Struct, raw: bytes, what: str):
    try:
        return struct.parse(raw)
    except ConstructError as exc:  # pragma: no cover - fixed-size structs parse any bytes
        raise CorruptImage(f"vpc: cannot parse {what}: {exc}") from exc


def _timestamp() -> int:
    return max(0, int(time.time()) - VHD_EPOCH) & 0xFFFF_FFFF


def _creator(footer) -> str:
    app = footer.creator_application.decode("latin-1").rstrip("\0 ")
    ver = footer.creator_version
    host = footer.creator_host_os.decode("latin-1").rstrip("\0 ")
    return (
        f"{app} {ver >> 16}.{ver & 0xFFFF} ({host})"
        if host
        else f"{app} {ver >> 16}.{ver & 0xFFFF}"
    )


def _footer_info(footer, size: int) -> dict[str, Any]:
    g = footer.disk_geometry
    return {
        "subformat": DISK_TYPES.get(footer.disk_type, str(footer.disk_type)),
        "disk-type": footer.disk_type,
        "creator": _creator(footer),
        "geometry": f"{g.cylinders}/{g.heads}/{g.sectors_per_track}",
        "current-size": footer.current_size,
        "size-source": "current-size" if uses_current_size(footer) else "chs",
        "virtual-size": size,
        "unique-id": str(uuid.UUID(bytes=bytes(footer.unique_id))),
    }


def _footer_problems(raw: bytes, footer, where: str) -> list[str]:
    problems = []
    want = checksum(raw, FOOTER_CHECKSUM_AT)
    if footer.checksum != want:
        problems.append(
            f"vpc: footer checksum at {where} is {footer.checksum:#010x}, computed {want:#010x}"
        )
    return problems


# ---------------------------------------------------------------------------------------
# fixed


class FixedVhd(RawImage):
    """A fixed VHD is raw data followed by the footer: reads stop before the footer."""

    format = FORMAT
    cluster_size = 65536

    def __init__(self, path: str, fd: int, footer, size: int, data_end: int, *, writable: bool):
        super().__init__(path, fd, size, writable=writable)
        self.footer = footer
        self.data_end = data_end
        self.problems: list[str] = []

    def _guard(self) -> None:
        if self.problems:
            raise CorruptImage(self.problems[0])

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._guard()
        n = max(0, min(len(buf), self.data_end - offset))
        if n:
            preadinto(self.fd, buf[:n], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        self._guard()
        stop = min(end, self.data_end)
        if start < stop:
            yield from super()._extents(start, stop)
        if max(start, stop) < end:
            yield Extent(max(start, stop), end - max(start, stop), Kind.ZERO)

    def _write(self, offset: int, data: memoryview) -> None:
        self._guard()
        if offset + len(data) > self.data_end:
            raise FormatError(
                f"vpc: write at {offset:#x} (+{len(data):#x}) would overwrite the footer at "
                f"{self.data_end:#x}"
            )
        pwrite_all(self.fd, data, offset)

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._guard()
        n = max(0, min(n, self.data_end - offset))
        if n and not punch_hole(self.fd, offset, n):
            Image._write_zeroes(self, offset, n)

    def info(self) -> dict[str, Any]:
        return _footer_info(self.footer, self.size)

    def check(self) -> CheckResult:
        return CheckResult(corruptions=list(self.problems))


# ---------------------------------------------------------------------------------------
# dynamic and differencing


class SparseVhd(BlockImage):
    """Dynamic and differencing disks: a BAT of blocks, each a sector bitmap then data."""

    format = FORMAT

    def __init__(
        self,
        path: str,
        fd: int,
        footer,
        header,
        bat: np.ndarray,
        size: int,
        *,
        writable: bool,
        parent: Image | None = None,
        parent_name: str | None = None,
    ) -> None:
        super().__init__(path, size, writable=writable)
        self.fd = fd
        self.footer = footer
        self.header = header
        self.bat = bat  # '>u4' sector offsets, UNALLOCATED when absent
        self.block_size = header.block_size
        self.cluster_size = self.block_size
        self.sectors_per_block = self.block_size // SECTOR
        self.bitmap_size = -(-self.sectors_per_block // 8 // SECTOR) * SECTOR or SECTOR
        self.is_differencing = footer.disk_type == DISK_DIFFERENCING
        self.backing = parent
        self.parent_name = parent_name
        self.next_free = self._first_free()
        self._file_end = file_size(self.fd)
        self._dirty = False

    # -- layout --------------------------------------------------------------
    def _first_free(self) -> int:
        bat_end = self.header.table_offset + len(self.bat) * 4
        end = -(-bat_end // SECTOR) * SECTOR
        for loc in self.header.parent_locator_entries:
            if loc.platform_code != b"\0\0\0\0" and loc.platform_data_offset:
                space = max(loc.platform_data_space, loc.platform_data_length)
                end = max(end, -(-(loc.platform_data_offset + space) // SECTOR) * SECTOR)
        allocated = self.bat[self.bat != UNALLOCATED]
        if len(allocated):
            last = int(allocated.max()) * SECTOR + self.bitmap_size + self.block_size
            end = max(end, last)
        # new blocks go where the footer is now, as other writers do
        return max(end, -(-(file_size(self.fd) - FOOTER_SIZE) // SECTOR) * SECTOR)

    def _read_bitmap(self, idx: int) -> np.ndarray:
        off = int(self.bat[idx]) * SECTOR
        raw = pread_exact(self.fd, self.bitmap_size, off, f"vpc: bitmap of block {idx}")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="big")
        return bits[: self.sectors_per_block].astype(bool)

    # -- reading -------------------------------------------------------------
    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._guard()
        bs = self.block_size
        pos, done, total = offset, 0, len(buf)
        while done < total:
            idx, within = divmod(pos, bs)
            n = min(bs - within, total - done)
            part = buf[done : done + n]
            entry = int(self.bat[idx])
            if entry == UNALLOCATED:
                self._absent(pos, part)
            else:
                data_off = entry * SECTOR + self.bitmap_size
                bits = self._bitmap(idx)
                if bits is None:
                    preadinto(self.fd, part, data_off + within)
                else:
                    self._read_partial(pos, part, data_off, bits)
            pos += n
            done += n

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        self._guard()
        for pos, idx, within, step in self._blocks(offset, n):
            entry = int(self.bat[idx])
            if entry != UNALLOCATED and self._bitmap(idx) is None:  # every sector present
                yield Location(pos, step, self.fd, entry * SECTOR + self.bitmap_size + within)
            else:
                yield Location(pos, step)

    def _read_partial(self, pos: int, part: memoryview, data_off: int, bits: np.ndarray) -> None:
        bs = self.block_size
        within = pos % bs
        first = within // SECTOR
        last = -(-(within + len(part)) // SECTOR)
        for s, count, present in bitmap_runs(bits[first:last]):
            a = max((first + s) * SECTOR, within)
            b = min((first + s + count) * SECTOR, within + len(part))
            piece = part[a - within : b - within]
            if present:
                preadinto(self.fd, piece, data_off + a)
            else:
                self._absent(pos - within + a, piece)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        self._guard()
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        kinds = (self.bat[first:last] != UNALLOCATED).astype(np.uint8)
        if self.backing is None:
            yield from from_cluster_kinds(kinds, bs, first * bs, start, end)
            return
        for ext in from_cluster_kinds(kinds, bs, first * bs, start, end):
            if ext.kind == Kind.DATA:
                yield ext
                continue
            # unallocated in a child: whatever the parent maps there
            stop = min(ext.end, self.backing.size)
            if ext.start < stop:
                yield from self.backing.extents(ext.start, stop)
            if max(ext.start, stop) < ext.end:
                yield Extent(max(ext.start, stop), ext.end - max(ext.start, stop), Kind.ZERO)

    # -- writing -------------------------------------------------------------
    def _write(self, offset: int, data: memoryview) -> None:
        self._guard()
        end = offset + len(data)
        # a bitmap bit covers a sector, so writes are widened to whole sectors by merging
        # the edges with what the image reads there; a differencing disk widens to 4 KiB
        # so each bitmap byte is all set or all clear (libvhdi misreads mixed bytes)
        unit = 8 * SECTOR if self.is_differencing else SECTOR
        head, tail = offset % unit, end % unit
        if head or tail:
            a = offset - head
            b = min(end + (unit - tail) % unit, self.size)
            merged = bytearray(self.read(a, b - a))
            merged[head : head + len(data)] = data
            offset, data = a, memoryview(merged)
        segments: list[tuple[int, memoryview | bytes]] = []
        bs = self.block_size
        pos, done, total = offset, 0, len(data)
        while done < total:
            idx, within = divmod(pos, bs)
            n = min(bs - within, total - done)
            part = data[done : done + n]
            entry = int(self.bat[idx])
            fresh = entry == UNALLOCATED
            if fresh:
                entry = self._allocate(idx)
                bits = np.zeros(self.sectors_per_block, bool) if self.is_differencing else None
                if bits is not None:
                    bits[within // SECTOR : -(-(within + n) // SECTOR)] = True
                    if bits.all():
                        bits = None
                self._bitmaps[idx] = bits
                segments.append((entry * SECTOR, self._bitmap_bytes(bits)))
            else:
                bits = self._bitmap(idx)
                if bits is not None:
                    bits = bits.copy()
                    bits[within // SECTOR : -(-(within + n) // SECTOR)] = True
                    if bits.all():
                        bits = None
                    self._bitmaps[idx] = bits
                    segments.append((entry * SECTOR, self._bitmap_bytes(bits)))
            data_off = entry * SECTOR + self.bitmap_size + within
            if fresh:
                runs = self._nonzero_runs(data, done, n)
                segments.extend((data_off + a, part[a:z]) for a, z in runs)
            else:
                segments.append((data_off, part))
            pos += n
            done += n
        if self._pending is not None:
            # the engine's writer thread issues them (preallocated) while this one plans;
            # its chunks are cluster-aligned, so no write here merged edges read back
            self._pending.extend((self.fd, memoryview(b).cast("B"), off) for off, b in segments)
        else:
            write_segments(self.fd, segments)

    def _bitmap_bytes(self, bits: np.ndarray | None) -> bytes:
        if bits is None:
            return b"\xff" * self.bitmap_size
        packed = np.packbits(bits, bitorder="big").tobytes()
        return packed + bytes(self.bitmap_size - len(packed))

    def _allocate(self, idx: int) -> int:
        # the sector bitmap goes where the data after it starts on a filesystem block, so
        # that the engine can share blocks with a source (formats/transfer.py)
        off = self.next_free + (-(self.next_free + self.bitmap_size)) % DATA_ALIGN
        if off // SECTOR >= UNALLOCATED:
            raise UnsupportedFeature("vpc: the file would grow past 2 TiB of block offsets")
        self.bat[idx] = off // SECTOR
        self.next_free = off + self.bitmap_size + self.block_size
        # the file grows by truncation, not by the bitmap's write past its end: XFS
        # preallocates past the end of a file that writes extend, blocks the rest of the
        # block (shared, or left a hole) would then keep
        if self.next_free > self._file_end:
            self._file_end = self.next_free
            os.ftruncate(self.fd, self.next_free)
        self._dirty = True
        return off // SECTOR

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._guard()
        if self.is_differencing:
            # a clear bit would show the parent: zeros must be stored
            super()._write_zeroes(offset, n)
            return
        for _, idx, within, step in self._blocks(offset, n):
            entry = int(self.bat[idx])
            if entry != UNALLOCATED:
                data_off = entry * SECTOR + self.bitmap_size + within
                if not punch_hole(self.fd, data_off, step):
                    pwrite_all(self.fd, bytes(step), data_off)

    def flush(self) -> None:
        if not self.writable or self.closed:
            return
        if self._dirty:
            pwrite_all(self.fd, self.bat.astype(">u4").tobytes(), self.header.table_offset)
            # the footer follows the last block; its copy at offset 0 stays as it was
            raw = pread_exact(self.fd, FOOTER_SIZE, 0, "vpc: footer copy")
            pwrite_all(self.fd, raw, self.next_free)
            os.ftruncate(self.fd, self.next_free + FOOTER_SIZE)
            self._dirty = False
        self._sync(self.fd)

    def _close(self) -> None:
        os.close(self.fd)

    # -- metadata ------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out = _footer_info(self.footer, self.size)
        out["block-size"] = self.block_size
        out["cluster-size"] = self.block_size
        out["allocated-blocks"] = int(np.count_nonzero(self.bat != UNALLOCATED))
        if self.is_differencing:
            out["parent"] = self.backing.path if self.backing is not None else None
            out["parent-name"] = self.parent_name
            out["parent-unique-id"] = str(uuid.UUID(bytes=bytes(self.header.parent_unique_id)))
        return out

    def check(self) -> CheckResult:
        res = CheckResult()
        res.corruptions.extend(self.problems)
        res.corruptions.extend(bat_problems(self.bat, self._layout(), set(self.problems)))
        return res

    def _layout(self) -> tuple[int, int, int]:
        """(metadata end, bytes per block, file size) for BAT validation."""
        bat_end = self.header.table_offset + len(self.bat) * 4
        return bat_end, self.bitmap_size + self.block_size, file_size(self.fd)


def bat_problems(
    bat: np.ndarray, layout: tuple[int, int, int], seen: Collection[str] = ()
) -> list[str]:
    """Entries past the end of the file (a truncated image), inside the metadata, or
    overlapping each other."""
    meta_end, span, fsize = layout
    idx = np.flatnonzero(bat != UNALLOCATED)
    offs = bat[idx].astype(np.int64) * SECTOR
    found = placement_problems(
        "vpc", idx, offs, span, (meta_end, fsize), entry="BAT entry", area_name="data area"
    )
    return [m for m in found if m not in seen]


# ---------------------------------------------------------------------------------------
# opening


def _read_footer(fd: int, path: str) -> tuple[Any, bytes, int]:
    """(footer, its raw bytes, its offset).

    The footer at the end wins when it says fixed: a fixed disk may hold another VHD whose
    footer copy sits at offset 0. Sparse disks are read from their copy at 0, which stays
    valid while the end moves as blocks are added.
    """
    size = file_size(fd)
    if size < FOOTER_SIZE:
        raise CorruptImage(f"vpc: {path}: {size} bytes is too short for a VHD footer")
    tail_at = size - FOOTER_SIZE
    tail = pread_exact(fd, FOOTER_SIZE, tail_at, "vpc: footer")
    if tail[:8] != FOOTER_COOKIE and tail[1:9] == FOOTER_COOKIE:
        # Virtual PC before 2004 wrote a 511-byte footer
        tail_at += 1
        tail = tail[1:] + b"\0"
    head = pread_exact(fd, FOOTER_SIZE, 0, "vpc: footer")
    tail_ok = tail[:8] == FOOTER_COOKIE
    if tail_ok and int.from_bytes(tail[60:64], "big") == DISK_FIXED:
        return _parse(Footer, tail, "footer"), tail, tail_at
    if head[:8] == FOOTER_COOKIE:
        return _parse(Footer, head, "footer"), head, 0
    if tail_ok:
        return _parse(Footer, tail, "footer"), tail, tail_at
    raise CorruptImage(
        f"vpc: {path}: no 'conectix' footer at 0 or at the end of the file (found {tail[:8]!r})"
    )


def open_image(path: str, *, writable: bool = False, policy: BackingPolicy | None = None) -> Image:
    policy = policy or BackingPolicy()
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    try:
        return _open_fd(path, fd, writable=writable, policy=policy)
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str, fd: int, *, writable: bool, policy: BackingPolicy) -> Image:
    footer, raw, footer_at = _read_footer(fd, path)
    problems = _footer_problems(raw, footer, f"{footer_at:#x}")
    size = virtual_size(footer)
    if size > MAX_SIZE or size % SECTOR:
        raise CorruptImage(f"vpc: {path}: virtual size {size} is not a sector count up to 2040 GiB")
    fsize = file_size(fd)
    if footer.disk_type == DISK_FIXED:
        fixed = FixedVhd(path, fd, footer, size, footer_at, writable=writable)
        if size > footer_at:
            problems.append(
                f"vpc: fixed disk of {size} bytes holds only {footer_at} bytes before its "
                "footer (truncated?)"
            )
        fixed.problems = problems
        return fixed
    if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
        raise UnsupportedFeature(f"vpc: {path}: unknown disk type {footer.disk_type}")
    if footer.data_offset + HEADER_SIZE > fsize:
        raise CorruptImage(f"vpc: {path}: header offset {footer.data_offset:#x} past end of file")
    hraw = pread_exact(fd, HEADER_SIZE, footer.data_offset, "vpc: dynamic header")
    header = _parse(DynamicHeader, hraw, "dynamic header")
    if header.cookie != HEADER_COOKIE:
        raise CorruptImage(
            f"vpc: {path}: expected 'cxsparse' at {footer.data_offset:#x}, found {header.cookie!r}"
        )
    want = checksum(hraw, HEADER_CHECKSUM_AT)
    if header.checksum != want:
        problems.append(
            f"vpc: dynamic header checksum is {header.checksum:#010x}, computed {want:#010x}"
        )
    bs = header.block_size
    if bs < SECTOR or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise CorruptImage(f"vpc: {path}: block size {bs} is not a power of two in 512..256M")
    entries = header.max_table_entries
    if entries * bs < size:
        raise CorruptImage(
            f"vpc: {path}: {entries} BAT entries of {bs} bytes cannot cover {size} bytes"
        )
    entries = min(entries, -(-size // bs))  # entries past the disk are never read
    if header.table_offset + entries * 4 > fsize:
        raise CorruptImage(
            f"vpc: {path}: BAT at {header.table_offset:#x} (+{entries * 4:#x}) runs past the "
            f"end of the file ({fsize:#x})"
        )
    bat = np.frombuffer(
        pread_exact(fd, entries * 4, header.table_offset, "vpc: BAT"), ">u4"
    ).astype(np.uint32)
    parent = None
    parent_name = None
    if footer.disk_type == DISK_DIFFERENCING:
        parent_name, candidates = _parent_candidates(fd, header, fsize)
        if policy.allow:
            parent = _open_parent(path, header, candidates, policy)
    img = SparseVhd(
        path,
        fd,
        footer,
        header,
        bat,
        size,
        writable=writable,
        parent=parent,
        parent_name=parent_name,
    )
    img.problems = problems + bat_problems(bat, img._layout())
    return img


def _parent_candidates(fd: int, header, fsize: int) -> tuple[str, list[str]]:
    """Names the parent may go by, most specific first: relative, URL, absolute, bare."""
    found: dict[bytes, str] = {}
    for loc in header.parent_locator_entries:
        if loc.platform_code not in (W2RU, W2KU, MACX) or loc.platform_data_length == 0:
            continue
        n, off = loc.platform_data_length, loc.platform_data_offset
        if n > MAX_LOCATOR or off + n > fsize:
            raise CorruptImage(
                f"vpc: parent locator {loc.platform_code!r} at {off:#x} (+{n:#x}) runs past "
                f"the end of the file ({fsize:#x})"
            )
        raw = pread_exact(fd, n, off, "vpc: parent locator")
        try:
            text = raw.decode("utf-8" if loc.platform_code == MACX else "utf-16-le")
        except UnicodeDecodeError as exc:
            raise CorruptImage(f"vpc: parent locator {loc.platform_code!r} is not text") from exc
        found.setdefault(loc.platform_code, text.rstrip("\0"))
    try:
        name = header.parent_unicode_name.decode("utf-16-be").split("\0", 1)[0]
    except UnicodeDecodeError:
        name = ""
    candidates = []
    if W2RU in found:
        candidates.append(found[W2RU].replace("\\", "/"))
    if MACX in found:
        url = urllib.parse.urlparse(found[MACX])
        candidates.append(urllib.parse.unquote(url.path) if url.scheme == "file" else found[MACX])
    # a Windows absolute path means nothing here; its file name beside the child might
    for text in (found.get(W2KU, ""), name):
        if text:
            candidates.append(text.replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1])
    if not candidates:
        raise CorruptImage("vpc: differencing disk names no parent (no usable parent locator)")
    return name or candidates[0], [c for c in candidates if c]


def _open_parent(path: str, header, candidates: list[str], policy: BackingPolicy) -> Image:
    for name in candidates:
        real = resolve(path, name, policy)  # UnsafeImage for escapes and cycles
        if os.path.exists(real):
            parent = open_backing(path, name, FORMAT, policy)
            pid = getattr(parent, "footer", None)
            if pid is not None and bytes(pid.unique_id) != bytes(header.parent_unique_id):
                parent.close()
                raise UnsafeImage(
                    f"vpc: {path}: parent {real} has unique id "
                    f"{uuid.UUID(bytes=bytes(pid.unique_id))}, the child expects "
                    f"{uuid.UUID(bytes=bytes(header.parent_unique_id))}"
                )
            return parent
    raise FormatError(f"vpc: {path}: parent not found (tried {', '.join(candidates)})")


# ---------------------------------------------------------------------------------------
# creating


def _new_footer(
    size: int, chs: tuple[int, int, int], disk_type: int, *, exact: bool, uid: bytes | None = None
) -> dict:
    c, h, s = chs
    return {
        "cookie": FOOTER_COOKIE,
        "features": 2,  # the "reserved" bit the specification says is always set
        "file_format_version": 0x0001_0000,
        "data_offset": NO_OFFSET if disk_type == DISK_FIXED else SECTOR,
        "time_stamp": _timestamp(),
        "creator_application": CREATOR_EXACT if exact else CREATOR_APP,
        "creator_version": CREATOR_VERSION,
        "creator_host_os": CREATOR_HOST,
        "original_size": size,
        "current_size": size,
        "disk_geometry": {"cylinders": c, "heads": h, "sectors_per_track": s},
        "disk_type": disk_type,
        "checksum": 0,
        "unique_id": uid or uuid.uuid4().bytes,
        "saved_state": 0,
        "reserved": bytes(427),
    }


def create(
    path: str,
    size: int,
    *,
    final_path: str | None = None,
    subformat: str | None = None,
    force_size: bool | str = False,
    cloud: bool | str = False,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    block_size: int | str | None = None,
    unique_id: str | None = None,
    **options: Any,
) -> Image:
    """Create a VHD. `force_size` keeps the size exact (qemu's option; the footer then says
    `qem2`); `cloud` makes an Azure disk: fixed, its size rounded up to a whole MiB.
    `unique_id` (a UUID) keeps a rewritten disk's identity: differencing children and
    hypervisors' registries know a disk by it."""
    if options:
        raise FormatError(f"vpc: unknown options {', '.join(sorted(options))}")
    exact = parse_bool(force_size, "force_size")
    is_cloud = parse_bool(cloud, "cloud")
    if subformat is None:
        subformat = "fixed" if is_cloud else "dynamic"
    subformat = parse_choice(str(subformat), "subformat", ("dynamic", "fixed"))
    if is_cloud:
        if subformat != "fixed":
            raise FormatError("vpc: cloud=on needs subformat=fixed (Azure takes fixed VHDs only)")
        size = -(-size // (1 << 20)) << 20
        exact = True
    bsize = DEFAULT_BLOCK_SIZE if block_size is None else parse_size(block_size, "block_size")
    if bsize < SECTOR or bsize > MAX_BLOCK_SIZE or bsize & (bsize - 1):
        raise FormatError(f"vpc: block_size {bsize} is not a power of two in 512..256M")
    if backing_fmt is not None and backing_file is None:
        raise FormatError("vpc: backing_fmt needs backing_file")
    if backing_file is not None:
        if subformat == "fixed" or is_cloud:
            raise FormatError("vpc: a differencing disk cannot be fixed")
        if backing_fmt is not None and backing_fmt not in ("vpc", "vhd"):
            raise FormatError(f"vpc: a differencing disk's parent must be a VHD, not {backing_fmt}")
    vsize, chs = size_for(size, exact=exact)
    if vsize > MAX_SIZE:
        raise FormatError(f"vpc: {size} bytes is larger than the VHD maximum of 2040 GiB")
    # creator "qem2" only where the size is not the CHS capacity: elsewhere both agree
    exact = exact and vsize != chs_bytes(chs)
    try:
        uid = uuid.UUID(unique_id).bytes if unique_id is not None else None
    except ValueError:
        raise FormatError(f"vpc: invalid unique_id {unique_id!r}") from None
    if subformat == "fixed":
        return _create_fixed(path, vsize, chs, exact=exact, uid=uid)
    return _create_sparse(
        path,
        vsize,
        chs,
        bsize,
        exact=exact,
        backing_file=backing_file,
        final_path=final_path,
        uid=uid,
    )


def _create_fixed(path: str, size: int, chs, *, exact: bool, uid: bytes | None = None) -> Image:
    fields = _new_footer(size, chs, DISK_FIXED, exact=exact, uid=uid)
    raw = with_checksum(Footer, fields, FOOTER_CHECKSUM_AT)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        pwrite_all(fd, raw, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return FixedVhd(path, fd, Footer.parse(raw), size, size, writable=True)


def _locator_blob(code: bytes, text: str) -> bytes:
    return text.encode("utf-8" if code == MACX else "utf-16-le")


def _create_sparse(
    path: str,
    size: int,
    chs,
    block_size: int,
    *,
    exact: bool,
    backing_file: str | None,
    final_path: str | None,
    uid: bytes | None = None,
) -> Image:
    entries = max(1, -(-size // block_size))
    table_offset = FOOTER_SIZE + HEADER_SIZE
    bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
    locators: list[tuple[bytes, bytes]] = []
    parent_fields: dict[str, Any] = {
        "parent_unique_id": bytes(16),
        "parent_time_stamp": 0,
        "parent_unicode_name": bytes(512),
    }
    disk_type = DISK_DYNAMIC
    if backing_file is not None:
        disk_type = DISK_DIFFERENCING
        parent_fields, locators = _parent_fields(backing_file, final_path or path)
    pos = table_offset + bat_bytes
    entries_out = []
    blobs = []
    for code, blob in locators:
        space = -(-len(blob) // SECTOR) * SECTOR
        entries_out.append(
            {
                "platform_code": code,
                # bytes, as Windows writes it (the specification says sectors)
                "platform_data_space": space,
                "platform_data_length": len(blob),
                "reserved": 0,
                "platform_data_offset": pos,
            }
        )
        blobs.append((pos, blob))
        pos += space
    while len(entries_out) < 8:
        entries_out.append(
            {
                "platform_code": bytes(4),
                "platform_data_space": 0,
                "platform_data_length": 0,
                "reserved": 0,
                "platform_data_offset": 0,
            }
        )
    header_fields = {
        "cookie": HEADER_COOKIE,
        "data_offset": NO_OFFSET,
        "table_offset": table_offset,
        "header_version": 0x0001_0000,
        "max_table_entries": entries,
        "block_size": block_size,
        "checksum": 0,
        **parent_fields,
        "reserved1": 0,
        "parent_locator_entries": entries_out,
        "reserved2": bytes(256),
    }
    hraw = with_checksum(DynamicHeader, header_fields, HEADER_CHECKSUM_AT)
    fields = _new_footer(size, chs, disk_type, exact=exact, uid=uid)
    fraw = with_checksum(Footer, fields, FOOTER_CHECKSUM_AT)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        pwrite_all(fd, fraw + hraw + b"\xff" * bat_bytes, 0)
        for off, blob in blobs:
            pwrite_all(fd, blob, off)
        first_block = pos
        pwrite_all(fd, fraw, first_block)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    bat = np.full(entries, UNALLOCATED, np.uint32)
    img = SparseVhd(
        path, fd, Footer.parse(fraw), DynamicHeader.parse(hraw), bat, size, writable=True
    )
    img.next_free = first_block
    if backing_file is not None:
        # partial writes read the parent's sectors they do not cover: the user named this
        # parent, so it is opened as named rather than confined like a locator
        try:
            img.backing = _open_named_parent(backing_file, final_path or path)
        except BaseException:
            img.writable = False
            img.close()
            os.unlink(path)
            raise
        img.parent_name = backing_file
    return img


def _open_named_parent(backing_file: str, child_path: str) -> Image:
    from . import open_image as open_any

    base = os.path.dirname(os.path.abspath(child_path))
    parent_path = os.path.join(base, backing_file)
    return open_any(parent_path, FORMAT, policy=BackingPolicy().descend(child_path))


def _parent_fields(backing_file: str, child_path: str) -> tuple[dict, list[tuple[bytes, bytes]]]:
    from . import open_image as open_any

    base = os.path.dirname(os.path.abspath(child_path))
    parent_path = os.path.join(base, backing_file)
    try:
        with open_any(parent_path, "vpc", policy=BackingPolicy(allow=True)) as parent:
            pfooter = parent.footer  # type: ignore[attr-defined]
    except FormatError as exc:
        raise FormatError(f"vpc: the parent of a differencing disk must be a VHD: {exc}") from exc
    rel = os.path.relpath(os.path.abspath(parent_path), base)
    mtime = int(os.stat(parent_path).st_mtime) - VHD_EPOCH
    name = os.path.basename(parent_path).encode("utf-16-be")[:510]
    fields = {
        "parent_unique_id": bytes(pfooter.unique_id),
        "parent_time_stamp": max(0, mtime) & 0xFFFF_FFFF,
        "parent_unicode_name": name + bytes(512 - len(name)),
    }
    win_rel = ".\\" + rel.replace("/", "\\") if not rel.startswith("..") else rel.replace("/", "\\")
    url = "file://" + urllib.parse.quote(os.path.abspath(parent_path))
    locators = [(W2RU, _locator_blob(W2RU, win_rel)), (MACX, _locator_blob(MACX, url))]
    return fields, locators

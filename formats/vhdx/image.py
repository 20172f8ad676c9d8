"""VHDX images: reading fixed, dynamic and differencing disks; writing all three.

Behaviour over the declarations in layout.py, following [MS-VHDX] v1.0. Payload block b
is BAT entry b + b // chunk_ratio; the sector bitmap block of chunk c is entry
c * (chunk_ratio + 1) + chunk_ratio. In a sector bitmap, bit i (least significant bit
first) says logical sector i of the chunk is in this file rather than the parent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..backing import BackingPolicy, open_backing, resolve
from ..blocks import BlockImage, bitmap_runs, placement_problems
from ..errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from ..extents import Extent, Kind, from_cluster_kinds, runs
from ..fileio import file_size, preadinto, punch_hole, pwrite_all
from ..image import CheckResult, Image, Location
from ..options import parse_bool, parse_choice, parse_size
from . import layout as L
from .log import Overlay, find_replay, validate

FORMAT = "vhdx"
CREATOR = "p2v"
MAX_LOG = 256 * L.MiB
MAX_METADATA_REGION = 256 * L.MiB
MAX_BAT_REGION = 2048 * L.MiB
MAX_LOCATOR = 64 * L.KiB

#: payload states that read as zeros (in a differencing disk too)
ZERO_STATES = (
    L.PAYLOAD_BLOCK_UNDEFINED,
    L.PAYLOAD_BLOCK_ZERO,
    L.PAYLOAD_BLOCK_UNMAPPED,
    L.PAYLOAD_BLOCK_UNMAPPED_V095,
)
PRESENT_STATES = (L.PAYLOAD_BLOCK_FULLY_PRESENT, L.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
#: how a write treats zero runs: written (old space), skipped (fresh), punched (ours)
OLD, FRESH, OURS = 0, 1, 2


def _guid_str(raw: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=bytes(raw))).upper() + "}"


class VhdxImage(BlockImage):
    format = FORMAT
    bitmap_cache = 4096  # a 32 MiB block's bitmap is 64 KiB as bools

    def __init__(self, path: str, fd: int, *, writable: bool) -> None:
        super().__init__(path, 0, writable=writable)
        self.fd = fd
        self.overlay = Overlay([])
        self.parent_name: str | None = None
        self.parent_locator: dict[str, str] = {}
        self._dirty = False
        self._header_bumped = False
        self.replayed_entries = 0
        self.created = False
        self._ours: set[int] = set()  # blocks allocated by this writer
        # set by _load() or create()
        self.header: Any = None
        self.creator = ""
        self.disk_id: str | None = None
        self.bat_offset = 0
        self.data_start = L.MiB
        self.next_free = 0

    # -- file access through the replayed log -------------------------------
    def _pread(self, offset: int, n: int, what: str) -> bytes:
        buf = bytearray(n)
        got = preadinto(self.fd, memoryview(buf), offset)
        if got < n and not self.overlay:
            raise CorruptImage(
                f"vhdx: {what} at {offset:#x} (+{n:#x}) runs past the end of the file"
            )
        if self.overlay:
            self.overlay.apply(offset, memoryview(buf))
        return bytes(buf)

    # -- geometry --------------------------------------------------------------
    def _setup(
        self,
        *,
        block_size: int,
        lss: int,
        pss: int,
        size: int,
        has_parent: bool,
        leave_allocated: bool,
    ) -> None:
        self.size = size
        self.block_size = block_size
        self.logical_sector_size = lss
        self.physical_sector_size = pss
        self.has_parent = has_parent
        self.leave_allocated = leave_allocated
        self.chunk_ratio = L.chunk_ratio(block_size, lss)
        self.blocks = -(-size // block_size)
        self.sectors_per_block = block_size // lss
        self.bat_entries = L.bat_entry_count(size, block_size, lss, has_parent)
        b = np.arange(self.blocks, dtype=np.int64)
        self.payload_index = b + b // self.chunk_ratio
        # fixed disks write straight to preallocated blocks: zeros are detected finely
        self.cluster_size = 65536 if leave_allocated and not has_parent else block_size

    def _load_bat(self, bat: np.ndarray) -> None:
        self.bat = bat.astype(np.uint64)
        payload = self.bat[self.payload_index]
        self.states = (payload & L.STATE_MASK).astype(np.uint8)
        self.offsets = (payload & np.uint64(L.OFFSET_MASK)).astype(np.int64)

    def _set_block(self, b: int, state: int, offset: int) -> None:
        self.states[b] = state
        self.offsets[b] = offset
        self.bat[self.payload_index[b]] = np.uint64(offset | state)
        self._dirty = True

    # -- reading ---------------------------------------------------------------
    def _read_bitmap(self, b: int) -> np.ndarray:
        chunk, k = divmod(b, self.chunk_ratio)
        entry = int(self.bat[chunk * (self.chunk_ratio + 1) + self.chunk_ratio])
        nbytes = self.sectors_per_block // 8
        if entry & L.STATE_MASK != L.SB_BLOCK_PRESENT:
            return np.zeros(self.sectors_per_block, bool)
        off = (entry & L.OFFSET_MASK) + k * nbytes
        raw = self._pread(off, nbytes, f"sector bitmap of block {b}")
        return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").astype(bool)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._guard()
        bs = self.block_size
        pos, done, total = offset, 0, len(buf)
        run_file = run_at = run_len = -1  # pending contiguous file read
        while done < total:
            b, within = divmod(pos, bs)
            n = min(bs - within, total - done)
            state = int(self.states[b])
            foff = -1
            if state == L.PAYLOAD_BLOCK_FULLY_PRESENT or (
                state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self._bitmap(b) is None
            ):
                foff = int(self.offsets[b]) + within
            if foff >= 0 and run_file >= 0 and run_file + run_len == foff:
                run_len += n
            else:
                if run_file >= 0:
                    self._file_read(run_file, buf[run_at : run_at + run_len])
                    run_file = -1
                part = buf[done : done + n]
                if foff >= 0:
                    run_file, run_at, run_len = foff, done, n
                elif state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    self._read_partial(b, pos, part)
                elif state == L.PAYLOAD_BLOCK_NOT_PRESENT:
                    self._absent(pos, part)
                else:
                    part[:] = bytes(n)
            pos += n
            done += n
        if run_file >= 0:
            self._file_read(run_file, buf[run_at : run_at + run_len])

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        self._guard()
        for pos, b, within, step in self._blocks(offset, n):
            state = int(self.states[b])
            present = state == L.PAYLOAD_BLOCK_FULLY_PRESENT or (
                state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self._bitmap(b) is None
            )
            # a log replayed in memory (a read-only open) changes bytes the file still holds
            if present and not self.overlay:
                yield Location(pos, step, self.fd, int(self.offsets[b]) + within)
            else:
                yield Location(pos, step)

    def _file_read(self, foff: int, part: memoryview) -> None:
        preadinto(self.fd, part, foff)
        if self.overlay:
            self.overlay.apply(foff, part)

    def _read_partial(self, b: int, pos: int, part: memoryview) -> None:
        bits = self._bitmap(b)
        lss = self.logical_sector_size
        within = pos % self.block_size
        first, last = within // lss, -(-(within + len(part)) // lss)
        sel = bits[first:last] if bits is not None else np.ones(last - first, bool)
        for s, count, present in bitmap_runs(sel):
            a = max((first + s) * lss, within)
            z = min((first + s + count) * lss, within + len(part))
            piece = part[a - within : z - within]
            if present:
                self._file_read(int(self.offsets[b]) + a, piece)
            else:
                self._absent(pos - within + a, piece)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        self._guard()
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        st = self.states[first:last]
        present = np.isin(st, PRESENT_STATES)
        if self.backing is None:
            yield from from_cluster_kinds(present.astype(np.uint8), bs, first * bs, start, end)
            return
        # 2 = ask the parent (not present in this file)
        kinds = np.where(present, 1, np.where(st == L.PAYLOAD_BLOCK_NOT_PRESENT, 2, 0))
        for i, count, value in runs(kinds):
            s = max((first + i) * bs, start)
            e = min((first + i + count) * bs, end)
            if value != 2:
                yield Extent(s, e - s, Kind(value))
                continue
            stop = min(e, self.backing.size)
            if s < stop:
                yield from self.backing.extents(s, stop)
            if max(s, stop) < e:
                yield Extent(max(s, stop), e - max(s, stop), Kind.ZERO)

    # -- writing ---------------------------------------------------------------
    def _allocate(self, nbytes: int) -> int:
        off = self.next_free
        self.next_free = off + -(-nbytes // L.ALIGN) * L.ALIGN
        return off

    def _bump_header(self) -> None:
        """New FileWriteGuid/DataWriteGuid before the first change (2.2.2)."""
        if self._header_bumped:
            return
        self._header_bumped = True
        if self.created:
            return
        self.write_headers(log_guid=bytes(16))

    def write_headers(self, *, log_guid: bytes) -> None:
        h = dict(self.header)
        h.pop("_io", None)
        h["file_write_guid"] = uuid.uuid4().bytes_le
        h["data_write_guid"] = uuid.uuid4().bytes_le
        h["log_guid"] = log_guid
        for slot in (0, 1):  # both, each with a higher sequence number than before
            h["sequence_number"] = self.header.sequence_number + 1 + slot
            raw = bytearray(L.Header.build({**h, "checksum": 0}))
            raw += bytes(L.HEADER_SIZE - len(raw))
            pwrite_all(self.fd, L.seal(raw), L.HEADER_OFFSETS[slot])
            os.fsync(self.fd)
        self.header = L.Header.parse(raw)

    def _write(self, offset: int, data: memoryview) -> None:
        self._guard()
        self._bump_header()
        end = offset + len(data)
        lss = self.logical_sector_size
        if self.has_parent and (offset % lss or end % lss):
            # bitmap bits cover whole sectors: merge the partial edge sectors first
            a = offset - offset % lss
            z = min(-(-end // lss) * lss, self.size)
            merged = bytearray(self.read(a, z - a))
            merged[offset - a : offset - a + len(data)] = data
            offset, data, end = a, memoryview(merged), a + len(merged)
        bs = self.block_size
        pos, done = offset, 0
        run = None  # [file offset, position in data, length, how]
        while done < len(data):
            b, within = divmod(pos, bs)
            n = min(bs - within, len(data) - done)
            off, fresh = self._block_for_write(b, within, n)
            how = FRESH if fresh else OURS if b in self._ours else OLD
            if fresh:
                self._ours.add(b)
            foff = off + within
            if run is not None and run[0] + run[2] == foff and run[3] == how:
                run[2] += n
            else:
                if run is not None:
                    self._store(data, *run)
                run = [foff, done, n, how]
            pos += n
            done += n
        if run is not None:
            self._store(data, *run)

    def _store(self, data: memoryview, foff: int, at: int, n: int, how: int) -> None:
        part = data[at : at + n]
        if how == OLD:
            self._pwrite(self.fd, part, foff)
            return
        # space this writer allocated: zero runs stay holes (fresh space) or become holes
        # (space an earlier call wrote: a block can be larger than the engine's chunk)
        pos = 0
        for a, z in self._nonzero_runs(data, at, n):
            if how == OURS and a > pos:
                self._zero_file(foff + pos, a - pos)
            self._pwrite(self.fd, part[a:z], foff + a)
            pos = z
        if how == OURS and pos < n:
            self._zero_file(foff + pos, n - pos)

    def _zero_file(self, foff: int, n: int) -> None:
        if not punch_hole(self.fd, foff, n):
            pwrite_all(self.fd, bytes(n), foff)

    def _block_for_write(self, b: int, within: int, n: int) -> tuple[int, bool]:
        """(file offset of block b, whether its space is fresh zeros), allocating the block
        and marking the written sectors."""
        state = int(self.states[b])
        whole = within == 0 and n == self.block_size
        if state == L.PAYLOAD_BLOCK_FULLY_PRESENT:
            return int(self.offsets[b]), False
        if state in ZERO_STATES or (state == L.PAYLOAD_BLOCK_NOT_PRESENT and not self.has_parent):
            # the rest of the block must read as zeros: fresh space past the end is zeros,
            # space a zero block kept (fixed disks, trimmed blocks) is cleared first
            off = int(self.offsets[b]) if state == L.PAYLOAD_BLOCK_ZERO else 0
            if off and off >= self.data_start and off + self.block_size <= self.next_free:
                if not punch_hole(self.fd, off, self.block_size):
                    pwrite_all(self.fd, bytes(self.block_size), off)
            else:
                off = self._allocate(self.block_size)
            self._set_block(b, L.PAYLOAD_BLOCK_FULLY_PRESENT, off)
            return off, True
        if state == L.PAYLOAD_BLOCK_NOT_PRESENT:
            off = self._allocate(self.block_size)
            self._set_block(
                b,
                L.PAYLOAD_BLOCK_FULLY_PRESENT if whole else L.PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                off,
            )
            if not whole:
                self._bitmaps[b] = np.zeros(self.sectors_per_block, bool)
                self._mark(b, within, n)
            return off, True
        if state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            self._mark(b, within, n)
            return int(self.offsets[b]), False
        raise CorruptImage(f"vhdx: block {b} has unknown state {state}")

    def _mark(self, b: int, within: int, n: int) -> None:
        """Set the sector bitmap bits of [within, within + n) in block b."""
        bits = self._bitmap(b)
        if bits is None:
            return
        lss = self.logical_sector_size
        bits = bits.copy()
        bits[within // lss : -(-(within + n) // lss)] = True
        chunk, k = divmod(b, self.chunk_ratio)
        sb_index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio
        entry = int(self.bat[sb_index])
        if entry & L.STATE_MASK != L.SB_BLOCK_PRESENT:
            off = self._allocate(L.SECTOR_BITMAP_BLOCK)
            self.bat[sb_index] = np.uint64(off | L.SB_BLOCK_PRESENT)
            self._dirty = True
            entry = off | L.SB_BLOCK_PRESENT
        nbytes = self.sectors_per_block // 8
        packed = np.packbits(bits, bitorder="little").tobytes()
        pwrite_all(self.fd, packed, (entry & L.OFFSET_MASK) + k * nbytes)
        if bits.all():
            self._set_block(b, L.PAYLOAD_BLOCK_FULLY_PRESENT, int(self.offsets[b]))
            self._bitmaps[b] = None
        else:
            self._bitmaps[b] = bits

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._guard()
        bs = self.block_size
        for pos, b, within, step in self._blocks(offset, n):
            state = int(self.states[b])
            whole = within == 0 and (step == bs or pos + step == self.size)
            if state in ZERO_STATES or (
                state == L.PAYLOAD_BLOCK_NOT_PRESENT and not self.has_parent
            ):
                pass  # already reads as zeros
            elif whole and state == L.PAYLOAD_BLOCK_NOT_PRESENT:
                # a fresh block reads as zeros without a write; the ZERO state would be
                # shorter, but libvhdi reads it from the parent
                self._bump_header()
                self._block_for_write(b, 0, bs)  # fresh space: nothing to write
            elif state == L.PAYLOAD_BLOCK_FULLY_PRESENT:
                foff = int(self.offsets[b]) + within
                if not punch_hole(self.fd, foff, step):
                    pwrite_all(self.fd, bytes(step), foff)
            else:
                super()._write_zeroes(pos, step)

    def flush(self) -> None:
        if not self.writable or self.closed:
            return
        if self._dirty:
            pwrite_all(self.fd, self.bat.astype("<u8").tobytes(), self.bat_offset)
            if file_size(self.fd) < self.next_free:
                os.ftruncate(self.fd, self.next_free)
            self._dirty = False
        self._sync(self.fd)

    def _close(self) -> None:
        os.close(self.fd)

    # -- metadata ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        sub = "fixed" if self.leave_allocated else "dynamic"
        if self.has_parent:
            sub = "differencing"
        out: dict[str, Any] = {
            "subformat": sub,
            "disk-type": sub,
            "creator": self.creator,
            "block-size": self.block_size,
            "cluster-size": self.block_size,
            "logical-sector-size": self.logical_sector_size,
            "physical-sector-size": self.physical_sector_size,
            "log-size": self.header.log_length,
            "allocated-blocks": int(np.count_nonzero(np.isin(self.states, PRESENT_STATES))),
            "virtual-disk-id": self.disk_id,
        }
        if self.replayed_entries:
            out["log-replayed-entries"] = self.replayed_entries
        if self.has_parent:
            out["parent"] = self.backing.path if self.backing is not None else None
            out["parent-name"] = self.parent_name
            out["parent-locator"] = dict(self.parent_locator)
        return out

    def check(self) -> CheckResult:
        res = CheckResult()
        for m in self.problems + bat_problems(self):
            if m not in res.corruptions:
                res.corruptions.append(m)
        return res


def bat_problems(img: VhdxImage) -> list[str]:
    """Present blocks past the end of the file, inside the metadata, or overlapping."""
    fsize = max(file_size(img.fd), img.overlay.highest if img.overlay else 0)
    idx = np.flatnonzero(np.isin(img.states, PRESENT_STATES))
    return placement_problems(
        "vhdx",
        idx,
        img.offsets[idx],
        img.block_size,
        (img.data_start, fsize),
        entry="BAT entry for block",
        area_name="payload area",
    )


# ---------------------------------------------------------------------------------------
# opening


def open_image(path: str, *, writable: bool = False, policy: BackingPolicy | None = None) -> Image:
    policy = policy or BackingPolicy()
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    img = VhdxImage(path, fd, writable=writable)
    try:
        _load(img, policy)
    except BaseException:
        img.writable = False
        img.close()
        raise
    return img


def _read_headers(img: VhdxImage, fsize: int) -> Any:
    if fsize < 1 * L.MiB:
        raise CorruptImage(f"vhdx: {img.path}: {fsize} bytes is too short for a VHDX file")
    ident = L.FileIdentifier.parse(img._pread(0, 520, "file identifier"))
    if ident.signature != L.FILE_SIGNATURE:
        raise CorruptImage(f"vhdx: {img.path}: expected 'vhdxfile' at 0, found {ident.signature!r}")
    img.creator = ident.creator.decode("utf-16-le", "replace").split("\0", 1)[0]
    best = None
    seen = []
    for at in L.HEADER_OFFSETS:
        raw = img._pread(at, L.HEADER_SIZE, "header")
        h = L.Header.parse(raw)
        if h.signature != L.HEADER_SIGNATURE or L.checksum(raw) != h.checksum:
            seen.append(
                f"{at:#x}: {'bad signature' if h.signature != L.HEADER_SIGNATURE else 'bad checksum'}"
            )
            continue
        if best is None or h.sequence_number > best.sequence_number:
            best = h
    if best is None:
        raise CorruptImage(f"vhdx: {img.path}: no valid header ({'; '.join(seen)})")
    if best.version != 1:
        raise UnsupportedFeature(f"vhdx: {img.path}: header version {best.version} (only 1)")
    return best


def _replay_log(img: VhdxImage, h, fsize: int) -> None:
    if h.log_guid == bytes(16):
        return
    if h.log_version != 0:
        raise UnsupportedFeature(
            f"vhdx: {img.path}: the log (version {h.log_version}) holds unreplayed changes "
            "in a format we cannot replay"
        )
    if (
        h.log_offset % L.MiB
        or h.log_length % L.MiB
        or h.log_length == 0
        or h.log_offset < L.MiB
        or h.log_length > MAX_LOG
        or h.log_offset + h.log_length > fsize
    ):
        raise CorruptImage(
            f"vhdx: {img.path}: log at {h.log_offset:#x} (+{h.log_length:#x}) holds unreplayed "
            f"changes but lies outside the file ({fsize:#x}); refusing to read stale data"
        )
    log = img._pread(h.log_offset, h.log_length, "log")
    replay = find_replay(log, bytes(h.log_guid))
    if replay is None:
        # no valid entry carries this log's GUID: nothing was logged that needs replaying
        if img.writable:
            img.header = h
            img.write_headers(log_guid=bytes(16))
            img._header_bumped = True
        return
    validate(replay, file_size=fsize, log_offset=h.log_offset, log_length=h.log_length)
    img.replayed_entries = replay.entries
    if img.writable:
        for w in replay.writes:
            pwrite_all(img.fd, w.data if w.data is not None else bytes(w.length), w.offset)
        if file_size(img.fd) < replay.last_file_offset:
            os.ftruncate(img.fd, replay.last_file_offset)
        os.fsync(img.fd)
        img.header = h
        img.write_headers(log_guid=bytes(16))
        img._header_bumped = True
    else:
        img.overlay = Overlay(replay.writes)


def _regions(img: VhdxImage, fsize: int) -> dict[bytes, Any]:
    errors = []
    for at in L.REGION_TABLE_OFFSETS:
        raw = img._pread(at, L.REGION_TABLE_SIZE, "region table")
        rh = L.RegionTableHeader.parse(raw)
        if rh.signature != L.REGION_SIGNATURE:
            errors.append(f"{at:#x}: bad signature")
            continue
        if L.checksum(raw) != rh.checksum:
            errors.append(f"{at:#x}: bad checksum")
            continue
        if rh.entry_count > L.MAX_REGION_ENTRIES:
            errors.append(f"{at:#x}: {rh.entry_count} entries")
            continue
        regions = {}
        for i in range(rh.entry_count):
            e = L.RegionTableEntry.parse(raw[16 + 32 * i : 48 + 32 * i])
            if e.guid in (L.BAT_REGION, L.METADATA_REGION):
                regions[bytes(e.guid)] = e
            elif e.flags & L.REGION_IS_REQUIRED:
                raise UnsupportedFeature(
                    f"vhdx: {img.path}: required region {_guid_str(e.guid)} is not known"
                )
        for key, name in ((L.BAT_REGION, "BAT"), (L.METADATA_REGION, "metadata")):
            e = regions.get(key)
            if e is None:
                raise CorruptImage(f"vhdx: {img.path}: no {name} region")
            if e.file_offset % L.MiB or e.file_offset < L.MiB or e.file_offset + e.length > fsize:
                raise CorruptImage(
                    f"vhdx: {img.path}: {name} region at {e.file_offset:#x} (+{e.length:#x}) is "
                    f"not 1 MiB aligned inside the file ({fsize:#x})"
                )
        return regions
    raise CorruptImage(f"vhdx: {img.path}: no valid region table ({'; '.join(errors)})")


def _metadata(img: VhdxImage, region) -> dict[bytes, bytes]:
    if region.length < L.METADATA_TABLE_SIZE or region.length > MAX_METADATA_REGION:
        raise CorruptImage(f"vhdx: {img.path}: metadata region of {region.length} bytes")
    data = img._pread(region.file_offset, region.length, "metadata region")
    th = L.MetadataTableHeader.parse(data)
    if th.signature != L.METADATA_SIGNATURE:
        raise CorruptImage(f"vhdx: {img.path}: metadata table signature is {th.signature!r}")
    if th.entry_count > L.MAX_METADATA_ENTRIES:
        raise CorruptImage(f"vhdx: {img.path}: {th.entry_count} metadata entries")
    items = {}
    for i in range(th.entry_count):
        e = L.MetadataTableEntry.parse(data[32 + 32 * i : 64 + 32 * i])
        if e.length and (e.offset < L.METADATA_TABLE_SIZE or e.offset + e.length > region.length):
            raise CorruptImage(
                f"vhdx: {img.path}: metadata item {_guid_str(e.item_id)} at +{e.offset:#x} "
                f"(+{e.length:#x}) is outside the metadata region"
            )
        known = (
            L.FILE_PARAMETERS,
            L.VIRTUAL_DISK_SIZE,
            L.VIRTUAL_DISK_ID,
            L.LOGICAL_SECTOR_SIZE,
            L.PHYSICAL_SECTOR_SIZE,
            L.PARENT_LOCATOR,
        )
        if e.item_id not in known and e.flags & L.META_IS_REQUIRED:
            raise UnsupportedFeature(
                f"vhdx: {img.path}: required metadata item {_guid_str(e.item_id)} is not known"
            )
        items[bytes(e.item_id)] = data[e.offset : e.offset + e.length]
    return items


def _item(img: VhdxImage, items: dict[bytes, bytes], key: bytes, struct, name: str):
    raw = items.get(key)
    if raw is None or len(raw) < struct.sizeof():
        raise CorruptImage(f"vhdx: {img.path}: metadata item {name} is missing or short")
    return struct.parse(raw)


def _load(img: VhdxImage, policy: BackingPolicy) -> None:
    fsize = file_size(img.fd)
    h = _read_headers(img, fsize)
    img.header = h
    _replay_log(img, h, fsize)
    fsize = max(file_size(img.fd), img.overlay.highest if img.overlay else 0)
    regions = _regions(img, fsize)
    items = _metadata(img, regions[L.METADATA_REGION])
    params = _item(img, items, L.FILE_PARAMETERS, L.FileParameters, "file parameters")
    size = _item(img, items, L.VIRTUAL_DISK_SIZE, L.VirtualDiskSize, "virtual disk size")
    size = size.virtual_disk_size
    lss = _item(img, items, L.LOGICAL_SECTOR_SIZE, L.SectorSize, "logical sector size").sector_size
    pss_raw = items.get(L.PHYSICAL_SECTOR_SIZE)
    pss = L.SectorSize.parse(pss_raw).sector_size if pss_raw and len(pss_raw) >= 4 else lss
    disk_id = items.get(L.VIRTUAL_DISK_ID, b"")
    img.disk_id = _guid_str(disk_id[:16]) if len(disk_id) >= 16 else None
    bs = params.block_size
    if bs < L.MIN_BLOCK or bs > L.MAX_BLOCK or bs & (bs - 1):
        raise CorruptImage(f"vhdx: {img.path}: block size {bs} is not a power of two in 1M..256M")
    if lss not in (512, 4096):
        raise CorruptImage(f"vhdx: {img.path}: logical sector size {lss} (512 or 4096)")
    if size == 0 or size > L.MAX_SIZE or size % lss:
        raise CorruptImage(f"vhdx: {img.path}: virtual size {size} is invalid")
    has_parent = bool(params.flags & L.HAS_PARENT)
    img._setup(
        block_size=bs,
        lss=lss,
        pss=pss,
        size=size,
        has_parent=has_parent,
        leave_allocated=bool(params.flags & L.LEAVE_BLOCKS_ALLOCATED),
    )
    bat_region = regions[L.BAT_REGION]
    if bat_region.length < img.bat_entries * 8 or bat_region.length > MAX_BAT_REGION:
        raise CorruptImage(
            f"vhdx: {img.path}: BAT region of {bat_region.length} bytes cannot hold "
            f"{img.bat_entries} entries"
        )
    img.bat_offset = bat_region.file_offset
    raw = img._pread(bat_region.file_offset, img.bat_entries * 8, "BAT")
    img._load_bat(np.frombuffer(raw, "<u8"))
    meta = regions[L.METADATA_REGION]
    # payload may sit anywhere past the header section that no region or log claims
    img.data_start = L.MiB
    reserved = [
        (bat_region.file_offset, bat_region.length),
        (meta.file_offset, meta.length),
        (h.log_offset, h.log_length),
    ]
    img.problems = _overlaps_metadata(img, reserved) + bat_problems(img)
    unknown = np.flatnonzero(~np.isin(img.states, (*PRESENT_STATES, *ZERO_STATES, 0)))
    if len(unknown):
        b = int(unknown[0])
        img.problems.append(f"vhdx: block {b} has invalid BAT state {int(img.states[b])}")
    if not has_parent and np.any(img.states == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
        img.problems.append("vhdx: a disk without parent has partially present blocks")
    ends = [img.data_start] + [o + n for o, n in reserved]
    present = img.offsets[np.isin(img.states, PRESENT_STATES)]
    if len(present):
        ends.append(int(present.max()) + bs)
    sb = img.bat[img.chunk_ratio :: img.chunk_ratio + 1] if has_parent else np.empty(0, np.uint64)
    sb_present = sb[(sb & np.uint64(L.STATE_MASK)) == L.SB_BLOCK_PRESENT]
    if len(sb_present):
        ends.append(int((sb_present & np.uint64(L.OFFSET_MASK)).max()) + L.SECTOR_BITMAP_BLOCK)
    img.next_free = -(-max(*ends, fsize) // L.ALIGN) * L.ALIGN
    if has_parent:
        _open_parent(img, items.get(L.PARENT_LOCATOR), policy)


def _overlaps_metadata(img: VhdxImage, reserved: list[tuple[int, int]]) -> list[str]:
    out = []
    idx = np.flatnonzero(np.isin(img.states, PRESENT_STATES))
    offs = img.offsets[idx]
    for start, length in reserved:
        hit = np.flatnonzero((offs < start + length) & (offs + img.block_size > start))
        for i in hit[:4].tolist():
            out.append(
                f"vhdx: block {int(idx[i])} at {int(offs[i]):#x} overlaps metadata at "
                f"{start:#x} (+{length:#x})"
            )
    return out


def _parse_locator(img: VhdxImage, raw: bytes | None) -> dict[str, str]:
    if raw is None or len(raw) < 20:
        raise CorruptImage(f"vhdx: {img.path}: differencing disk without a parent locator")
    lh = L.ParentLocatorHeader.parse(raw)
    if lh.locator_type != L.VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedFeature(
            f"vhdx: {img.path}: parent locator type {_guid_str(lh.locator_type)} is not VHDX"
        )
    out = {}
    for i in range(lh.key_value_count):
        at = 20 + 12 * i
        if at + 12 > len(raw):
            raise CorruptImage(f"vhdx: {img.path}: parent locator entries run past the item")
        e = L.ParentLocatorEntry.parse(raw[at : at + 12])
        for off, n in ((e.key_offset, e.key_length), (e.value_offset, e.value_length)):
            if off + n > len(raw) or n > MAX_LOCATOR:
                raise CorruptImage(f"vhdx: {img.path}: parent locator entry {i} is out of range")
        try:
            key = raw[e.key_offset : e.key_offset + e.key_length].decode("utf-16-le")
            value = raw[e.value_offset : e.value_offset + e.value_length].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise CorruptImage(f"vhdx: {img.path}: parent locator entry {i} is not UTF-16") from exc
        # the specification says no terminators; tolerate writers that add them
        out[key.rstrip("\0")] = value.rstrip("\0")
    return out


def _open_parent(img: VhdxImage, raw: bytes | None, policy: BackingPolicy) -> None:
    loc = _parse_locator(img, raw)
    img.parent_locator = loc
    candidates = []
    if loc.get(L.RELATIVE_PATH):
        candidates.append(loc[L.RELATIVE_PATH].replace("\\", "/"))
    for key in (L.ABSOLUTE_WIN32_PATH, L.VOLUME_PATH):
        if loc.get(key):
            # a Windows path means nothing here; its file name beside the child might
            candidates.append(loc[key].replace("\\", "/").rsplit("/", 1)[-1])
    if not candidates:
        raise CorruptImage(f"vhdx: {img.path}: parent locator names no path")
    img.parent_name = candidates[0]
    if not policy.allow:
        return
    linkage = {loc.get(L.PARENT_LINKAGE, "").upper(), loc.get(L.PARENT_LINKAGE2, "").upper()}
    child = img.path or ""
    for name in candidates:
        real = resolve(child, name, policy)  # UnsafeImage on escapes and cycles
        if not os.path.exists(real):
            continue
        parent = open_backing(child, name, FORMAT, policy)
        pguid = _guid_str(parent.header.data_write_guid)  # type: ignore[attr-defined]
        if pguid not in linkage:
            parent.close()
            raise UnsafeImage(
                f"vhdx: {img.path}: parent {real} has DataWriteGuid {pguid}, the child was made "
                f"from {loc.get(L.PARENT_LINKAGE)}: the parent changed since"
            )
        img.backing = parent
        return
    raise FormatError(f"vhdx: {img.path}: parent not found (tried {', '.join(candidates)})")


# ---------------------------------------------------------------------------------------
# creating


def default_block_size(size: int) -> int:
    """qemu's choice, so images match what users get from qemu-img."""
    if size > 32 << 40:
        return 64 * L.MiB
    if size > 100 << 30:
        return 32 * L.MiB
    if size > 1 << 30:
        return 16 * L.MiB
    return 8 * L.MiB


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def _locator_item(entries: dict[str, str]) -> bytes:
    head = L.ParentLocatorHeader.build(
        {"locator_type": L.VHDX_PARENT_LOCATOR_TYPE, "reserved": 0, "key_value_count": len(entries)}
    )
    table = b""
    blob = b""
    base = len(head) + 12 * len(entries)
    for key, value in entries.items():
        k, v = _utf16(key), _utf16(value)
        table += L.ParentLocatorEntry.build(
            {
                "key_offset": base + len(blob),
                "value_offset": base + len(blob) + len(k),
                "key_length": len(k),
                "value_length": len(v),
            }
        )
        blob += k + v
    return head + table + blob


def create(
    path: str,
    size: int,
    *,
    final_path: str | None = None,
    subformat: str = "dynamic",
    block_size: int | str | None = None,
    log_size: int | str | None = None,
    logical_sector_size: int | str | None = None,
    block_state_zero: bool | str = True,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    disk_id: str | None = None,
    **options: Any,
) -> Image:
    """Create a VHDX (qemu's options: subformat, block_size, log_size, block_state_zero;
    plus logical_sector_size, backing_file for a differencing disk, and disk_id, the
    virtual disk's GUID, which a rewritten disk keeps: Hyper-V and children know it by it)."""
    if options:
        raise FormatError(f"vhdx: unknown options {', '.join(sorted(options))}")
    try:
        ident_id = uuid.UUID(disk_id.strip("{}")) if disk_id is not None else uuid.uuid4()
    except ValueError:
        raise FormatError(f"vhdx: invalid disk_id {disk_id!r}") from None
    subformat = parse_choice(str(subformat), "subformat", ("dynamic", "fixed"))
    zero_state = parse_bool(block_state_zero, "block_state_zero")
    lss = (
        512
        if logical_sector_size is None
        else parse_size(logical_sector_size, "logical_sector_size")
    )
    if lss not in (512, 4096):
        raise FormatError(f"vhdx: logical_sector_size must be 512 or 4096, not {lss}")
    size = -(-size // lss) * lss
    if size == 0:
        size = lss
    if size > L.MAX_SIZE:
        raise FormatError(f"vhdx: {size} bytes is larger than the VHDX maximum of 64 TiB")
    bs = (
        default_block_size(size)
        if block_size in (None, "0", 0)
        else parse_size(block_size, "block_size")
    )
    if bs < L.MIN_BLOCK or bs > L.MAX_BLOCK or bs & (bs - 1):
        raise FormatError(f"vhdx: block_size {bs} must be a power of two from 1M to 256M")
    log_len = L.MiB if log_size is None else parse_size(log_size, "log_size")
    if log_len < L.MiB or log_len % L.MiB or log_len > MAX_LOG:
        raise FormatError(f"vhdx: log_size {log_len} must be a multiple of 1M, 1M..256M")
    has_parent = backing_file is not None
    if backing_fmt is not None and not has_parent:
        raise FormatError("vhdx: backing_fmt needs backing_file")
    if has_parent and subformat == "fixed":
        raise FormatError("vhdx: a differencing disk cannot be fixed")
    if backing_fmt is not None and backing_fmt != FORMAT:
        raise FormatError(f"vhdx: a differencing disk's parent must be a VHDX, not {backing_fmt}")
    locator = b""
    if has_parent:
        locator = _locator_item(_parent_entries(backing_file or "", final_path or path))
    fixed = subformat == "fixed"
    entries = L.bat_entry_count(size, bs, lss, has_parent)
    log_offset = L.MiB
    meta_offset = log_offset + log_len
    meta_len = L.MiB
    bat_offset = meta_offset + meta_len
    bat_len = -(-entries * 8 // L.MiB) * L.MiB
    data_start = bat_offset + bat_len

    ident = bytearray(
        L.FileIdentifier.build(
            {"signature": L.FILE_SIGNATURE, "creator": _utf16(CREATOR).ljust(512, b"\0")}
        )
    )
    header = {
        "signature": L.HEADER_SIGNATURE,
        "checksum": 0,
        "sequence_number": 0,
        "file_write_guid": uuid.uuid4().bytes_le,
        "data_write_guid": uuid.uuid4().bytes_le,
        "log_guid": bytes(16),
        "log_version": 0,
        "version": 1,
        "log_length": log_len,
        "log_offset": log_offset,
    }
    region = bytearray(L.REGION_TABLE_SIZE)
    region[:16] = L.RegionTableHeader.build(
        {"signature": L.REGION_SIGNATURE, "checksum": 0, "entry_count": 2, "reserved": 0}
    )
    for i, (g, off, n) in enumerate(
        ((L.BAT_REGION, bat_offset, bat_len), (L.METADATA_REGION, meta_offset, meta_len))
    ):
        region[16 + 32 * i : 48 + 32 * i] = L.RegionTableEntry.build(
            {"guid": g, "file_offset": off, "length": n, "flags": L.REGION_IS_REQUIRED}
        )
    L.seal(region)
    flags = (L.LEAVE_BLOCKS_ALLOCATED if fixed else 0) | (L.HAS_PARENT if has_parent else 0)
    items = [
        (
            L.FILE_PARAMETERS,
            L.FileParameters.build({"block_size": bs, "flags": flags}),
            L.META_IS_REQUIRED,
        ),
        (
            L.VIRTUAL_DISK_SIZE,
            L.VirtualDiskSize.build({"virtual_disk_size": size}),
            L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED,
        ),
        (L.VIRTUAL_DISK_ID, ident_id.bytes_le, L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED),
        (
            L.LOGICAL_SECTOR_SIZE,
            L.SectorSize.build({"sector_size": lss}),
            L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED,
        ),
        (
            L.PHYSICAL_SECTOR_SIZE,
            L.SectorSize.build({"sector_size": 4096 if lss == 4096 else 512}),
            L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED,
        ),
    ]
    if has_parent:
        items.append((L.PARENT_LOCATOR, locator, L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED))
    meta = bytearray(meta_len)
    meta[:32] = L.MetadataTableHeader.build(
        {
            "signature": L.METADATA_SIGNATURE,
            "reserved": 0,
            "entry_count": len(items),
            "reserved2": bytes(20),
        }
    )
    pos = L.METADATA_TABLE_SIZE
    for i, (g, blob, fl) in enumerate(items):
        meta[32 + 32 * i : 64 + 32 * i] = L.MetadataTableEntry.build(
            {"item_id": g, "offset": pos, "length": len(blob), "flags": fl, "reserved": 0}
        )
        meta[pos : pos + len(blob)] = blob
        pos += -(-len(blob) // 8) * 8
    bat = np.zeros(entries, np.uint64)
    blocks = -(-size // bs)
    ratio = L.chunk_ratio(bs, lss)
    end = data_start
    if fixed:
        b = np.arange(blocks, dtype=np.uint64)
        state = L.PAYLOAD_BLOCK_ZERO if zero_state else L.PAYLOAD_BLOCK_FULLY_PRESENT
        bat[(b + b // np.uint64(ratio)).astype(np.int64)] = (
            np.uint64(data_start) + b * np.uint64(bs)
        ) | np.uint64(state)
        end = data_start + blocks * bs
    if has_parent:
        # every chunk gets its (all clear) sector bitmap up front: libvhdi misreads the
        # parent through a chunk whose bitmap block is absent
        chunks = -(-blocks // ratio)
        c = np.arange(chunks, dtype=np.uint64)
        sb_offsets = np.uint64(data_start) + c * np.uint64(L.SECTOR_BITMAP_BLOCK)
        bat[(c * np.uint64(ratio + 1) + np.uint64(ratio)).astype(np.int64)] = (
            sb_offsets | np.uint64(L.SB_BLOCK_PRESENT)
        )
        end = data_start + chunks * L.SECTOR_BITMAP_BLOCK

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    img = VhdxImage(path, fd, writable=True)
    img.created = True
    # its headers, log, metadata, BAT (and a differencing disk's sector bitmaps) lie before
    # the blocks: past the first block written, only block data lands. Not a fixed disk,
    # whose blocks are allocated on purpose
    img.prealloc_ahead = not fixed
    try:
        pwrite_all(fd, ident, 0)
        for slot in (0, 1):
            raw = bytearray(L.Header.build({**header, "sequence_number": slot}))
            raw += bytes(L.HEADER_SIZE - len(raw))
            pwrite_all(fd, L.seal(raw), L.HEADER_OFFSETS[slot])
        for at in L.REGION_TABLE_OFFSETS:
            pwrite_all(fd, region, at)
        pwrite_all(fd, meta, meta_offset)
        pwrite_all(fd, bat.astype("<u8").tobytes(), bat_offset)
        os.ftruncate(fd, end)
        img.header = L.Header.parse(raw)
        img.creator = CREATOR
        img.disk_id = _guid_str(items[2][1])
        img._setup(
            block_size=bs,
            lss=lss,
            pss=4096 if lss == 4096 else 512,
            size=size,
            has_parent=has_parent,
            leave_allocated=fixed,
        )
        img.bat_offset = bat_offset
        img._load_bat(bat)
        img.data_start = data_start
        img.next_free = end
        img._header_bumped = True
        if has_parent:
            # partial writes read the parent's sectors they do not cover: the user named
            # this parent, so it is opened as named rather than confined like a locator
            img.parent_locator = _parse_locator(img, locator)
            img.parent_name = backing_file
            parent_path = os.path.join(
                os.path.dirname(os.path.abspath(final_path or path)), backing_file or ""
            )
            from .. import open_image as open_any

            img.backing = open_any(
                parent_path, FORMAT, policy=BackingPolicy().descend(final_path or path)
            )
    except BaseException:
        img.writable = False
        img.close()
        os.unlink(path)
        raise
    return img


def _parent_entries(backing_file: str, child_path: str) -> dict[str, str]:
    from .. import open_image as open_any

    base = os.path.dirname(os.path.abspath(child_path))
    parent_path = os.path.join(base, backing_file)
    try:
        with open_any(parent_path, FORMAT) as parent:
            linkage = _guid_str(parent.header.data_write_guid)  # type: ignore[attr-defined]
    except FormatError as exc:
        raise FormatError(f"vhdx: the parent of a differencing disk must be a VHDX: {exc}") from exc
    rel = os.path.relpath(os.path.abspath(parent_path), base).replace("/", "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    return {
        # lower case: libvhdi parses the GUID only in that spelling
        L.PARENT_LINKAGE: linkage.lower(),
        L.RELATIVE_PATH: rel,
        L.ABSOLUTE_WIN32_PATH: os.path.abspath(parent_path).replace("/", "\\"),
    }

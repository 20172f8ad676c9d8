"""Creating VMDK images: every subformat qemu-img makes, plus ESXi's `vmfs`.

Layouts follow what VMware's products write (spec "Virtual Disk Format 5.0"):

- monolithicSparse: one hosted sparse file, descriptor embedded, redundant and primary
  grain directories with every grain table preallocated, grains appended in write order.
- twoGbMaxExtentSparse / twoGbMaxExtentFlat: a descriptor file and 2047 MiB extents
  NAME-s001.vmdk... / NAME-f001.vmdk... (VMware's split size, so that no file reaches 2 GiB
  even with its metadata).
- monolithicFlat / vmfs: a descriptor file and NAME-flat.vmdk (FLAT or, for ESXi, VMFS).
- streamOptimized: one file written strictly in order (`StreamWriter`).

Multi-file images are created with their descriptor at `path` (NAME.partial, renamed
later) and their extents directly under their final names, taken from `final_path`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import uuid as uuid_mod
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedFeature
from ..fileio import pwrite_all
from ..image import Image
from ..options import parse_bool, parse_choice
from . import descriptor as dd
from . import layout as L
from .extent import RESERVE_STEP, ExtentFile, FlatExtent
from .image import VmdkImage, new_cid
from .sparse import SparseExtent

SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
)
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX", "pvscsi")
#: "installed, version unknown": guest customisation on vSphere fails without it
DEFAULT_TOOLS_VERSION = "2147483647"
DEFAULT_HW_VERSION = "4"
#: VMware's twoGbMaxExtent piece: 2047 MiB
SPLIT_SECTORS = 4192256
#: sparse extents hold at most 2^32 sectors of file (32-bit grain table entries)
MAX_SPARSE_BYTES = (1 << 32) * L.SECTOR
#: zlib level for streamOptimized grains; qemu-img uses 6, which costs about 1.6 times the CPU
#: of 3 for files about 1 % smaller (measured in docs/formats/vmdk.md)
DEFAULT_COMPRESSION_LEVEL = 3


def _uuid_text(b: bytes | None = None) -> str:
    """ddb.uuid as VMware writes it: "xx xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx"."""
    b = uuid_mod.uuid4().bytes if b is None else b
    return " ".join(f"{x:02x}" for x in b[:8]) + "-" + " ".join(f"{x:02x}" for x in b[8:])


def _parse_uuid(text: str) -> str:
    """`uuid`: a ddb.uuid as VMware writes it, or any spelling of a UUID."""
    digits = re.sub(r"[\s{}-]", "", str(text))
    if not re.fullmatch(r"[0-9a-fA-F]{32}", digits):
        raise FormatError(f"vmdk: invalid uuid {text!r}")
    return _uuid_text(bytes.fromhex(digits))


def geometry(sectors: int, adapter: str) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as VMware derives them from the adapter."""
    if adapter == "ide":
        heads, spt, limit = 16, 63, 16383
    else:
        heads, spt, limit = 255, 63, 65535
    return min(sectors // (heads * spt), limit), heads, spt


def _version_option(value: Any, what: str) -> str:
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) < 1 << 31:
        raise FormatError(f"vmdk: {what} must be a positive integer, not {value!r}")
    return str(int(text))


def _extent_names(final: str, subformat: str, count: int) -> list[str]:
    root, ext = os.path.splitext(os.path.basename(final))
    ext = ext or ".vmdk"
    if subformat in ("monolithicFlat", "vmfs"):
        return [f"{root}-flat{ext}"]
    letter = "s" if subformat == "twoGbMaxExtentSparse" else "f"
    return [f"{root}-{letter}{i:03d}{ext}" for i in range(1, count + 1)]


def create(
    path: str,
    size: int,
    *,
    final_path: str | None = None,
    subformat: str | None = None,
    adapter_type: str | None = None,
    hwversion: str | int | None = None,
    compat6: bool | str = False,
    toolsversion: str | int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compress: bool | str = False,
    compression_level: int | str | None = None,
    uuid: str | None = None,
    **options: Any,
) -> Image:
    if options:
        raise FormatError(f"vmdk: unknown options {', '.join(sorted(options))}")
    compress = parse_bool(compress, "compress")
    if subformat is None:
        subformat = "streamOptimized" if compress else "monolithicSparse"
    subformat = parse_choice(subformat, "vmdk subformat", SUBFORMATS)
    if compress and subformat != "streamOptimized":
        raise FormatError(f"vmdk: compression needs subformat=streamOptimized, not {subformat}")
    default_adapter = "lsilogic" if subformat == "vmfs" else "ide"
    adapter = parse_choice(adapter_type or default_adapter, "vmdk adapter_type", ADAPTERS)
    if parse_bool(compat6, "compat6"):
        if hwversion is not None:
            raise FormatError("vmdk: compat6 and hwversion cannot both be set")
        hwversion = "6"
    hw = _version_option(hwversion, "hwversion") if hwversion is not None else DEFAULT_HW_VERSION
    tools = _version_option(
        toolsversion if toolsversion is not None else DEFAULT_TOOLS_VERSION, "toolsversion"
    )
    level = DEFAULT_COMPRESSION_LEVEL
    if compression_level is not None:
        level = int(_version_option(compression_level, "compression_level"))
        if not 1 <= level <= 9:
            raise FormatError(f"vmdk: compression_level must be 1 to 9, not {level}")
        if subformat != "streamOptimized":
            raise FormatError("vmdk: compression_level needs subformat=streamOptimized")
    if backing_fmt is not None and backing_fmt != "vmdk":
        raise FormatError(f"vmdk: a delta's parent must be a VMDK, not {backing_fmt}")
    if backing_file is not None and subformat not in ("monolithicSparse", "twoGbMaxExtentSparse"):
        raise FormatError(f"vmdk: a {subformat} image cannot have a backing file")

    if size <= 0:
        # VMware's extents hold at least one sector; qemu-img cannot reopen an empty VMDK
        raise FormatError("vmdk: a VMDK must hold at least one sector")
    grain = L.DEFAULT_GRAIN_SECTORS
    sectors = -(-size // L.SECTOR)
    if subformat == "streamOptimized":
        # ESXi and VirtualBox expect whole grains
        sectors = -(-sectors // grain) * grain
    final = final_path or path
    parent = None
    desc = dd.Descriptor(create_type=subformat, extents=[], cid=new_cid())
    if backing_file is not None:
        from .image import open_image

        parent_path = os.path.join(os.path.dirname(os.path.abspath(final)), backing_file)
        parent = open_image(parent_path)
        desc.parent_cid = parent.descriptor.cid
        desc.parent_hint = backing_file
    cyl, heads, spt = geometry(sectors, adapter)
    desc.ddb = {
        "ddb.adapterType": adapter,
        "ddb.geometry.cylinders": str(cyl),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": str(spt),
        "ddb.longContentID": secrets.token_hex(16),
        "ddb.toolsVersion": tools,
        "ddb.uuid": _uuid_text() if uuid is None else _parse_uuid(uuid),
        "ddb.virtualHWVersion": hw,
    }
    try:
        img = _create(path, final, subformat, sectors, desc, level)
    except BaseException:
        if parent is not None:
            parent.close()
        raise
    img.backing = parent
    return img


def _create(
    path: str, final: str, subformat: str, sectors: int, desc: dd.Descriptor, level: int
) -> Image:
    name = os.path.basename(final)
    if subformat == "streamOptimized":
        desc.extents = [dd.ExtentLine("RW", sectors, "SPARSE", name)]
        return StreamWriter(path, sectors, dd.build(desc), level=level)
    if subformat == "monolithicSparse":
        if sectors * L.SECTOR > MAX_SPARSE_BYTES:
            raise UnsupportedFeature("vmdk: a monolithicSparse extent holds at most 2 TiB")
        desc.extents = [dd.ExtentLine("RW", sectors, "SPARSE", name)]
        ext = make_sparse(path, sectors, dd.build(desc))
        return VmdkImage(path, desc, [ext], writable=True, header=ext.header)
    # a descriptor file and extent files named after the final name
    if subformat in ("monolithicFlat", "vmfs"):
        sizes = [sectors]
    else:
        sizes = [SPLIT_SECTORS] * (sectors // SPLIT_SECTORS)
        if sectors % SPLIT_SECTORS or not sizes:
            sizes.append(sectors % SPLIT_SECTORS)
    directory = os.path.dirname(os.path.abspath(final))
    names = _extent_names(final, subformat, len(sizes))
    kind = {"vmfs": "VMFS", "twoGbMaxExtentSparse": "SPARSE"}.get(subformat, "FLAT")
    desc.extents = [dd.ExtentLine("RW", n, kind, f) for n, f in zip(sizes, names)]
    parts: list[ExtentFile] = []
    created: list[str] = []
    try:
        for n, fname in zip(sizes, names):
            epath = os.path.join(directory, fname)
            if os.path.lexists(epath):
                raise FormatError(f"vmdk: extent file {epath} already exists; remove it first")
            created.append(epath)
            if kind == "SPARSE":
                parts.append(make_sparse(epath, n, None))
            else:
                fd = os.open(epath, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                parts.append(FlatExtent(epath, fd, 0, n * L.SECTOR, writable=True, type=kind))
                os.ftruncate(fd, n * L.SECTOR)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        created.append(path)
        try:
            os.write(fd, dd.build(desc))
        finally:
            os.close(fd)
    except BaseException:
        for p in parts:
            p.close()
        for f in created:
            try:
                os.unlink(f)
            except OSError:
                pass
        raise
    return VmdkImage(path, desc, parts, writable=True)


def make_sparse(path: str, sectors: int, descriptor: bytes | None) -> SparseExtent:
    """A new hosted sparse extent laid out as VMware's and qemu's: header, descriptor,
    redundant GD and GTs, GD and GTs, grains from the next grain boundary on."""
    grain = L.DEFAULT_GRAIN_SECTORS
    per_gt = L.GTES_PER_GT
    grains = -(-sectors // grain)
    gts = -(-grains // per_gt)
    gd_sectors = -(-gts * 4 // L.SECTOR)
    gt_sectors = per_gt * 4 // L.SECTOR
    desc_sectors = 0
    if descriptor is not None:
        desc_sectors = max(L.DESCRIPTOR_SECTORS, -(-len(descriptor) // L.SECTOR))
    rgd = 1 + desc_sectors
    rgts = rgd + gd_sectors
    gd = rgts + gts * gt_sectors
    first_gt = gd + gd_sectors
    overhead = first_gt + gts * gt_sectors
    overhead = -(-overhead // grain) * grain
    header = L.SparseExtentHeader.build(
        dict(
            version=1,
            flags=L.FLAG_VALID_NEWLINE | L.FLAG_REDUNDANT_GT,
            capacity=sectors,
            grainSize=grain,
            descriptorOffset=1 if descriptor is not None else 0,
            descriptorSize=desc_sectors,
            numGTEsPerGT=per_gt,
            rgdOffset=rgd,
            gdOffset=gd,
            overHead=overhead,
            uncleanShutdown=0,
            compressAlgorithm=L.COMPRESSION_NONE,
            pad=bytes(433),
            **L.NEWLINE_BYTES,
        )
    )
    table = np.arange(gts, dtype=np.int64) * gt_sectors
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, overhead * L.SECTOR)
        os.pwrite(fd, header, 0)
        if descriptor is not None:
            os.pwrite(fd, descriptor, L.SECTOR)
        os.pwrite(fd, (table + rgts).astype("<u4").tobytes(), rgd * L.SECTOR)
        os.pwrite(fd, (table + first_gt).astype("<u4").tobytes(), gd * L.SECTOR)
        parsed = L.SparseExtentHeader.parse(header)
        return SparseExtent(path, fd, parsed, gd, writable=True, length=sectors * L.SECTOR)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise


# -- streamOptimized ------------------------------------------------------------------------
@dataclass
class Encoded:
    """Compressed grains of one chunk: grain markers back to back, ready to append."""

    blob: bytes
    grains: np.ndarray  # grain numbers, ascending
    sectors: np.ndarray  # where each grain's marker starts in blob, in sectors


def _marker(num_sectors: int, kind: int) -> bytes:
    return L.MetadataMarker.build(dict(numSectors=num_sectors, type=kind))


class StreamWriter(Image):
    """A streamOptimized VMDK written strictly in order, as ESXi and VirtualBox import it:
    header version 3 with gdOffset = GD_AT_END, embedded descriptor, compressed grains
    behind grain markers, each grain table behind a marker after its grains, the grain
    directory behind its marker, footer marker + footer, end-of-stream marker."""

    format = "vmdk"
    is_sequential = True
    encodes = True
    cluster_size = L.DEFAULT_GRAIN_SECTORS * L.SECTOR

    def __init__(
        self, path: str, sectors: int, descriptor: bytes, *, level: int = DEFAULT_COMPRESSION_LEVEL
    ) -> None:
        super().__init__(path, sectors * L.SECTOR, writable=True)
        self.level = level
        self.grain = self.cluster_size
        self.grain_sectors = L.DEFAULT_GRAIN_SECTORS
        self.per_gt = L.GTES_PER_GT
        grains = sectors // self.grain_sectors
        self.gd = np.zeros(-(-grains // self.per_gt), np.uint32)
        desc_sectors = max(L.DESCRIPTOR_SECTORS, -(-len(descriptor) // L.SECTOR))
        overhead = -(-(1 + desc_sectors) // self.grain_sectors) * self.grain_sectors
        self.header = dict(
            version=3,  # ESXi refuses older stream-optimized extents
            flags=L.FLAG_VALID_NEWLINE | L.FLAG_COMPRESSED | L.FLAG_MARKERS,
            capacity=sectors,
            grainSize=self.grain_sectors,
            descriptorOffset=1,
            descriptorSize=desc_sectors,
            numGTEsPerGT=self.per_gt,
            rgdOffset=0,
            gdOffset=L.GD_AT_END,
            overHead=overhead,
            uncleanShutdown=0,
            compressAlgorithm=L.COMPRESSION_DEFLATE,
            pad=bytes(433),
            **L.NEWLINE_BYTES,
        )
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(self.fd, L.SparseExtentHeader.build(self.header), 0)
            os.pwrite(self.fd, descriptor.ljust(desc_sectors * L.SECTOR, b"\0"), L.SECTOR)
        except BaseException:
            os.close(self.fd)
            raise
        self.pos = overhead * L.SECTOR  # where the next marker goes
        self.reserved = 0
        self.written_to = 0  # virtual offset below which nothing may be written any more
        self.table_index = -1
        self.table = np.zeros(self.per_gt, np.uint32)
        self.pending: bytearray | None = None
        self.pending_grain = -1
        self.finished = False

    # -- compression: on the engine's pool -----------------------------------------------
    def encode(self, offset: int, data: bytes | memoryview) -> Any:
        n = len(data)
        if offset % self.grain or (n % self.grain and offset + n != self.size):
            return data  # a partial grain: the writer merges it in order
        return self._compress(offset, memoryview(data))

    def _compress(self, offset: int, data: memoryview) -> Encoded:
        g0 = offset // self.grain
        count = -(-len(data) // self.grain)
        whole = len(data) // self.grain * self.grain
        nonzero = np.ones(count, bool)
        if whole:
            arr = np.frombuffer(data[:whole], np.uint64).reshape(-1, self.grain // 8)
            nonzero[: whole // self.grain] = arr.any(axis=1)
        parts: list[bytes] = []
        grains: list[int] = []
        sectors: list[int] = []
        at = 0
        for i in np.flatnonzero(nonzero).tolist():
            chunk = data[i * self.grain : (i + 1) * self.grain]
            if len(chunk) < self.grain:
                if not any(chunk):
                    continue
                chunk = memoryview(bytes(chunk).ljust(self.grain, b"\0"))
            comp = zlib.compress(chunk, self.level)
            rec = L.GRAIN_MARKER.pack((g0 + i) * self.grain_sectors, len(comp))
            pad = -(len(rec) + len(comp)) % L.SECTOR
            parts += (rec, comp, bytes(pad))
            grains.append(g0 + i)
            sectors.append(at)
            at += (len(rec) + len(comp) + pad) // L.SECTOR
        return Encoded(b"".join(parts), np.array(grains, np.int64), np.array(sectors, np.int64))

    # -- writing: on the engine's thread, in order ---------------------------------------
    def write_encoded(self, offset: int, encoded: Any) -> None:
        if not isinstance(encoded, Encoded):
            self.write(offset, encoded)
            return
        self._check_writable()
        self._check_order(offset)
        # offset >= written_to and grain-aligned: a pending partial grain lies before it
        self._flush_pending()
        self._append(encoded)
        if len(encoded.grains):
            self.written_to = min((int(encoded.grains[-1]) + 1) * self.grain, self.size)
        self.written_to = max(self.written_to, offset)

    def _check_writable(self) -> None:
        super()._check_writable()
        if self.finished:
            raise FormatError("vmdk: the streamOptimized image is already finished")

    def _check_order(self, offset: int) -> None:
        if offset < self.written_to:
            raise FormatError(
                f"vmdk: streamOptimized images are written in order: a write at {offset:#x} "
                f"comes after data up to {self.written_to:#x}"
            )

    def _append(self, enc: Encoded) -> None:
        if not len(enc.grains):
            return
        ks = enc.grains // self.per_gt
        cuts = np.flatnonzero(np.diff(ks)) + 1
        bounds = [0, *cuts.tolist(), len(ks)]
        for a, b in itertools.pairwise(bounds):
            k = int(ks[a])
            if k != self.table_index:
                self._flush_table()
                self.table_index = k
            start = int(enc.sectors[a]) * L.SECTOR
            stop = int(enc.sectors[b]) * L.SECTOR if b < len(ks) else len(enc.blob)
            first = self.pos // L.SECTOR
            idx = enc.grains[a:b] - k * self.per_gt
            self.table[idx] = (first + enc.sectors[a:b] - enc.sectors[a]).astype(np.uint32)
            self._emit(memoryview(enc.blob)[start:stop])

    def _emit(self, data: bytes | memoryview) -> None:
        if self.pos + len(data) > self.reserved:
            # writes inside the file are cheaper than appends; _finish() trims the rest
            self.reserved = self.pos + len(data) + RESERVE_STEP
            os.ftruncate(self.fd, self.reserved)
        pwrite_all(self.fd, data, self.pos)
        self.pos += len(data)

    def _flush_table(self) -> None:
        if self.table_index >= 0 and self.table.any():
            table = self.table.astype("<u4").tobytes()
            self._emit(_marker(len(table) // L.SECTOR, L.MARKER_GT))
            self.gd[self.table_index] = self.pos // L.SECTOR
            self._emit(table)
        self.table = np.zeros(self.per_gt, np.uint32)
        self.table_index = -1

    def _flush_pending(self) -> None:
        if self.pending is None:
            return
        data, g = self.pending, self.pending_grain
        self.pending, self.pending_grain = None, -1
        self._append(self._compress(g * self.grain, memoryview(data)))

    def _write(self, offset: int, data: memoryview) -> None:
        self._check_order(offset)
        end = offset + len(data)
        pos = offset
        while pos < end:
            g, within = divmod(pos, self.grain)
            if within == 0 and g != self.pending_grain:
                # whole grains go straight through
                whole = (end - pos) // self.grain * self.grain
                if end == self.size:
                    whole = end - pos
                if whole:
                    self._flush_pending()
                    self._append(self._compress(pos, data[pos - offset : pos - offset + whole]))
                    pos += whole
                    continue
            if g != self.pending_grain:
                self._flush_pending()
                self.pending = bytearray(min(self.grain, self.size - g * self.grain))
                self.pending_grain = g
            step = min((g + 1) * self.grain, end) - pos
            assert self.pending is not None
            self.pending[within : within + step] = data[pos - offset : pos - offset + step]
            pos += step
        self.written_to = end

    def _write_zeroes(self, offset: int, n: int) -> None:
        # gaps read as zeros; only the order matters (and a pending grain is zero-filled)
        self._check_order(offset)
        self.written_to = offset + n

    def _readinto(self, offset: int, buf: memoryview) -> None:
        raise FormatError("vmdk: a streamOptimized image cannot be read while it is written")

    def _extents(self, start: int, end: int):  # type: ignore[override]
        raise FormatError("vmdk: a streamOptimized image cannot be mapped while it is written")

    def _finish(self) -> None:
        self._flush_pending()
        self._flush_table()
        directory = self.gd.astype("<u4").tobytes()
        directory += bytes(-len(directory) % L.SECTOR)
        self._emit(_marker(len(directory) // L.SECTOR, L.MARKER_GD))
        gd_sector = self.pos // L.SECTOR
        self._emit(directory)
        self._emit(_marker(1, L.MARKER_FOOTER))
        footer = dict(self.header, gdOffset=gd_sector)
        self._emit(L.SparseExtentHeader.build(footer))
        self._emit(_marker(0, L.MARKER_EOS))
        os.ftruncate(self.fd, self.pos)
        self.finished = True

    def flush(self) -> None:
        if not self.closed:
            self._sync(self.fd)

    def close(self) -> None:
        if not self.closed and self.writable and not self.finished:
            self._finish()
        super().close()

    def _close(self) -> None:
        os.close(self.fd)

    def info(self) -> dict[str, Any]:
        return {"create-type": "streamOptimized", "cluster-size": self.grain}

"""A VMDK image: a descriptor and its extents laid end to end in the virtual disk.

Extents (extent.py, sparse.py, esx.py) are FLAT/VMFS (the bytes at an offset in a file),
ZERO, SPARSE (hosted sparse, maybe stream-optimized), VMFSSPARSE (COWD) and SESPARSE. A
monolithic sparse file carries its descriptor inside; a descriptor file names its extents,
which must live beside it. Each extent answers, for a range relative to its start: read
it, map it (per-grain state: unallocated / zero / data) and, where writable, write it. An
unallocated range reads from the parent of a delta link (`parentFileNameHint`).
"""

from __future__ import annotations

import bisect
import os
import re
import resource
import secrets
from collections.abc import Iterator
from typing import Any

from ..backing import BackingPolicy, open_backing
from ..errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from ..extents import Extent, Kind
from ..fileio import file_size, pread_exact, pwrite_all
from ..image import CheckResult, Image, Location
from . import descriptor as dd
from . import layout as L
from .esx import CowdExtent, SeSparseExtent, open_sesparse_file
from .extent import (
    DATA,
    UNALLOCATED,
    ExtentFile,
    FlatExtent,
    Under,
    ZeroExtent,
    open_fd,
    zero_fill,
)
from .sparse import SparseExtent, open_sparse_file

FORMAT = "vmdk"

_CID_RE = re.compile(rb"^([ \t]*CID[ \t]*=[ \t]*)[0-9a-fA-F]+", re.M)


def new_cid() -> int:
    # 0xffffffff means "no parent" and 0xfffffffe "disk of zeros" to some products
    while True:
        cid = secrets.randbits(32)
        if cid < 0xFFFF_FFFE:
            return cid


def confine(descriptor_path: str, name: str) -> str:
    """The real path of extent `name`, which must stay in the descriptor's directory."""
    base = os.path.dirname(os.path.realpath(descriptor_path))
    real = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(real) != base and not real.startswith(base + os.sep):
        raise UnsafeImage(
            f"vmdk: {descriptor_path}: extent {name!r} resolves to {real}, outside the "
            f"descriptor's directory {base}"
        )
    return real


class VmdkImage(Image):
    format = FORMAT

    def __init__(
        self,
        path: str,
        desc: dd.Descriptor,
        extents: list[ExtentFile],
        *,
        writable: bool,
        header: Any = None,
    ) -> None:
        super().__init__(path, sum(e.length for e in extents), writable=writable)
        self.descriptor = desc
        self.header = header
        self.parts = extents
        for ext in extents:
            ext.pwrite = self._pwrite
        self.decodes = any(e.compressed for e in extents)
        self.starts: list[int] = []
        pos = 0
        for e in extents:
            self.starts.append(pos)
            pos += e.length
        grains = {
            e.cluster_size
            for e in extents
            if isinstance(e, SparseExtent | CowdExtent | SeSparseExtent)
        }
        self.cluster_size = max(grains) if grains else 65536
        self.problems: list[str] = []
        #: images opened for writing get a new CID when first changed; new ones have one
        self.rewrite_cid = False
        self._cid_changed = False
        self._cid_dirty = False

    @property
    def create_type(self) -> str:
        return self.descriptor.create_type

    def _spans(self, offset: int, n: int) -> Iterator[tuple[ExtentFile, int, int, int]]:
        """(extent, start in extent, length, position in request) over [offset, offset+n)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < offset + n:
            ext, base = self.parts[i], self.starts[i]
            step = min(base + ext.length, offset + n) - pos
            if step > 0:
                yield ext, pos - base, step, pos - offset
            pos += step
            i += 1

    def _under(self, base: int) -> Under:
        if self.backing is None:
            return zero_fill
        backing = self.backing

        def fill(offset: int, buf: memoryview) -> None:
            at = base + offset
            got = max(0, min(len(buf), backing.size - at))
            if got:
                backing.readinto(at, buf[:got])
            if got < len(buf):
                buf[got:] = bytes(len(buf) - got)

        return fill

    def _locate(self, offset: int, n: int) -> Iterator[Location]:
        for ext, at, length, pos in self._spans(offset, n):
            for rel, k, fd, foff in ext.locate(at, length):
                yield Location(offset + pos + rel, k, fd, foff)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        for ext, at, n, pos in self._spans(offset, len(buf)):
            ext.read(at, buf[pos : pos + n], self._under(offset + pos - at))

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        for ext, at, n, pos in self._spans(start, end - start):
            base = start + pos - at
            for s, length, state in ext.states(at, at + n):
                vs = base + s
                if state == DATA:
                    yield Extent(vs, length, Kind.DATA)
                elif state == UNALLOCATED and self.backing is not None:
                    stop = min(vs + length, self.backing.size)
                    if vs < stop:
                        yield from self.backing.extents(vs, stop)
                    if max(vs, stop) < vs + length:
                        yield Extent(max(vs, stop), vs + length - max(vs, stop), Kind.ZERO)
                else:
                    yield Extent(vs, length, Kind.ZERO)

    @staticmethod
    def _writable_part(ext: ExtentFile) -> None:
        if ext.access != "RW":
            raise FormatError(f"vmdk: extent {ext.path} is {ext.access} in the descriptor")

    def _changing(self) -> None:
        """A new CID on the first change, as VMware and qemu do: deltas taken of this
        disk no longer match it."""
        if self.rewrite_cid and not self._cid_changed:
            self.descriptor.cid = new_cid()
            self._cid_changed = True
            self._cid_dirty = True

    def _write(self, offset: int, data: memoryview) -> None:
        self._changing()
        for ext, at, n, pos in self._spans(offset, len(data)):
            self._writable_part(ext)
            ext.write(at, data[pos : pos + n], self._under(offset + pos - at))

    def _write_zeroes(self, offset: int, n: int) -> None:
        self._changing()
        for ext, at, length, pos in self._spans(offset, n):
            self._writable_part(ext)
            under = self._under(offset + pos - at)
            ext.write_zeroes(at, length, under, self.backing is not None)

    def flush(self) -> None:
        if self.writable and not self.closed:
            if self._cid_dirty:
                self._store_cid()
                self._cid_dirty = False
            for ext in self.parts:
                ext.flush(self.durable)
            if self.durable and not any(ext.path == self.path for ext in self.parts):
                fd = os.open(self.path or "", os.O_RDONLY | os.O_CLOEXEC)  # a separate descriptor
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _store_cid(self) -> None:
        """Rewrite the CID line only, leaving the rest of the descriptor as it was."""
        first = self.parts[0] if self.parts else None
        embedded = isinstance(first, SparseExtent) and self.path == first.path
        if embedded:
            assert isinstance(first, SparseExtent)
            h = first.header
            if not (h.descriptorOffset and h.descriptorSize):
                return
            at, size = h.descriptorOffset * L.SECTOR, h.descriptorSize * L.SECTOR
            raw = pread_exact(first.fd, size, at, f"vmdk: {self.path}: embedded descriptor")
        else:
            with open(self.path or "", "rb") as f:
                raw = f.read()
        new, count = _CID_RE.subn(b"\\g<1>%08x" % self.descriptor.cid, raw, count=1)
        if not count:
            return
        if embedded:
            assert isinstance(first, SparseExtent)
            pwrite_all(first.fd, new[:size].ljust(size, b"\0"), at)
        else:
            with open(self.path or "", "r+b") as f:
                f.write(new)
                f.truncate()

    def _close(self) -> None:
        for ext in self.parts:
            ext.close()

    def files(self) -> list[str]:
        out = [self.path] if self.path else []
        for ext in self.parts:
            if (
                ext.path
                and ext.path not in out
                and os.path.realpath(ext.path) != os.path.realpath(self.path or "")
            ):
                out.append(ext.path)
        return out

    def info(self) -> dict[str, Any]:
        d = self.descriptor
        out: dict[str, Any] = {
            "create-type": d.create_type,
            "cid": d.cid,
            "parent-cid": d.parent_cid,
            "cluster-size": self.cluster_size,
            "extents": [e.info() for e in self.parts],
        }
        if "ddb.adapterType" in d.ddb:
            out["adapter-type"] = d.ddb["ddb.adapterType"]
        if "ddb.virtualHWVersion" in d.ddb:
            out["hwversion"] = d.ddb["ddb.virtualHWVersion"]
        if d.parent_hint is not None:
            out["parent-file-name-hint"] = d.parent_hint
        if self.header is not None:
            out["version"] = self.header.version
        return out

    def check(self) -> CheckResult:
        result = CheckResult(corruptions=list(self.problems))
        for ext in self.parts:
            try:
                result.corruptions += ext.check()
            except FormatError as exc:
                result.corruptions.append(str(exc))
        return result


def open_image(
    path: str, *, writable: bool = False, policy: BackingPolicy | None = None
) -> VmdkImage:
    policy = policy or BackingPolicy()
    fd = open_fd(path, False)
    try:
        head = os.pread(fd, 4, 0)
        size = file_size(fd)
    finally:
        os.close(fd)
    if head in (L.SPARSE_MAGIC, L.COWD_MAGIC):
        img = _open_monolithic(path, writable)
    else:
        img = _open_descriptor(path, size, writable)
    img.rewrite_cid = writable
    try:
        _attach_parent(img, policy)
    except BaseException:
        img.writable = False
        img.close()
        raise
    return img


def _open_monolithic(path: str, writable: bool) -> VmdkImage:
    ext = open_sparse_file(path, writable=writable)
    try:
        desc = None
        if isinstance(ext, SparseExtent):
            h = ext.header
            if h.descriptorOffset and h.descriptorSize:
                end = (h.descriptorOffset + h.descriptorSize) * L.SECTOR
                if end > ext.file_end:
                    raise CorruptImage(
                        f"vmdk: {path}: embedded descriptor at sector {h.descriptorOffset} "
                        f"runs past the end of the file ({ext.file_end:#x} bytes)"
                    )
                raw = pread_exact(
                    ext.fd,
                    h.descriptorSize * L.SECTOR,
                    h.descriptorOffset * L.SECTOR,
                    f"vmdk: {path}: embedded descriptor",
                )
                desc = dd.parse(raw, f"vmdk: {path}")
        if desc is None:
            kind = "streamOptimized" if ext.compressed else "monolithicSparse"
            if isinstance(ext, CowdExtent):
                kind = "vmfsSparse"
            desc = dd.Descriptor(kind, [dd.ExtentLine("RW", ext.length // L.SECTOR, ext.type)])
        # the embedded extent line may name the file before a rename: the file is the extent
        desc.extents = [dd.ExtentLine("RW", -(-ext.length // L.SECTOR), ext.type, path)]
        return VmdkImage(path, desc, [ext], writable=writable, header=getattr(ext, "header", None))
    except BaseException:
        ext.close()
        raise


def _open_descriptor(path: str, size: int, writable: bool) -> VmdkImage:
    if size > dd.MAX_DESCRIPTOR_BYTES:
        raise CorruptImage(
            f"vmdk: {path}: neither a sparse extent nor a descriptor (a descriptor of "
            f"{size} bytes exceeds the {dd.MAX_DESCRIPTOR_BYTES} cap)"
        )
    with open(path, "rb") as f:
        desc = dd.parse(f.read(), f"vmdk: {path}")
    _allow_open_files(len(desc.extents))
    parts: list[ExtentFile] = []
    try:
        for line in desc.extents:
            part = _open_extent(path, line, writable and line.access == "RW")
            part.access = line.access
            parts.append(part)
    except BaseException:
        for p in parts:
            p.close()
        raise
    return VmdkImage(path, desc, parts, writable=writable)


def _allow_open_files(count: int) -> None:
    """Every extent stays open; a 2 TB twoGbMaxExtent disk has over 1,000 of them, beyond
    the usual soft limit of 1,024 descriptors: raise it towards the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _open_extent(path: str, line: dd.ExtentLine, writable: bool) -> ExtentFile:
    length = line.sectors * L.SECTOR
    if line.type == "ZERO":
        return ZeroExtent(None, length, writable=False)
    assert line.filename is not None
    real = confine(path, line.filename)
    if not os.path.exists(real):
        raise FormatError(f"vmdk: {path}: extent file {line.filename!r} not found")
    if line.type == "SESPARSE":
        if writable:
            raise UnsupportedFeature(f"vmdk: {path}: seSparse extents are read-only")
        return open_sesparse_file(real, length)
    if line.type in ("SPARSE", "VMFSSPARSE"):
        return open_sparse_file(real, writable=writable, length=length)
    fd = open_fd(real, writable)
    try:
        return FlatExtent(
            real, fd, line.offset * L.SECTOR, length, writable=writable, type=line.type
        )
    except BaseException:
        os.close(fd)
        raise


def _attach_parent(img: VmdkImage, policy: BackingPolicy) -> None:
    hint = img.descriptor.parent_hint
    if hint is None:
        return
    parent = open_backing(img.path or "", hint, FORMAT, policy)
    img.backing = parent
    desc = getattr(parent, "descriptor", None)
    if desc is not None and img.descriptor.parent_cid != desc.cid:
        # VMware and qemu refuse too: the delta's grains were written over other content
        raise CorruptImage(
            f"vmdk: {img.path}: parent {hint!r} changed after this delta was taken "
            f"(parentCID {img.descriptor.parent_cid:08x}, parent's CID {desc.cid:08x})"
        )

"""Packing and unpacking appliances: OVA archives and OVF packages (descriptor beside its
files).

Pack: each disk is converted once into a streamOptimized VMDK staged beside the output
(in .OUT.p2v-stage/), then the archive is streamed to OUT.partial in the order OVA demands (descriptor, manifest,
disks in References order) and renamed on success. The manifest precedes the disks in the
archive but its digests are known only after the disks are read, so its (fixed-length)
member is reserved and filled in at the end: each disk is read exactly once, hashed while
it is appended.

Unpack: members are checked before anything is written (no absolute paths, `..`, links
or devices), the manifest is verified as each file is read, and every output file is named
by us inside the target directory. A failure removes what this run wrote.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import re
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import CorruptImage, FormatError, UnsafeImage
from ..fileio import write_file_atomic
from . import descriptor as ovfdesc
from . import manifest as ovfmf
from . import ustar
from .container import Container, Directory, Readable, open_container

COPY_CHUNK = 8 << 20
EXTENSIONS = {
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vpc": "vhd",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "raw": "img",
}
#: SCSI adapter each bus maps to in the VMDK's ddb.adapterType (what VMware tools check)
_ADAPTER = {"scsi": "lsilogic", "ide": "ide", "sata": "ide", "nvme": "lsilogic"}

Progress = Callable[[int, int], None]


@dataclass
class PackedDisk:
    name: str
    source: str
    virtual_size: int
    file_size: int
    populated_size: int
    digest: str


@dataclass
class PackResult:
    output: str
    descriptor: str
    ovf_version: str
    manifest: str
    disks: list[PackedDisk] = field(default_factory=list)
    size: int = 0
    seconds: float = 0.0


@dataclass
class UnpackedDisk:
    name: str
    output: str
    format: str
    virtual_size: int


@dataclass
class UnpackResult:
    source: str
    outdir: str
    ovf_version: str
    manifest: str | None  # digest algorithm verified, None when the package had no manifest
    machine: dict[str, Any]
    disks: list[UnpackedDisk] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- writing ------------------------------------------------------------------------------


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, size: int, hasher) -> None:
    """Copy `size` bytes (or only read them when dst is None), feeding the hasher."""
    left = size
    while left:
        block = src.read(min(COPY_CHUNK, left))
        if not block:
            raise FormatError(f"{getattr(src, 'name', 'file')}: changed size while being read")
        hasher.update(block)
        if dst is not None:
            dst.write(block)
        left -= len(block)


def write_ova(
    output: str,
    descriptor_name: str,
    descriptor: bytes,
    files: list[tuple[str, str]],
    *,
    digest: str = "sha256",
    force: bool = False,
) -> tuple[int, dict[str, str]]:
    """Stream an OVA: the descriptor, the manifest, then `files` (member name, path) in
    order. Returns the archive size and each member's digest."""
    from ..output import check_output

    algo = ovfmf.algorithm(digest)
    check_output(output, force=force, sources=tuple(p for _, p in files))
    names = [descriptor_name] + [n for n, _ in files]
    for n in names:
        ustar.check_member_name(n)
    mf_name = os.path.splitext(descriptor_name)[0] + ".mf"
    mf_size = ovfmf.size(names, algo)
    partial = output + ".partial"
    digests: dict[str, str] = {}
    try:
        with open(partial, "wb") as out:
            h = ovfmf.hasher(algo)
            h.update(descriptor)
            digests[descriptor_name] = h.hexdigest()
            out.write(ustar.header(descriptor_name, len(descriptor)))
            out.write(descriptor + ustar.padding(len(descriptor)))
            out.write(ustar.header(mf_name, mf_size))
            mf_at = out.tell()
            out.write(bytes(mf_size) + ustar.padding(mf_size))
            for name, path in files:
                with open(path, "rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    out.write(ustar.header(name, size))
                    h = ovfmf.hasher(algo)
                    _copy_hashing(src, out, size, h)
                    digests[name] = h.hexdigest()
                out.write(ustar.padding(size))
            out.write(ustar.end_of_archive(out.tell()))
            total = out.tell()
            mf = ovfmf.build([(n, digests[n]) for n in names], algo)
            if len(mf) != mf_size:
                raise FormatError("ova: manifest length changed while writing")  # a bug, not input
            out.seek(mf_at)
            out.write(mf)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return total, digests


def _populated(img) -> int:
    from ..extents import Kind

    return sum(e.length for e in img.extents() if e.kind == Kind.DATA)


def pack(
    sources: list[str],
    output: str,
    machine: dict[str, Any],
    *,
    ovf_version: str = "1.0",
    digest: str = "sha256",
    flavor: str = "vmware",
    system_type: str = ovfdesc.DEFAULT_SYSTEM_TYPE,
    source_format: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> PackResult:
    """Convert each source disk to a streamOptimized VMDK and archive them with a
    descriptor for `machine` (its disks' bus are used when given) into OVA `output`."""
    import formats

    from ..convert import convert
    from ..output import check_output

    t0 = time.monotonic()
    if not sources:
        raise FormatError("ova: no disks to pack")
    version = {"1": "1.0", "2": "2.0"}.get(str(ovf_version), str(ovf_version))
    if version not in ovfdesc.NS_OVF:
        raise FormatError(f"ova: unknown OVF version {ovf_version!r} (1 or 2)")
    ovfmf.algorithm(digest)
    check_output(output, force=force, sources=tuple(sources))
    stem = os.path.splitext(os.path.basename(output))[0] or "appliance"
    wanted = list(machine.get("disks") or [])
    disks: list[dict[str, Any]] = []
    packed: list[PackedDisk] = []
    # named after the output, not random: a run killed before its cleanup leaves it, and
    # the next pack to the same output removes it instead of leaving disks' worth behind
    stage = os.path.join(
        os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.p2v-stage"
    )
    shutil.rmtree(stage, ignore_errors=True)
    os.mkdir(stage)
    try:
        staged: list[tuple[str, str]] = []
        for i, src_path in enumerate(sources, 1):
            name = f"{stem}-disk{i}.vmdk"
            bus = (wanted[i - 1].get("bus") if i <= len(wanted) else None) or "scsi"
            if bus == "virtio":
                bus = "scsi"
            target = os.path.join(stage, name)
            with formats.open(src_path, source_format) as src:
                populated = _populated(src)
                convert(
                    src,
                    target,
                    "vmdk",
                    options={
                        "subformat": "streamOptimized",
                        "adapter_type": _ADAPTER.get(bus, "lsilogic"),
                    },
                    progress=progress,
                    workers=workers,
                )
                virtual = src.size
            file_size = os.path.getsize(target)
            disks.append(
                {
                    "path": name,
                    "format": "vmdk",
                    "subformat": "streamOptimized",
                    "bus": bus,
                    "size": virtual,
                    "file_size": file_size,
                    "populated_size": populated,
                }
            )
            staged.append((name, target))
            packed.append(PackedDisk(name, src_path, virtual, file_size, populated, ""))
        spec = dict(machine)
        spec["name"] = spec.get("name") or stem
        spec["disks"] = disks
        desc = ovfdesc.build(spec, version=version, system_type=system_type, flavor=flavor)
        desc_name = f"{stem}.ovf"
        size, digests = write_ova(output, desc_name, desc, staged, digest=digest, force=force)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for d in packed:
        d.digest = digests[d.name]
    return PackResult(
        output=output,
        descriptor=desc_name,
        ovf_version=version,
        manifest=ovfmf.algorithm(digest),
        disks=packed,
        size=size,
        seconds=time.monotonic() - t0,
    )


def write_package(
    outdir: str,
    name: str,
    machine: dict[str, Any],
    *,
    ovf_version: str = "1.0",
    digest: str = "sha256",
    flavor: str = "vmware",
    system_type: str = ovfdesc.DEFAULT_SYSTEM_TYPE,
    scsi_model: str = "lsilogic",
) -> str:
    """An OVF package in `outdir`: NAME.ovf and NAME.mf for disks already there (each
    disk's `path` is a file name inside `outdir`). Returns the descriptor's path."""
    disks = []
    entries: list[tuple[str, str]] = []
    for d in machine.get("disks") or []:
        href = ovfdesc.check_href(os.path.basename(str(d["path"])))
        path = os.path.join(outdir, href)
        h = ovfmf.hasher(digest)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _copy_hashing(f, None, size, h)
        entries.append((href, h.hexdigest()))
        disks.append(dict(d, path=href, file_size=size))
    desc = ovfdesc.build(
        dict(machine, disks=disks),
        version=ovf_version,
        system_type=system_type,
        flavor=flavor,
        scsi_model=scsi_model,
    )
    desc_name = f"{name}.ovf"
    h = ovfmf.hasher(digest)
    h.update(desc)
    mf = ovfmf.build([(desc_name, h.hexdigest()), *entries], digest)
    for fname, data in ((desc_name, desc), (f"{name}.mf", mf)):
        write_file_atomic(os.path.join(outdir, fname), data)
    return os.path.join(outdir, desc_name)


# -- reading ------------------------------------------------------------------------------

#: how much a gzip-compressed disk's file may exceed its capacity once decompressed: a
#: sparse format's own tables and markers (streamOptimized VMDK, the worst of them, adds at
#: most a 512-byte marker sector per 64 KiB grain, 1/128)
_GZIP_OVERHEAD = 64
_GZIP_FLOOR = 16 << 20
#: VMware's exports of a VM with snapshots: `disk1.vmdk.000000000`, `.000000001`, ...
_SNAPSHOT = re.compile(r"\.(\d+)")


@dataclass
class _Source:
    """An appliance opened for reading: its container, descriptor and manifest."""

    path: str
    kind: str  # "ovf" (a directory), "ova", "ova (gzip)", "ova (xz)" or "ova (zip)"
    container: Container
    descriptor_name: str  # inside the container: a subfolder's name is kept
    descriptor: bytes
    manifest: dict[str, ovfmf.Entry] | None  # by container name (relative to the top)
    manifest_complete: bool = True  # False when lines of it could not be read
    warnings: list[str] = field(default_factory=list)

    def member(self, href: str) -> str:
        """The file an href names. Hrefs are relative to the descriptor's folder. An href
        that is missing where numbered copies of it exist names the highest-numbered one:
        VMware exports a VM with snapshots so (virt-v2v picks it the same way, RHBZ#1570407)."""
        name = posixpath.join(posixpath.dirname(self.descriptor_name), ovfdesc.check_href(href))
        sizes = self.container.sizes
        if name not in sizes:
            numbered = [
                (int(m.group(1)), n)
                for n in sizes
                if n.startswith(name) and (m := _SNAPSHOT.fullmatch(n, len(name)))
            ]
            if not numbered:
                where = "package directory" if self.kind == "ovf" else "archive"
                raise CorruptImage(
                    f"{self.path}: {href} named by the descriptor is not in the {where}"
                )
            name = max(numbered)[1]
        self.container.check(name)
        return name

    def size_of(self, href: str) -> int:
        return self.container.sizes[self.member(href)]

    def entry_for(self, href: str) -> ovfmf.Entry | None:
        """The manifest's line for an href's file (or for the href itself, which a
        snapshot export lists in place of the file it holds)."""
        if self.manifest is None:
            return None
        named = posixpath.join(posixpath.dirname(self.descriptor_name), href)
        return self.manifest.get(self.member(href)) or self.manifest.get(named)


def _read_manifest(c: Container, name: str, warnings: list[str]) -> dict[str, ovfmf.Entry]:
    """The manifest's entries by container name: its lines name files relative to its own
    folder. Lines it cannot read are warnings, as virt-v2v makes them."""
    skipped: list[str] = []
    data = c.read(name, ovfmf.MAX_MANIFEST)
    entries = ovfmf.parse(data, where=name, warnings=skipped)
    warnings += skipped
    folder = posixpath.dirname(name)
    return {posixpath.normpath(posixpath.join(folder, n)): e for n, e in entries.items()}


def _open_source(path: str) -> _Source:
    c = open_container(path)
    warnings: list[str] = []
    if isinstance(c, Directory):
        desc_name = os.path.basename(path)
        mf_name = os.path.splitext(desc_name)[0] + ".mf"
        mfs = [mf_name] if mf_name in c.sizes else []
    else:
        descs = [n for n in c.sizes if n.lower().endswith(".ovf")]
        if len(descs) != 1:
            raise CorruptImage(f"{path}: {len(descs)} .ovf descriptors in the archive (expected 1)")
        desc_name = descs[0]
        if c.kind == "ova" and next(iter(c.sizes)) != desc_name:
            warnings.append("the descriptor is not the first archive member (OVA requires it)")
        if c.kind != "ova":
            warnings.append(
                f"the archive is a {c.kind[5:-1]} file; OVA is a plain tar (read anyway)"
            )
        mfs = [n for n in c.sizes if n.lower().endswith(".mf")]
        if len(mfs) > 1:
            raise CorruptImage(f"{path}: {len(mfs)} manifests in the archive")
        if any(n.lower().endswith(".cert") for n in c.sizes):
            warnings.append("the appliance is signed; the signature is not checked")
    data = c.read(desc_name, ovfdesc.MAX_DESCRIPTOR)
    mf = None
    complete = True
    if mfs:
        before = len(warnings)
        mf = _read_manifest(c, mfs[0], warnings)
        complete = len(warnings) == before
    return _Source(path, c.kind, c, desc_name, data, mf, complete, warnings)


def _verify_descriptor(src: _Source) -> None:
    if src.manifest is None:
        return
    entry = src.manifest.get(src.descriptor_name)
    if entry is None:
        src.warnings.append(
            f"the manifest does not list the descriptor {src.descriptor_name}: "
            "its digest is not checked"
        )
        return
    h = ovfmf.hasher(entry.algorithm)
    h.update(src.descriptor)
    if h.hexdigest() != entry.digest:
        raise CorruptImage(
            f"{src.path}: {src.descriptor_name}: {entry.algorithm} digest does not match the manifest"
        )


def load(path: str) -> tuple[_Source, ovfdesc.Descriptor]:
    """Open an appliance (.ovf beside its files, or an .ova: tar, gzip or xz tar, zip),
    verify the descriptor's digest and parse it; check that every referenced file exists
    with the size the descriptor declares and is listed in the manifest."""
    src = _open_source(path)
    _verify_descriptor(src)
    desc = ovfdesc.parse(src.descriptor, where=os.path.basename(path))
    used = {src.descriptor_name}
    for f in desc.files:
        href = f["href"]
        name = src.member(href)
        used |= {name, posixpath.join(posixpath.dirname(src.descriptor_name), href)}
        if name != posixpath.join(posixpath.dirname(src.descriptor_name), href):
            src.warnings.append(
                f"{href} is not in the appliance: its newest snapshot {name} is read"
            )
        actual = src.container.sizes[name]
        # a gzip file's ovf:size may be the size once decompressed (the spec leaves it
        # open): then the decompressed file must have exactly that size
        if f["size"] is not None and f["size"] != actual and f.get("compression") != "gzip":
            raise CorruptImage(f"{path}: {href} is {actual} bytes but ovf:size says {f['size']}")
        if src.manifest is not None and src.entry_for(href) is None:
            if src.manifest_complete:
                raise CorruptImage(f"{path}: {href} is not listed in the manifest")
            src.warnings.append(
                f"{href} is not verified: the manifest has no line it could read for it"
            )
    for name in sorted(set(src.manifest or ()) - used - set(src.container.sizes)):
        # VMware's snapshot exports list files they do not hold (RHBZ#1570407)
        src.warnings.append(f"the manifest lists {name}, which is not in the appliance (ignored)")
    if src.manifest is None:
        src.warnings.append("no manifest: file contents are not verified")
    return src, desc


def describe(path: str) -> dict[str, Any]:
    """What `p2v info` shows for an .ova or .ovf: the machine, the files, the manifest."""
    src, desc = load(path)
    algos = sorted({e.algorithm for e in (src.manifest or {}).values()})
    return {
        "filename": path,
        "format": src.kind,
        "ovf-version": desc.version,
        "virtual-system-type": desc.system_type,
        "descriptor": src.descriptor_name,
        "manifest": ",".join(algos) if algos else None,
        "files": [
            {"name": f["href"], "size": src.size_of(f["href"])}
            | ({"compression": f["compression"]} if f.get("compression") else {})
            for f in desc.files
        ],
        "machine": {k: v for k, v in desc.machine.items() if k != "warnings"},
        "warnings": src.warnings + desc.warnings,
    }


@dataclass
class _Job:
    """One disk file to take out of the appliance."""

    href: str
    member: str
    staged: str
    final: str
    file: dict[str, Any]  # the descriptor's File entry
    capacity: int


def _plan(src: _Source, desc: ovfdesc.Descriptor, base: str, out_format: str | None, force: bool):
    from ..output import check_output

    jobs: list[tuple[dict[str, Any], _Job | None]] = []
    seen: set[str] = set()
    for disk in desc.machine["disks"]:
        href = disk.get("path")
        if not href:
            jobs.append((disk, None))
            continue
        if href in seen:
            raise CorruptImage(f"{src.path}: file {href} is the file of two disks")
        seen.add(href)
        stem = os.path.splitext(href)[0]
        final = os.path.join(base, href)
        if out_format is not None:
            final = os.path.join(base, f"{stem}.{EXTENSIONS[out_format]}")
        if os.path.commonpath([os.path.realpath(final), base]) != base:
            raise UnsafeImage(f"{src.path}: {href} would be written outside {base}")
        check_output(final, force=force)
        staged = os.path.join(base, f".{href}.p2v-partial")
        file = desc.file_by_href(href) or {"href": href, "size": None, "compression": None}
        jobs.append((disk, _Job(href, src.member(href), staged, final, file, int(disk["size"]))))
    return jobs


def _check_space(src: _Source, jobs: list[_Job], outdir: str) -> None:
    """Refuse before writing when the files to extract cannot fit: an archive's declared
    sizes are known before any byte is decompressed."""
    need = sum(src.container.sizes[j.member] for j in jobs if not j.file.get("compression"))
    st = os.statvfs(outdir)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise FormatError(f"{src.path}: extracting needs {need} bytes and {outdir} has {free} free")


def unpack(
    path: str,
    outdir: str,
    *,
    out_format: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> UnpackResult:
    """Verify and extract an appliance's disks into `outdir`, converted to `out_format`
    when given; returns the machine description."""
    import formats

    from ..convert import convert

    src, desc = load(path)
    if out_format is not None:
        out_format = formats.normalize_format(out_format)
    os.makedirs(outdir, exist_ok=True)
    base = os.path.realpath(outdir)
    created: list[str] = []
    result = UnpackResult(
        source=path,
        outdir=outdir,
        ovf_version=desc.version,
        manifest=",".join(sorted({e.algorithm for e in src.manifest.values()}))
        if src.manifest
        else None,
        machine=desc.machine,
        warnings=src.warnings + desc.warnings,
    )
    disk_files = [d["path"] for d in desc.machine["disks"] if d.get("path")]
    for f in desc.files:
        if f["href"] not in disk_files:
            result.warnings.append(f"file {f['href']} is not a disk and is not extracted")
    plan = _plan(src, desc, base, out_format, force)
    jobs = {j.member: j for _, j in plan if j is not None}
    _check_space(src, list(jobs.values()), base)
    try:
        # in the container's own order: a compressed tar is read once, front to back
        with src.container.stream(list(jobs)) as files:
            for name, reader, size in files:
                job = jobs[name]
                created.append(job.staged)
                _extract(src, job, reader, size)
        for disk, job in plan:
            if job is None:
                result.warnings.append(f"disk {disk.get('disk_id')} has no file: not extracted")
                continue
            if out_format is None:
                os.replace(job.staged, job.final)
                created[created.index(job.staged)] = job.final
                fmt = formats.probe(job.final)
                with formats.open(job.final, fmt, allow_backing=False) as img:
                    size = img.size
            else:
                created.append(job.final)
                with formats.open(job.staged, allow_backing=False) as img:
                    fmt_in, size = img.format, img.size
                    if disk.get("format") and fmt_in != disk["format"]:
                        result.warnings.append(
                            f"{job.href}: the descriptor says {disk['format']}, the file is {fmt_in}"
                        )
                    convert(
                        img, job.final, out_format, force=force, progress=progress, workers=workers
                    )
                os.unlink(job.staged)
                created.remove(job.staged)
                fmt = out_format
            disk["output"] = os.path.basename(job.final)
            result.disks.append(UnpackedDisk(job.href, job.final, fmt, size))
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
    return result


class _Hashing:
    """Exactly `size` bytes of a container's file, each fed to the hasher as it passes."""

    def __init__(self, f: Readable, size: int, hasher, where: str) -> None:
        self._f, self.left, self._h, self._where = f, size, hasher, where

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        parts = []
        while n:
            block = self._f.read(n)
            if not block:
                raise CorruptImage(f"{self._where} ends {self.left} bytes short of its size")
            parts.append(block)
            self._h.update(block)
            self.left -= len(block)
            n -= len(block)
        return b"".join(parts)

    def drain(self) -> None:
        while self.left:
            self.read(COPY_CHUNK)


def _gzip_limits(job: _Job, stored: int) -> tuple[int, int | None]:
    """(cap, exact): the most a gzip file may decompress to, and its exact size when
    ovf:size gives it (an ovf:size other than the stored size is the decompressed one)."""
    declared = job.file.get("size")
    if declared is not None and declared != stored:
        return declared, declared
    return job.capacity + job.capacity // _GZIP_OVERHEAD + _GZIP_FLOOR, None


def _extract(src: _Source, job: _Job, f: Readable, size: int) -> None:
    """Copy one file out of the appliance, verifying its digest (of the file as stored)
    as it streams, and decompressing it when the descriptor says it is gzip."""
    entry = src.entry_for(job.href)
    h = ovfmf.hasher(entry.algorithm if entry else "sha256")
    where = f"{src.path}: {job.member}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(job.staged, flags, 0o644)
    reader = _Hashing(f, size, h, where)
    with os.fdopen(fd, "wb") as out:
        if job.file.get("compression") == "gzip":
            _gunzip(reader, out, *_gzip_limits(job, size), where)
        else:
            while reader.left:
                out.write(reader.read(COPY_CHUNK))
    reader.drain()
    if entry is not None and h.hexdigest() != entry.digest:
        raise CorruptImage(f"{where}: {entry.algorithm} digest does not match the manifest")


def _gunzip(reader: _Hashing, out: BinaryIO, cap: int, exact: int | None, where: str) -> None:
    written = 0
    try:
        # typeshed's GzipFile wants a file; it only ever calls read() on a reader
        with gzip.GzipFile(fileobj=reader) as gz:  # type: ignore[call-overload]
            while block := gz.read(COPY_CHUNK):
                written += len(block)
                if written > cap:
                    raise UnsafeImage(
                        f"{where}: decompresses past {cap} bytes, more than "
                        f"{'its ovf:size' if exact is not None else 'its disk capacity allows'}"
                    )
                out.write(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptImage(f"{where}: gzip data is damaged ({exc})") from exc
    if exact is not None and written != exact:
        raise CorruptImage(f"{where}: decompresses to {written} bytes but ovf:size says {exact}")

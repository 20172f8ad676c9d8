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
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import CorruptImage, FormatError, UnsafeImage
from ..fileio import write_file_atomic
from . import descriptor as ovfdesc
from . import manifest as ovfmf
from . import ustar

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


@dataclass
class _Source:
    """Where an appliance's files are: members of an OVA, or files beside a .ovf."""

    path: str
    kind: str  # "ova" or "ovf"
    descriptor_name: str
    descriptor: bytes
    manifest: dict[str, ovfmf.Entry] | None
    members: dict[str, ustar.Member] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def size_of(self, name: str) -> int:
        if self.kind == "ova":
            return self.members[name].size
        return os.path.getsize(self.file_path(name))

    def file_path(self, name: str) -> str:
        base = os.path.dirname(os.path.abspath(self.path))
        path = os.path.join(base, ovfdesc.check_href(name))
        real = os.path.realpath(path)
        if os.path.commonpath([real, os.path.realpath(base)]) != os.path.realpath(base):
            raise UnsafeImage(f"ovf: file {name} leads outside the package directory")
        if not os.path.isfile(real):
            raise FormatError(f"ovf: file {name} named by the descriptor is missing")
        return path

    @contextlib.contextmanager
    def open_file(self, name: str) -> Iterator[tuple[BinaryIO, int]]:
        if self.kind == "ova":
            m = self.members[name]
            with open(self.path, "rb") as f:
                f.seek(m.offset)
                yield f, m.size
        else:
            with open(self.file_path(name), "rb") as f:
                yield f, os.fstat(f.fileno()).st_size


def _read_member(path: str, m: ustar.Member, cap: int) -> bytes:
    if m.size > cap:
        raise UnsafeImage(f"ova: member {m.name} is {m.size} bytes (at most {cap} expected)")
    with open(path, "rb") as f:
        f.seek(m.offset)
        data = f.read(m.size)
    if len(data) != m.size:
        raise CorruptImage(f"ova: member {m.name} is truncated")
    return data


def _open_source(path: str) -> _Source:
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if path.lower().endswith(".ovf"):
        with open(path, "rb") as f:
            data = f.read(ovfdesc.MAX_DESCRIPTOR + 1)
        mf_path = os.path.splitext(path)[0] + ".mf"
        mf = None
        if os.path.isfile(mf_path):
            with open(mf_path, "rb") as f:
                mf = ovfmf.parse(f.read(ovfmf.MAX_MANIFEST + 1), where=os.path.basename(mf_path))
        return _Source(path, "ovf", os.path.basename(path), data, mf)
    try:
        members = ustar.read_members(path)
    except FormatError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    by_name: dict[str, ustar.Member] = {}
    for m in members:
        if m.name in by_name:
            raise CorruptImage(f"{path}: member {m.name} appears twice")
        by_name[m.name] = m
    descs = [m for m in members if m.name.lower().endswith(".ovf")]
    if len(descs) != 1:
        raise CorruptImage(f"{path}: {len(descs)} .ovf descriptors in the archive (expected 1)")
    desc = descs[0]
    warnings = []
    if members[0] is not desc:
        warnings.append("the descriptor is not the first archive member (OVA requires it)")
    mfs = [m for m in members if m.name.lower().endswith(".mf")]
    if len(mfs) > 1:
        raise CorruptImage(f"{path}: {len(mfs)} manifests in the archive")
    mf = None
    if mfs:
        mf = ovfmf.parse(_read_member(path, mfs[0], ovfmf.MAX_MANIFEST), where=mfs[0].name)
    if any(m.name.lower().endswith(".cert") for m in members):
        warnings.append("the appliance is signed; the signature is not checked")
    data = _read_member(path, desc, ovfdesc.MAX_DESCRIPTOR)
    return _Source(path, "ova", desc.name, data, mf, by_name, warnings)


def _verify_bytes(src: _Source, name: str, data: bytes) -> None:
    if src.manifest is None:
        return
    entry = src.manifest.get(name)
    if entry is None:
        raise CorruptImage(f"{src.path}: {name} is not listed in the manifest")
    h = ovfmf.hasher(entry.algorithm)
    h.update(data)
    if h.hexdigest() != entry.digest:
        raise CorruptImage(
            f"{src.path}: {name}: {entry.algorithm} digest does not match the manifest"
        )


def _check_digest(src: _Source, name: str, got: str, algo: str) -> None:
    assert src.manifest is not None
    if got != src.manifest[name].digest:
        raise CorruptImage(f"{src.path}: {name}: {algo} digest does not match the manifest")


def load(path: str) -> tuple[_Source, ovfdesc.Descriptor]:
    """Open an .ova or .ovf, verify the descriptor's digest and parse it; check that every
    referenced file exists with the size the descriptor declares."""
    src = _open_source(path)
    _verify_bytes(src, src.descriptor_name, src.descriptor)
    desc = ovfdesc.parse(src.descriptor, where=os.path.basename(path))
    for f in desc.files:
        if src.kind == "ova" and f["href"] not in src.members:
            raise CorruptImage(f"{path}: {f['href']} named by the descriptor is not in the archive")
        actual = src.size_of(f["href"])
        if f["size"] is not None and f["size"] != actual:
            raise CorruptImage(
                f"{path}: {f['href']} is {actual} bytes but ovf:size says {f['size']}"
            )
        if src.manifest is not None and f["href"] not in src.manifest:
            raise CorruptImage(f"{path}: {f['href']} is not listed in the manifest")
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
        "files": [{"name": f["href"], "size": src.size_of(f["href"])} for f in desc.files],
        "machine": {k: v for k, v in desc.machine.items() if k != "warnings"},
        "warnings": src.warnings + desc.warnings,
    }


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
    from ..output import check_output

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
    try:
        for disk in desc.machine["disks"]:
            href = disk.get("path")
            if not href:
                result.warnings.append(f"disk {disk.get('disk_id')} has no file: not extracted")
                continue
            stem = os.path.splitext(href)[0]
            final = os.path.join(base, href)
            if out_format is not None:
                final = os.path.join(base, f"{stem}.{EXTENSIONS[out_format]}")
            if os.path.commonpath([os.path.realpath(final), base]) != base:
                raise UnsafeImage(f"{path}: {href} would be written outside {outdir}")
            check_output(final, force=force)
            staged = os.path.join(base, f".{href}.p2v-partial")
            created.append(staged)
            _extract(src, href, staged)
            if out_format is None:
                os.replace(staged, final)
                created[-1] = final
                fmt = formats.probe(final)
                with formats.open(final, fmt, allow_backing=False) as img:
                    size = img.size
            else:
                created.append(final)
                with formats.open(staged, allow_backing=False) as img:
                    fmt_in, size = img.format, img.size
                    if disk.get("format") and fmt_in != disk["format"]:
                        result.warnings.append(
                            f"{href}: the descriptor says {disk['format']}, the file is {fmt_in}"
                        )
                    convert(img, final, out_format, force=force, progress=progress, workers=workers)
                os.unlink(staged)
                created.remove(staged)
                fmt = out_format
            disk["output"] = os.path.basename(final)
            result.disks.append(UnpackedDisk(href, final, fmt, size))
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
    return result


def _extract(src: _Source, name: str, target: str) -> None:
    """Copy one file out of the appliance, verifying its digest as it streams."""
    entry = src.manifest.get(name) if src.manifest else None
    h = ovfmf.hasher(entry.algorithm if entry else "sha256")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out, src.open_file(name) as (f, size):
        _copy_hashing(f, out, size, h)
    if entry is not None:
        _check_digest(src, name, h.hexdigest(), entry.algorithm)

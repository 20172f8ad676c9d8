"""The image commands' library side: each returns a dataclass that the CLI prints.

Spelled after qemu-img (info, convert, check, compare, map, create) so habits carry over;
JSON keys are qemu-img's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import formats
from formats.compare import CompareResult, compare_images
from formats.convert import ConvertStats, convert
from formats.extents import Kind
from formats.output import atomic_create

log = logging.getLogger(__name__)

APPLIANCE_SUFFIXES = (".ova", ".ovf")


@dataclass
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None = None
    backing_filename: str | None = None
    backing_format: str | None = None
    format_specific: dict[str, Any] | None = None
    backing_image: ImageInfo | None = None


@dataclass
class CheckReport:
    filename: str
    format: str
    check_errors: int
    corruptions: int
    leaks: int
    corruption_details: list[str] = field(default_factory=list)
    leak_details: list[str] = field(default_factory=list)
    checked: bool = True
    exit_code: int = 0


@dataclass
class MapEntry:
    start: int
    length: int
    data: bool
    zero: bool


def open_source(
    path: str, fmt: str | None = None, *, backing_dirs: tuple[str, ...] | None = None
) -> formats.Image:
    return formats.open(path, fmt, backing_dirs=backing_dirs)


def _info_of(img: formats.Image, with_chain: bool) -> ImageInfo:
    specific = dict(img.info())
    cluster = specific.pop("cluster-size", None)
    backing_name = specific.pop("backing-filename", None)
    backing_fmt = specific.pop("backing-format", None)
    info = ImageInfo(
        filename=img.path or "",
        format=img.format,
        virtual_size=img.size,
        actual_size=img.actual_size(),
        cluster_size=cluster,
        backing_filename=backing_name,
        backing_format=backing_fmt,
        format_specific={"type": img.format, "data": specific} if specific else None,
    )
    if with_chain and img.backing is not None:
        info.backing_image = _info_of(img.backing, True)
    return info


def describe(
    path: str,
    fmt: str | None = None,
    *,
    backing_chain: bool = False,
    backing_dirs: tuple[str, ...] | None = None,
) -> ImageInfo | dict[str, Any]:
    """`p2v info`: an image's description, or an appliance's for .ova/.ovf."""
    if fmt is None and path.lower().endswith(APPLIANCE_SUFFIXES):
        from formats import ovf

        return ovf.describe(path)
    with open_source(path, fmt, backing_dirs=backing_dirs) as img:
        return _info_of(img, backing_chain)


def check(path: str, fmt: str | None = None) -> CheckReport:
    with formats.open(path, fmt, allow_backing=False) as img:
        res = img.check()
        return CheckReport(
            filename=path,
            format=img.format,
            check_errors=len(res.corruptions),
            corruptions=len(res.corruptions),
            leaks=len(res.leaks),
            corruption_details=list(res.corruptions),
            leak_details=list(res.leaks),
            checked=res.checked,
            exit_code=res.exit_code if res.checked else 63,
        )


def compare(
    a: str,
    b: str,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    *,
    strict: bool = False,
    progress=None,
) -> CompareResult:
    with open_source(a, fmt_a) as ia, open_source(b, fmt_b) as ib:
        return compare_images(ia, ib, strict=strict, progress=progress)


def map_image(path: str, fmt: str | None = None) -> list[MapEntry]:
    with open_source(path, fmt) as img:
        return [
            MapEntry(e.start, e.length, data=e.kind == Kind.DATA, zero=e.kind == Kind.ZERO)
            for e in img.extents()
        ]


def create(
    path: str,
    fmt: str,
    size: int | None,
    *,
    options: dict[str, Any] | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    force: bool = False,
) -> ImageInfo:
    opts = dict(options or {})
    if backing_file is not None:
        backing_path = os.path.join(os.path.dirname(os.path.abspath(path)), backing_file)
        with formats.open(backing_path, backing_fmt) as base:
            if size is None:
                size = base.size
            backing_fmt = backing_fmt or base.format
        opts["backing_file"] = backing_file
        opts["backing_fmt"] = backing_fmt
    if size is None:
        raise formats.FormatError("an image size is required (or a backing file to take it from)")
    with atomic_create(path, fmt, size, force=force, **opts):
        pass
    return describe(path, fmt)  # type: ignore[return-value]


@dataclass
class ConvertRequest:
    source: str
    output: str
    out_format: str
    source_format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    compress: bool = False
    backing_file: str | None = None
    backing_format: str | None = None
    backing_dirs: tuple[str, ...] | None = None
    force: bool = False
    durable: bool = True
    partition: int | None = None
    wrap_partition: bool = False
    table: str = "gpt"
    skip_unused: bool = False
    workers: int | None = None
    share: bool = True


def run_convert(req: ConvertRequest, progress=None) -> ConvertStats:
    """`p2v convert`: choose the source view (disk, one partition, wrapped partition), the
    extents to copy (all allocated, or only the filesystems' used blocks), and convert."""
    src = open_source(req.source, req.source_format, backing_dirs=req.backing_dirs)
    with src:
        view = src
        if req.partition is not None:
            from formats import partitions

            view = partitions.partition_image(src, req.partition)
        if req.wrap_partition:
            from formats import disk

            view = disk.wrap_partition(view, req.table)
        only = None
        if req.skip_unused:
            from formats import disk

            only = disk.used_extents(view)
        return convert(
            view,
            req.output,
            req.out_format,
            options=req.options,
            force=req.force,
            durable=req.durable,
            compress=req.compress,
            backing_file=req.backing_file,
            backing_fmt=req.backing_format,
            backing_dirs=req.backing_dirs,
            progress=progress,
            workers=req.workers,
            only=only,
            sources=tuple(src.files()),
            share=req.share,
        )

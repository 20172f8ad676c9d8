"""Growing and shrinking images, keeping a GPT valid (`qemu-img resize` plus what
`sgdisk -e` does afterwards).

Two ways, chosen by format:

- **in place**: an Image with a `resize(new_size)` method (qcow2) is asked to, raw is
  truncated. A GPT's backup entries and header are then written at the new last sectors
  (before the cut, when shrinking) and the protective MBR is stretched to match.
- **rewrite** (vmdk, vpc, vhdx, vdi): the image is copied through the conversion engine
  into NAME.partial of the same format with the same creation options (subformat,
  adapter, block size, log size, sector size, parent) at the new size, and renamed over
  the original. The source is a view of the old image cut or zero-extended to the new
  size with the GPT's new tables laid over it, so the copy is written once, in order
  (streamOptimized VMDK needs that), and the original is never modified: a failure or a
  crash leaves it as it was.

The CLI asks for --shrink before shrinking (as qemu-img does); shrinking below the end of
the last partition (on GPT, plus the 33 sectors its backup needs) is always refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from . import normalize_format, probe
from . import open as open_image
from .convert import convert_image
from .errors import FormatError, UnsupportedFeature
from .image import Image
from .output import atomic_create
from .partitions import gpt, mbr, read_table
from .partitions.table import PartitionTable
from .views import CompositeImage, Piece

log = logging.getLogger(__name__)

#: GPT's backup needs the last 33 sectors (32 of entries, 1 header) at 512 bytes each
GPT_TAIL_SECTORS = 33

#: formats resized where they lie; the others are rewritten
IN_PLACE = ("raw", "qcow2")
#: VMDK subformats made of a descriptor file and extent files beside it
VMDK_MULTI_FILE = ("monolithicFlat", "vmfs", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


@dataclass
class ResizeResult:
    filename: str
    format: str
    old_size: int
    #: the size the image has now: a format may round the request up (see `resize`)
    new_size: int
    table: str | None = None
    gpt_backup_moved: bool = False
    #: "in-place" or "rewrite"
    method: str = "in-place"


def resize(
    image_path: str, new_size: int, fmt: str | None = None, *, shrink: bool = True
) -> ResizeResult:
    """Resize the image at `image_path` to `new_size` bytes. `shrink=False` refuses any
    shrinking (the CLI's default, as qemu-img's without --shrink); shrinking below the
    end of the last partition is always refused.

    Formats round the size as their creation does: to 512-byte sectors (vhdx: its logical
    sector size; streamOptimized VMDK: 64 KiB grains); a VHD keeps its sizing rule: one
    sized by its footer (qemu's force_size, Hyper-V, Disk2vhd) gets the size exactly, one
    sized by CHS geometry (Virtual PC, qemu's default) the first CHS capacity that holds
    it. `ResizeResult.new_size` is the size the image ends up with."""
    if new_size < 0:
        raise FormatError(f"invalid size {new_size}")
    if not os.path.exists(image_path):
        raise FormatError(f"{image_path}: no such file")
    fmt = normalize_format(fmt) if fmt else probe(image_path)
    if fmt in IN_PLACE:
        return _resize_in_place(image_path, new_size, fmt, shrink)
    return _resize_rewrite(image_path, new_size, fmt, shrink)


def _plan(
    img: Image, path: str, new_size: int, shrink: bool, result: ResizeResult
) -> PartitionTable | None:
    """The checks both ways share; returns the partition table, if any."""
    table = read_table(img)
    result.table = table.kind if table else None
    if new_size < img.size:
        if not shrink:
            raise FormatError(
                f"{path}: shrinking from {img.size} to {new_size} bytes needs --shrink "
                f"(data past the new end is lost)"
            )
        _check_shrink(table, new_size)
    if table is not None and table.kind == "gpt" and new_size % table.sector_size:
        raise FormatError(f"{path}: a GPT disk's size must be a multiple of {table.sector_size}")
    return table


def _resize_in_place(image_path: str, new_size: int, fmt: str, shrink: bool) -> ResizeResult:
    with open_image(image_path, fmt, writable=True) as img:
        old = img.size
        result = ResizeResult(image_path, img.format, old, new_size)
        if new_size == old:
            return result
        snaps = img.info().get("snapshots")
        if snaps:
            # qemu-img refuses too: a snapshot's L1 table describes the old size
            raise UnsupportedFeature(
                f"{image_path}: has {len(snaps)} internal snapshot(s); delete them before resizing"
            )
        table = _plan(img, image_path, new_size, shrink, result)
        is_gpt = table is not None and table.kind == "gpt"
        if is_gpt and new_size < old:
            assert table is not None
            _write_gpt(img, table, new_size)  # inside the old size, before cutting it off
            _resize_format(img, new_size)
            result.gpt_backup_moved = True
        else:
            _resize_format(img, new_size)
            if is_gpt:
                assert table is not None
                _write_gpt(img, table, new_size)
                result.gpt_backup_moved = True
        img.flush()
        result.new_size = img.size
    return result


def _check_shrink(table: PartitionTable | None, new_size: int) -> None:
    if table is None or not table.partitions:
        return
    last = max(table.partitions, key=lambda p: p.end)
    need = last.end
    if table.kind == "gpt":
        need += GPT_TAIL_SECTORS * table.sector_size
    if new_size < need:
        raise FormatError(
            f"shrinking to {new_size} bytes would cut partition {last.number} "
            f"(it ends at byte {last.end}; at least {need} bytes are needed)"
        )


def _resize_format(img: Image, new_size: int) -> None:
    method = getattr(img, "resize", None)
    if callable(method):
        method(new_size)
    elif img.format == "raw" and hasattr(img, "fd"):
        if getattr(img, "is_block_device", False):
            raise UnsupportedFeature(f"{img.path}: a block device cannot be resized")
        os.ftruncate(img.fd, new_size)
        img.size = new_size
    else:
        raise UnsupportedFeature(f"{img.format}: resizing is not supported for this format")
    if img.size != new_size:
        raise FormatError(f"{img.format}: resize left the image at {img.size} bytes")


def _gpt_writes(img: Image, table: PartitionTable, new_size: int) -> list[tuple[int, bytes]]:
    """Both GPT copies for a disk of `new_size` bytes, entries unchanged, as (offset,
    bytes) in disk order; the old backup header, when it stays inside the disk, is wiped
    (a stale one in what is now free space could be found by a recovery tool and
    trusted)."""
    ss = table.sector_size
    raw = table.raw
    old_backup = raw.get("backup_lba")
    writes = gpt.build(
        table,
        new_size,
        entries=raw["entries"],
        entry_size=raw["entry_size"],
        first_usable_lba=raw["first_usable_lba"],
        old_sector0=img.read(0, mbr.SECTOR),
    )
    for off, data in writes:
        if off + len(data) > new_size:
            raise FormatError("gpt: the new table does not fit the resized image")
    new_last = new_size // ss - 1
    if raw.get("backup_ok") and old_backup is not None and old_backup < new_last:
        wipe = old_backup * ss
        # a small growth puts the new backup array over the old header: it is gone anyway
        if not any(off < wipe + ss and wipe < off + len(data) for off, data in writes):
            writes.append((wipe, bytes(ss)))
    writes.sort(key=lambda w: w[0])
    return writes


def _write_gpt(img: Image, table: PartitionTable, new_size: int) -> None:
    for off, data in _gpt_writes(img, table, new_size):
        img.write(off, data)


# -- rewriting ------------------------------------------------------------------------


def _resize_rewrite(path: str, new_size: int, fmt: str, shrink: bool) -> ResizeResult:
    # a symlink stays one: the image it points to is what is replaced
    image_path = os.path.realpath(path)
    with open_image(image_path, fmt) as src:
        old = src.size
        result = ResizeResult(path, src.format, old, new_size, method="rewrite")
        opts = creation_options(src, image_path)
        table = _plan(src, image_path, new_size, shrink, result)
        if new_size == old:
            return result
        multi = src.format == "vmdk" and opts.get("subformat") in VMDK_MULTI_FILE
        target = _temporary_name(image_path) if multi else image_path
        parent = src.backing if "backing_file" in opts else None
        # the original is only read: nothing of it counts as the output's input
        with atomic_create(target, src.format, new_size, force=True, **opts) as dst:
            size = dst.size
            if size < new_size:
                raise FormatError(f"{src.format}: created {size} bytes for {new_size}")
            if size != new_size:
                log.info("%s: %d bytes rounded up to %d by the format", image_path, new_size, size)
                _check_shrink(table, size)
            view = _resized_view(src, table, size)
            convert_image(view, dst, backing=parent)
            result.gpt_backup_moved = table is not None and table.kind == "gpt"
        result.new_size = size
        old_files = [f for f in src.files() if os.path.abspath(f) != os.path.abspath(image_path)]
    if multi:
        _adopt_vmdk(image_path, target, old_files)
    _sync_dir(image_path)
    return result


def _resized_view(src: Image, table: PartitionTable | None, size: int) -> Image:
    """`src` cut or zero-extended to `size`, with a GPT's new tables laid over it."""
    writes = _gpt_writes(src, table, size) if table is not None and table.kind == "gpt" else []
    pieces: list[Piece] = []
    pos = 0

    def fill(upto: int) -> None:
        nonlocal pos
        if upto <= pos:
            return
        keep = min(upto, src.size)
        if keep > pos:
            pieces.append(Piece(keep - pos, image=src, offset=pos))
        if upto > max(pos, src.size):
            pieces.append(Piece(upto - max(pos, src.size)))
        pos = upto

    for off, data in writes:
        fill(off)
        pieces.append(Piece(len(data), data=bytes(data)))
        pos = off + len(data)
    fill(size)
    view = CompositeImage(pieces, path=src.path)
    view.format = src.format
    view.cluster_size = src.cluster_size
    return view


def creation_options(img: Image, path: str) -> dict[str, Any]:
    """The options that re-create `img` as it was made (what `qemu-img info` shows of its
    subformat, adapter, block and sector sizes, and its parent)."""
    info = img.info()
    opts: dict[str, Any] = {}
    fmt = img.format
    if fmt == "vmdk":
        from .vmdk.writer import ADAPTERS, SUBFORMATS

        sub = info.get("create-type")
        if sub not in SUBFORMATS:
            raise UnsupportedFeature(
                f"{path}: vmdk {sub} images are read-only here, so they cannot be resized "
                f"(convert to one of: {', '.join(SUBFORMATS)})"
            )
        opts["subformat"] = sub
        ddb = img.descriptor.ddb  # type: ignore[attr-defined]
        if ddb.get("ddb.adapterType") in ADAPTERS:
            opts["adapter_type"] = ddb["ddb.adapterType"]
        for key, opt in (
            ("ddb.virtualHWVersion", "hwversion"),
            ("ddb.toolsVersion", "toolsversion"),
        ):
            if str(ddb.get(key, "")).isdigit():
                opts[opt] = ddb[key]
        if ddb.get("ddb.uuid"):
            opts["uuid"] = ddb["ddb.uuid"]  # vSphere knows the disk by it
    elif fmt == "vpc":
        sub = info["subformat"]
        if sub != "differencing":
            opts["subformat"] = sub
        if sub != "fixed":
            opts["block_size"] = info["block-size"]
        opts["force_size"] = info["size-source"] == "current-size"
        # children name their parent by it, Hyper-V and VirtualBox register the disk by it
        opts["unique_id"] = info["unique-id"]
    elif fmt == "vhdx":
        if info["subformat"] == "fixed":
            opts["subformat"] = "fixed"
        opts["block_size"] = info["block-size"]
        opts["log_size"] = info["log-size"]
        opts["logical_sector_size"] = info["logical-sector-size"]
        if info.get("virtual-disk-id"):
            opts["disk_id"] = info["virtual-disk-id"]  # Hyper-V and children know it by it
    elif fmt == "vdi":
        opts["subformat"] = info["subformat"]
        opts["uuid"] = info["uuid"]  # VirtualBox's media registry knows the disk by it
        if info["block-size"] != 1 << 20:
            log.warning(
                "%s: rewritten with 1 MiB blocks (was %d): the only size we create",
                path,
                info["block-size"],
            )
    else:
        raise UnsupportedFeature(f"{fmt}: resizing is not supported for this format")
    differencing = info.get("subformat") == "differencing" or info.get("parent-file-name-hint")
    if differencing:
        if img.backing is None or not img.backing.path:
            raise UnsupportedFeature(f"{path}: its parent image is not available")
        base = os.path.dirname(os.path.abspath(path))
        opts["backing_file"] = os.path.relpath(os.path.abspath(img.backing.path), base)
    return opts


def _temporary_name(path: str) -> str:
    """A hidden name beside `path` for a multi-file VMDK under construction: its extents
    are named after it, so they never collide with the extents still in use."""
    d, base = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(base)
    return os.path.join(d, f".{root}.resize{os.getpid()}{ext or '.vmdk'}")


def _adopt_vmdk(path: str, temp: str, old_files: list[str]) -> None:
    """Put the rewritten multi-file VMDK at `path` under its usual extent names. At every
    step the descriptor at `path` names extent files that exist and hold the new image:
    first the temporary ones, then hard links under the usual names."""
    d = os.path.dirname(os.path.abspath(path))
    os.replace(temp, path)
    for old in old_files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    troot = os.path.splitext(os.path.basename(temp))[0]
    root = os.path.splitext(os.path.basename(path))[0]
    with open(path, "rb") as f:
        text = f.read()
    renamed: list[str] = []
    for name in sorted(os.listdir(d)):
        if not name.startswith(troot + "-") or f'"{name}"'.encode() not in text:
            continue
        usual = root + name[len(troot) :]
        if os.path.lexists(os.path.join(d, usual)):
            continue  # somebody else's file: the temporary name stays
        os.link(os.path.join(d, name), os.path.join(d, usual))
        text = text.replace(f'"{name}"'.encode(), f'"{usual}"'.encode())
        renamed.append(name)
    if not renamed:
        return
    partial = path + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    for name in renamed:
        os.unlink(os.path.join(d, name))


def _sync_dir(path: str) -> None:
    """The rename is durable only once the directory is written."""
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Disk images, partition tables, filesystems' used-block maps and OVF appliances.

`open`, `create` and `probe` dispatch to one module per format; names are spelled as
qemu-img spells them (`vpc` for VHD), with friendly aliases.
"""

from __future__ import annotations

import builtins
import importlib
import os
from types import ModuleType

from . import magic
from .backing import BackingPolicy
from .errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from .extents import Extent, Kind
from .image import CheckResult, Image

__all__ = [
    "FORMATS",
    "BackingPolicy",
    "CheckResult",
    "CorruptImage",
    "Extent",
    "FormatError",
    "Image",
    "Kind",
    "UnsafeImage",
    "UnsupportedFeature",
    "create",
    "normalize_format",
    "open",
    "open_image",
    "probe",
]

#: qemu-img name -> module; probe order is this order, raw last (it matches anything)
FORMATS: dict[str, str] = {
    "qcow2": "formats.qcow2",
    "vmdk": "formats.vmdk",
    "vhdx": "formats.vhdx",
    "vdi": "formats.vdi",
    "vpc": "formats.vhd",
    "raw": "formats.raw",
}

ALIASES = {"vhd": "vpc", "img": "raw", "qcow": "qcow2"}


def normalize_format(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        known = ", ".join(sorted({*FORMATS, *ALIASES}))
        raise FormatError(f"unknown format {name!r} (known: {known})")
    return key


def _module(fmt: str) -> ModuleType:
    try:
        return importlib.import_module(FORMATS[fmt])
    except ModuleNotFoundError as exc:
        if exc.name == FORMATS[fmt]:
            raise UnsupportedFeature(f"format {fmt!r} is not available in this build") from exc
        raise


def probe(path: str) -> str:
    """Name the format of `path` from its magic bytes; raw when nothing matches."""
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(magic.HEAD)
            size = f.seek(0, os.SEEK_END)
            tail = b""
            if size >= magic.TAIL:
                f.seek(size - magic.TAIL)
                tail = f.read(magic.TAIL)
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
    return magic.identify(head, tail)


def open_image(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    policy: BackingPolicy | None = None,
) -> Image:
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory")
    fmt = normalize_format(fmt) if fmt else probe(path)
    policy = policy or BackingPolicy()
    return _module(fmt).open_image(path, writable=writable, policy=policy)


def open(  # mirrors builtins.open on purpose: the library's entry point
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    allow_backing: bool = True,
    backing_dirs: tuple[str, ...] | None = None,
) -> Image:
    """Open an image; probe the format unless `fmt` is given (raw never follows backing)."""
    policy = BackingPolicy(allow=allow_backing, dirs=backing_dirs)
    return open_image(path, fmt, writable=writable, policy=policy)


def create(path: str, fmt: str, size: int, **options) -> Image:
    """Create a new image at `path` (which must not exist) and return it writable."""
    fmt = normalize_format(fmt)
    if size < 0:
        raise FormatError(f"invalid size {size}")
    return _module(fmt).create(path, size, **options)

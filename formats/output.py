"""Writing an image safely: to NAME.partial beside the target, renamed on success.

An existing output is never replaced without `force`; a failure removes every file the
half-written image consists of, so nothing incomplete ever stands under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from .errors import FormatError
from .image import Image

PARTIAL_SUFFIX = ".partial"


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, *, force: bool = False, sources: tuple[str, ...] = ()) -> None:
    for src in sources:
        if same_file(src, path):
            raise FormatError(f"{path}: output is the same file as input {src}")
    if os.path.lexists(path) and not force:
        raise FormatError(f"{path}: output exists (use --force to overwrite)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FormatError(f"{path}: directory {parent} does not exist")


@contextlib.contextmanager
def atomic_create(
    path: str,
    fmt: str,
    size: int,
    *,
    force: bool = False,
    sources: tuple[str, ...] = (),
    durable: bool = True,
    **options: Any,
) -> Iterator[Image]:
    from . import create

    check_output(path, force=force, sources=sources)
    partial = path + PARTIAL_SUFFIX
    if os.path.lexists(partial):
        os.unlink(partial)
    img = create(partial, fmt, size, final_path=path, **options)
    img.durable = durable
    try:
        yield img
        img.close()
    except BaseException:
        img.writable = False
        with contextlib.suppress(Exception):
            img.close()
        for f in img.files():
            with contextlib.suppress(OSError):
                os.unlink(f)
        raise
    os.replace(partial, path)

"""Comparing two images as a guest sees them (qemu-img compare's semantics).

Ranges both maps call zero are skipped unread; a size difference is allowed when the
larger image's extra range reads as zeros (qemu-img compare without -s). Strict (-s), as
qemu-img's: different sizes differ, and so does a range one map calls data and the other
zero, whatever its bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .extents import Extent, Kind, overlay
from .image import Image

CHUNK = 4 << 20


@dataclass
class CompareResult:
    identical: bool
    first_difference: int | None
    size_a: int
    size_b: int
    message: str


def _ranges(a: Image, b: Image, end: int) -> Iterator[tuple[int, int]]:
    for start, n, ka, kb in overlay(a.extents(0, end), b.extents(0, end)):
        if ka == kb == Kind.ZERO:
            continue
        pos = start
        while pos < start + n:
            step = min(CHUNK, start + n - pos)
            yield pos, step
            pos += step


def _first_nonzero_data(img: Image, start: int) -> int | None:
    for ext in img.extents(start, img.size):
        if ext.kind != Kind.DATA:
            continue
        pos = ext.start
        while pos < ext.end:
            step = min(CHUNK, ext.end - pos)
            buf = img.read(pos, step)
            nz = np.flatnonzero(np.frombuffer(buf, np.uint8))
            if len(nz):
                return pos + int(nz[0])
            pos += step
    return None


def _status_mismatch(a: Image, b: Image) -> int | None:
    """The first offset the two maps disagree on (data against zero), or None."""
    for start, _n, ka, kb in overlay(a.extents(0, a.size), b.extents(0, b.size)):
        if ka != kb:
            return start
    return None


def compare_images(
    a: Image,
    b: Image,
    *,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CompareResult:
    common = min(a.size, b.size)
    if strict:
        # qemu-img checks these before any content
        if a.size != b.size:
            return CompareResult(False, common, a.size, b.size, "Strict mode: Image size mismatch!")
        where = _status_mismatch(a, b)
        if where is not None:
            msg = f"Strict mode: Offset {where} block status mismatch!"
            return CompareResult(False, where, a.size, b.size, msg)

    def fetch(rng: tuple[int, int]) -> tuple[int, bytes, bytes]:
        off, n = rng
        return off, a.read(off, n), b.read(off, n)

    with cf.ThreadPoolExecutor(4, thread_name_prefix="p2v-compare") as pool:
        for off, x, y in pool.map(fetch, _ranges(a, b, common)):
            if x != y:
                diff = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
                where = off + int(diff[0])
                return CompareResult(
                    False, where, a.size, b.size, f"Content mismatch at offset {where}!"
                )
            if progress is not None:
                progress(off + len(x), common)
    if a.size != b.size:
        larger = a if a.size > b.size else b
        extra = _first_nonzero_data(larger, common)
        if extra is not None:
            return CompareResult(
                False, extra, a.size, b.size, f"Content mismatch at offset {extra}!"
            )
    return CompareResult(True, None, a.size, b.size, "Images are identical.")


__all__ = ["CompareResult", "Extent", "compare_images"]

"""Linux swap: only the header page is used (union swap_header in the kernel's
include/linux/swap.h); the rest is scratch space nobody needs after a reboot.

A swap area holding a hibernation image is different: resuming needs it, so it is
copied whole.
"""

from __future__ import annotations

from construct import Bytes, Int32ul, Struct

from ..errors import CorruptImage, UnsupportedFeature
from ..image import Image
from . import ranges
from .ranges import Ranges

# the `info` half of union swap_header, after 1024 bytes of boot bits
SwapInfo = Struct(
    "version" / Int32ul,
    "last_page" / Int32ul,
    "nr_badpages" / Int32ul,
    "sws_uuid" / Bytes(16),
    "sws_volume" / Bytes(16),
)
INFO_OFFSET = 1024
PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
HIBERNATION_MAGICS = (b"S1SUSPEND\0", b"S2SUSPEND\0", b"ULSUSPEND\0", b"LINHIB0001")


def _page(head: bytes) -> tuple[int, bytes] | None:
    """(page size, the magic that ends the first page) if the head is a swap header."""
    for ps in PAGE_SIZES:
        if len(head) < ps:
            break
        magic = head[ps - 10 : ps]
        if magic in SWAP_MAGICS or magic in HIBERNATION_MAGICS:
            return ps, magic
    return None


def probe(head: bytes) -> str | None:
    found = _page(head)
    if found is None:
        return None
    return "swap" if found[1] in SWAP_MAGICS else "swsuspend"


def used(image: Image) -> Ranges:
    found = _page(image.read(0, min(image.size, PAGE_SIZES[-1])))
    if found is None:
        raise CorruptImage("swap: no swap signature")
    ps, magic = found
    if magic in HIBERNATION_MAGICS:
        raise UnsupportedFeature("swap: holds a hibernation image, needed to resume")
    info = SwapInfo.parse(image.read(INFO_OFFSET, SwapInfo.sizeof()))
    if magic == b"SWAPSPACE2" and info.version != 1:
        raise CorruptImage(f"swap: header version {info.version} is unknown")
    end = (info.last_page + 1) * ps if magic == b"SWAPSPACE2" else image.size
    return ranges.merge([ranges.span(0, ps), ranges.span(min(end, image.size), image.size)])

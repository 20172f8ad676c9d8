"""VMDK: VMware's virtual disk, every subformat (see docs/formats/vmdk.md).

Read: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized, vmfs,
vmfsSparse (COWD), seSparse and descriptors mixing FLAT/SPARSE/ZERO/VMFS extents, with delta
links.
Write: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized
(sequential) and vmfs.
"""

from __future__ import annotations

from . import layout
from .image import VmdkImage, open_image
from .writer import SUBFORMATS, StreamWriter, create

FORMAT = "vmdk"

__all__ = ["FORMAT", "SUBFORMATS", "StreamWriter", "VmdkImage", "create", "matches", "open_image"]


def matches(head: bytes, tail: bytes) -> bool:
    if head[:4] in (layout.SPARSE_MAGIC, layout.COWD_MAGIC):
        return True
    # a descriptor file: after comments and blank lines, "version=1|2|3" (qemu's rule);
    # VMware's and qemu's start with the comment "# Disk DescriptorFile"
    text = head.removeprefix(b"\xef\xbb\xbf")
    for line in text.split(b"\n")[:64]:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False

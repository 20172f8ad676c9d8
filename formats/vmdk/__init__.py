"""VMDK: VMware's virtual disk, every subformat (see docs/formats/vmdk.md).

Read: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized, vmfs,
vmfsSparse (COWD), seSparse and descriptors mixing FLAT/SPARSE/ZERO/VMFS extents, with delta
links.
Write: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized
(sequential) and vmfs.
"""

from __future__ import annotations

from ..magic import vmdk as matches
from .image import VmdkImage, open_image
from .writer import SUBFORMATS, StreamWriter, create

FORMAT = "vmdk"

__all__ = ["FORMAT", "SUBFORMATS", "StreamWriter", "VmdkImage", "create", "matches", "open_image"]

"""qcow2, QEMU's copy-on-write format (versions 2 and 3), read and written.

layout.py declares the on-disk structures, image.py reads, writer.py allocates and
writes, check.py checks the metadata as `qemu-img check` does; docs/formats/qcow2.md
lists what is supported and what is refused.
"""

from __future__ import annotations

from ..magic import qcow2 as matches
from .image import FORMAT, Qcow2Image, SnapshotView, open_image
from .writer import Qcow2Writer, create

__all__ = [
    "FORMAT",
    "Qcow2Image",
    "Qcow2Writer",
    "SnapshotView",
    "create",
    "matches",
    "open_image",
]

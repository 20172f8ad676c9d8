"""qcow2, QEMU's copy-on-write format (versions 2 and 3), read and written.

layout.py declares the on-disk structures, image.py reads, writer.py allocates and
writes, refcounts.py counts host clusters (and walks the tables to rebuild the counts),
check.py checks the metadata as `qemu-img check` does; this package opens an image as a
reader or a writer (`open_image`). docs/formats/qcow2.md lists what is supported and what
is refused.
"""

from __future__ import annotations

from ..backing import BackingPolicy
from ..magic import qcow2 as matches
from .image import FORMAT, Qcow2Image, SnapshotView, open_file
from .writer import Qcow2Writer, create, open_writer

__all__ = [
    "FORMAT",
    "Qcow2Image",
    "Qcow2Writer",
    "SnapshotView",
    "create",
    "matches",
    "open_image",
]


def open_image(
    path: str,
    *,
    writable: bool = False,
    policy: BackingPolicy | None = None,
) -> Qcow2Image:
    if writable:
        return open_writer(path, policy)
    return open_file(path, Qcow2Image, writable=False, policy=policy)

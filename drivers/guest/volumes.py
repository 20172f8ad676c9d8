"""What the host can tell about a machine's disks before any appliance starts: whether
any volume holds a filesystem or container an operating system can live in (read with
p2v's own partition and filesystem probes, a few KiB per volume).

An appliance costs seconds under KVM and most of a minute under TCG; disks with only
empty partitions, FAT or swap hold no OS libguestfs would find, and say so at once."""

from __future__ import annotations

import formats
from formats import filesystems, partitions
from formats.views import WindowImage

#: what an OS root may be in, or behind (as blkid names it)
OS_VOLUMES = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "reiserfs", "ntfs", "BitLocker",
        "LVM2_member", "crypto_LUKS", "linux_raid_member",
    }
)  # fmt: skip
#: partitions looked at per disk
MAX_PARTITIONS = 128


def volume_kinds(path: str, fmt: str) -> list[str]:
    """The filesystem (or container) names found on the disk or its partitions."""
    kinds: list[str] = []
    with formats.open(path, fmt, allow_backing=True) as img:
        table = partitions.read_table(img)
        if table is None:
            found = filesystems.detect(img)
            return [found] if found else []
        for p in table.partitions[:MAX_PARTITIONS]:
            if p.is_container or p.size <= 0 or p.end > img.size:
                continue
            found = filesystems.detect(WindowImage(img, p.start, p.size))
            if found:
                kinds.append(found)
    return kinds


def may_hold_an_os(images: list[str], fmts: list[str]) -> bool:
    """False only when no disk has a volume an OS could live in; an image p2v cannot
    read is left to libguestfs (True)."""
    for path, fmt in zip(images, fmts):
        try:
            if OS_VOLUMES.intersection(volume_kinds(path, fmt)):
                return True
        except (formats.FormatError, OSError):
            return True
    return False

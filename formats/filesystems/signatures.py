"""Content we recognise but do not map: named (as blkid names it) so `p2v partitions`
can say what a partition holds; copied whole by `--skip-unused`, with a warning.

No `used()` here on purpose: the dispatcher copies these whole.
"""

from __future__ import annotations

#: (offset, magic, name), checked in order; offsets within the probe head
SIGNATURES = (
    (3, b"EXFAT   ", "exfat"),
    (3, b"-FVE-FS-", "BitLocker"),
    (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (0, b"\xfc\x4e\x2b\xa9", "linux_raid_member"),  # md superblock 1.1, little-endian magic
    (4096, b"\xfc\x4e\x2b\xa9", "linux_raid_member"),  # md superblock 1.2
    (0x8001, b"CD001", "iso9660"),
    (0, b"hsqs", "squashfs"),
    (0x10034, b"ReIsEr2Fs", "reiserfs"),
    (0x10034, b"ReIsEr3Fs", "reiserfs"),
)


def probe(head: bytes) -> str | None:
    for offset, magic, name in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None

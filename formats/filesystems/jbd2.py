"""The ext3/ext4 journal (JBD2), read only to learn what a recovery would write.

A mounted or uncleanly unmounted ext4 keeps committed metadata, block bitmaps among it,
in its journal until a checkpoint writes it home: the on-disk bitmaps may then miss
recent allocations. Walking the log the way recovery's scan pass does (descriptor,
data blocks, commit, sequence numbers in order) tells which filesystem blocks the log
holds newer copies of, and those copies. Layout per the kernel's
Documentation/filesystems/ext4/journal.rst; all fields big-endian.

Revoke records are not applied: a revoked copy is still returned, which can only make
a used-block map larger, never smaller.
"""

from __future__ import annotations

from collections.abc import Callable

from construct import Bytes, Int8ub, Int32ub, Struct

from ..errors import CorruptImage, UnsupportedFeature

JBD2_MAGIC_NUMBER = 0xC03B3998
JBD2_DESCRIPTOR_BLOCK = 1
JBD2_COMMIT_BLOCK = 2
JBD2_SUPERBLOCK_V1 = 3
JBD2_SUPERBLOCK_V2 = 4
JBD2_REVOKE_BLOCK = 5

JBD2_FEATURE_INCOMPAT_64BIT = 0x2
JBD2_FEATURE_INCOMPAT_CSUM_V2 = 0x8
JBD2_FEATURE_INCOMPAT_CSUM_V3 = 0x10
JBD2_FEATURE_INCOMPAT_FAST_COMMIT = 0x20

JBD2_FLAG_ESCAPE = 1
JBD2_FLAG_SAME_UUID = 2
JBD2_FLAG_LAST_TAG = 8

JournalHeader = Struct(
    "h_magic" / Int32ub,
    "h_blocktype" / Int32ub,
    "h_sequence" / Int32ub,
)

JournalSuperblock = Struct(
    "s_header" / JournalHeader,
    "s_blocksize" / Int32ub,
    "s_maxlen" / Int32ub,
    "s_first" / Int32ub,
    "s_sequence" / Int32ub,
    "s_start" / Int32ub,
    "s_errno" / Int32ub,
    "s_feature_compat" / Int32ub,
    "s_feature_incompat" / Int32ub,
    "s_feature_ro_compat" / Int32ub,
    "s_uuid" / Bytes(16),
    "s_nr_users" / Int32ub,
    "s_dynsuper" / Int32ub,
    "s_max_transaction" / Int32ub,
    "s_max_trans_data" / Int32ub,
    "s_checksum_type" / Int8ub,
    "s_padding2" / Bytes(3),
    "s_num_fc_blks" / Int32ub,
)


def tag_bytes(incompat: int) -> int:
    """Size of one descriptor tag, as the kernel's journal_tag_bytes() computes it."""
    if incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3:
        return 16  # journal_block_tag3_t
    size = 12  # journal_block_tag_t
    if incompat & JBD2_FEATURE_INCOMPAT_CSUM_V2:
        size += 2
    return size if incompat & JBD2_FEATURE_INCOMPAT_64BIT else size - 4


def _tags(block: bytes, incompat: int) -> list[tuple[int, int]]:
    """(filesystem block, flags) of each tag in a descriptor block."""
    size = tag_bytes(incompat)
    csum3 = bool(incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3)
    wide = bool(incompat & JBD2_FEATURE_INCOMPAT_64BIT)
    end = len(block)
    if incompat & (JBD2_FEATURE_INCOMPAT_CSUM_V2 | JBD2_FEATURE_INCOMPAT_CSUM_V3):
        end -= 4  # jbd2_journal_block_tail
    out = []
    pos = JournalHeader.sizeof()
    while pos + size <= end:
        t = block[pos : pos + size]
        number = int.from_bytes(t[0:4], "big")
        if csum3:
            flags = int.from_bytes(t[4:8], "big")
            high = int.from_bytes(t[8:12], "big")
        else:
            flags = int.from_bytes(t[6:8], "big")
            high = int.from_bytes(t[8:12], "big") if wide else 0
        out.append((number | (high << 32 if wide else 0), flags))
        pos += size
        if not flags & JBD2_FLAG_SAME_UUID:
            pos += 16
        if flags & JBD2_FLAG_LAST_TAG:
            break
    return out


def journaled_blocks(
    read_block: Callable[[int], bytes], nblocks: int, wanted: set[int]
) -> dict[int, list[bytes]]:
    """Newer copies of the `wanted` filesystem blocks that the journal holds and a
    recovery would write home: {block: [copy, ...]} in log order. `read_block(i)` reads
    journal block i (0 is the journal superblock). Empty when the journal is clean."""
    sb = JournalSuperblock.parse(read_block(0))
    h = sb.s_header
    if h.h_magic != JBD2_MAGIC_NUMBER or h.h_blocktype not in (
        JBD2_SUPERBLOCK_V1,
        JBD2_SUPERBLOCK_V2,
    ):
        raise CorruptImage("ext4: the journal has no valid superblock")
    incompat = sb.s_feature_incompat if h.h_blocktype == JBD2_SUPERBLOCK_V2 else 0
    if not sb.s_start:
        return {}
    if incompat & JBD2_FEATURE_INCOMPAT_FAST_COMMIT:
        # fast commits log operations (ranges added to inodes), not blocks
        raise UnsupportedFeature("ext4: the journal may hold fast commits, which we do not read")
    first, maxlen = sb.s_first, sb.s_maxlen
    if not (0 < first <= sb.s_start < maxlen <= nblocks):
        raise CorruptImage(
            f"ext4: journal log bounds (first {first}, start {sb.s_start}, length {maxlen}) "
            f"do not fit a journal of {nblocks} blocks"
        )

    def step(pos: int) -> int:
        pos += 1
        return first if pos >= maxlen else pos

    found: dict[int, list[bytes]] = {}
    pos, expected = sb.s_start, sb.s_sequence
    visited = 0
    span = maxlen - first
    while visited < span:  # the log is a ring: never walk it more than once
        block = read_block(pos)
        hdr = JournalHeader.parse(block)
        if hdr.h_magic != JBD2_MAGIC_NUMBER or hdr.h_sequence != expected:
            break  # the end of the log, as recovery's scan pass decides it
        if hdr.h_blocktype == JBD2_DESCRIPTOR_BLOCK:
            for target, flags in _tags(block, incompat):
                pos = step(pos)
                visited += 1
                if target in wanted:
                    data = bytearray(read_block(pos))
                    if flags & JBD2_FLAG_ESCAPE:
                        data[0:4] = JBD2_MAGIC_NUMBER.to_bytes(4, "big")
                    found.setdefault(target, []).append(bytes(data))
        elif hdr.h_blocktype == JBD2_COMMIT_BLOCK:
            expected = (expected + 1) & 0xFFFFFFFF
        elif hdr.h_blocktype != JBD2_REVOKE_BLOCK:
            break
        pos = step(pos)
        visited += 1
    return found

"""XFS: used blocks are each allocation group minus its free extents, which the
by-block-number free-space B+tree (bnobt) lists.

Structures per "XFS Algorithms & Data Structures" (the superblock, the AGF, short-form
B+tree blocks), version 4 and version 5 (CRC) filesystems. Blocks on the AG free list
are not in the bnobt and are kept, which costs a few blocks and is always safe.

The log is not replayed: a filesystem that was not cleanly unmounted (or is mounted)
may have newer free-space trees in its log than on disk, and copying what the on-disk
trees call used would lose the newest files. So the log must end in an unmount record
(found as the kernel finds the log head: cycle numbers, binary search); otherwise, or
with an external log we cannot see, the filesystem is refused and copied whole.
"""

from __future__ import annotations

import numpy as np
from construct import Bytes, Int8ul, Int16ub, Int32ub, Int64ub, Struct

from ..errors import CorruptImage, UnsupportedFeature
from ..image import Image
from . import ranges
from .ranges import Ranges

# xfs_sb: the fields up to the geometry logs
Superblock = Struct(
    "sb_magicnum" / Bytes(4),
    "sb_blocksize" / Int32ub,
    "sb_dblocks" / Int64ub,
    "sb_rblocks" / Int64ub,
    "sb_rextents" / Int64ub,
    "sb_uuid" / Bytes(16),
    "sb_logstart" / Int64ub,
    "sb_rootino" / Int64ub,
    "sb_rbmino" / Int64ub,
    "sb_rsumino" / Int64ub,
    "sb_rextsize" / Int32ub,
    "sb_agblocks" / Int32ub,
    "sb_agcount" / Int32ub,
    "sb_rbmblocks" / Int32ub,
    "sb_logblocks" / Int32ub,
    "sb_versionnum" / Int16ub,
    "sb_sectsize" / Int16ub,
    "sb_inodesize" / Int16ub,
    "sb_inopblock" / Int16ub,
    "sb_fname" / Bytes(12),
    "sb_blocklog" / Int8ul,
    "sb_sectlog" / Int8ul,
    "sb_inodelog" / Int8ul,
    "sb_inopblog" / Int8ul,
    "sb_agblklog" / Int8ul,
)
assert Superblock.sizeof() == 125

# xfs_agf: the free space header, in each AG's second sector
AGF = Struct(
    "agf_magicnum" / Bytes(4),
    "agf_versionnum" / Int32ub,
    "agf_seqno" / Int32ub,
    "agf_length" / Int32ub,
    "agf_bno_root" / Int32ub,  # agf_roots[XFS_BTNUM_BNO]
    "agf_cnt_root" / Int32ub,
    "agf_rmap_root" / Int32ub,
    "agf_bno_level" / Int32ub,  # agf_levels[XFS_BTNUM_BNO]
    "agf_cnt_level" / Int32ub,
    "agf_rmap_level" / Int32ub,
)

# short-form B+tree block header; v5 adds blkno, lsn, uuid, owner, crc
BtreeShortHeader = Struct(
    "bb_magic" / Bytes(4),
    "bb_level" / Int16ub,
    "bb_numrecs" / Int16ub,
    "bb_leftsib" / Int32ub,
    "bb_rightsib" / Int32ub,
)
HEADER_V4 = 16
HEADER_V5 = 56
BNOBT_MAGIC = {4: b"ABTB", 5: b"AB3B"}
MAX_LEVELS = 10  # a bnobt over 2^31 blocks needs far fewer

REC = np.dtype([("startblock", ">u4"), ("blockcount", ">u4")])


def probe(head: bytes) -> str | None:
    if len(head) >= 512 and head[:4] == b"XFSB":
        return "xfs"
    return None


def used(image: Image) -> Ranges:
    raw = image.read(0, min(512, image.size))
    if len(raw) < 512 or raw[:4] != b"XFSB":
        raise CorruptImage("xfs: no superblock")
    sb = Superblock.parse(raw)
    bs, ss = sb.sb_blocksize, sb.sb_sectsize
    if bs < 512 or bs > 65536 or bs & (bs - 1) or bs != 1 << sb.sb_blocklog:
        raise CorruptImage(f"xfs: block size {bs} is invalid")
    if ss < 512 or ss > bs or ss & (ss - 1):
        raise CorruptImage(f"xfs: sector size {ss} is invalid")
    version = 5 if sb.sb_versionnum & 0xF == 5 else 4
    agblocks, agcount, dblocks = sb.sb_agblocks, sb.sb_agcount, sb.sb_dblocks
    if dblocks * bs > image.size:
        raise CorruptImage(f"xfs: {dblocks} blocks of {bs} bytes do not fit in {image.size} bytes")
    if agblocks < 16 or not agcount or not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise CorruptImage(
            f"xfs: {agcount} allocation groups of {agblocks} blocks do not make {dblocks}"
        )
    if not log_is_clean(image, sb):
        raise UnsupportedFeature(
            "xfs: the log is dirty (mounted, or not cleanly unmounted): its newest "
            "allocations are not in the on-disk free-space trees"
        )
    parts = [ranges.span(dblocks * bs, image.size)]
    for ag in range(agcount):  # one pass per allocation group, not per block
        ag_start = ag * agblocks
        length = min(agblocks, dblocks - ag_start)
        free = _free_extents(image, ag, ag_start * bs, length, bs, ss, version)
        used_blocks = ranges.complement(free, 0, length)
        parts.append((used_blocks + ag_start) * bs)
    return ranges.merge(parts)


def _free_extents(
    image: Image, ag: int, base: int, length: int, bs: int, ss: int, version: int
) -> Ranges:
    """Free extents of one AG as (start, end) AG block numbers, from its bnobt."""
    agf = AGF.parse(image.read(base + ss, AGF.sizeof()))
    if agf.agf_magicnum != b"XAGF" or agf.agf_seqno != ag:
        raise CorruptImage(f"xfs: AG {ag} has no valid AGF")
    if agf.agf_length != length:
        raise CorruptImage(f"xfs: AG {ag} says it has {agf.agf_length} blocks, not {length}")
    levels = agf.agf_bno_level
    if not 1 <= levels <= MAX_LEVELS:
        raise CorruptImage(f"xfs: AG {ag}'s free-space tree has {levels} levels")
    header = HEADER_V5 if version == 5 else HEADER_V4
    magic = BNOBT_MAGIC[version]
    leaf_max = (bs - header) // REC.itemsize
    node_max = (bs - header) // (REC.itemsize + 4)  # keys are records; pointers 32-bit
    level_blocks = np.array([agf.agf_bno_root], dtype=np.int64)
    for level in range(levels - 1, -1, -1):
        if (level_blocks <= 0).any() or (level_blocks >= length).any():
            raise CorruptImage(f"xfs: AG {ag}'s free-space tree points outside the AG")
        found = []
        for blk in level_blocks.tolist():  # one read per tree block
            buf = image.read(base + blk * bs, bs)
            h = BtreeShortHeader.parse(buf)
            limit = node_max if level else leaf_max
            if h.bb_magic != magic or h.bb_level != level or h.bb_numrecs > limit:
                raise CorruptImage(f"xfs: AG {ag} free-space tree block {blk} is invalid")
            if level:
                # a node holds node_max keys, then node_max pointers
                ptrs = np.frombuffer(
                    buf, dtype=">u4", count=h.bb_numrecs, offset=header + node_max * REC.itemsize
                )
                found.append(ptrs.astype(np.int64))
            else:
                recs = np.frombuffer(buf, dtype=REC, count=h.bb_numrecs, offset=header)
                s = recs["startblock"].astype(np.int64)
                found.append(np.stack((s, s + recs["blockcount"]), axis=1))
        if level:
            # a pointer seen twice is a loop or a shared block: read it once
            level_blocks = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
        else:
            free = np.concatenate(found) if found else ranges.empty()
    if len(free) and (free[:, 1].max() > length or (free[:, 1] <= free[:, 0]).any()):
        raise CorruptImage(f"xfs: AG {ag} lists a free extent outside the AG")
    return free


# -- the log --------------------------------------------------------------------------

XLOG_HEADER_MAGIC_NUM = 0xFEEDBABE
XLOG_UNMOUNT_TRANS = 0x20
XLOG_VERSION_2 = 2
XLOG_HEADER_CYCLE_SIZE = 32 * 1024
BBSIZE = 512  # the log's basic block: each one starts with its cycle number
#: 8 in-core logs of up to 256 KiB may be in flight at a crash, written in any order
IN_FLIGHT_BBS = 8 * 256 * 1024 // BBSIZE
#: the longest record (256 KiB of data and its extended headers) in basic blocks
MAX_RECORD_BBS = 256 * 1024 // BBSIZE + 8

# xlog_rec_header: a log record's header
LogRecordHeader = Struct(
    "h_magicno" / Int32ub,
    "h_cycle" / Int32ub,
    "h_version" / Int32ub,
    "h_len" / Int32ub,
    "h_lsn" / Int64ub,
    "h_tail_lsn" / Int64ub,
    "h_crc" / Int32ub,
    "h_prev_block" / Int32ub,
    "h_num_logops" / Int32ub,
    "h_cycle_data" / Bytes(XLOG_HEADER_CYCLE_SIZE // BBSIZE * 4),
    "h_fmt" / Int32ub,
    "h_fs_uuid" / Bytes(16),
    "h_size" / Int32ub,
)
# xlog_op_header: each operation in a record's data
OP_FLAGS_OFFSET = 9


def log_is_clean(image: Image, sb) -> bool:
    """True only when the internal log's newest record is an unmount record that ends
    where the log head is; any doubt answers False."""
    if not sb.sb_logstart or not sb.sb_logblocks:
        return False  # an external log device: not on this disk
    agno = sb.sb_logstart >> sb.sb_agblklog
    agbno = sb.sb_logstart & ((1 << sb.sb_agblklog) - 1)
    start = (agno * sb.sb_agblocks + agbno) * sb.sb_blocksize
    nbb = sb.sb_logblocks * sb.sb_blocksize // BBSIZE
    if start + nbb * BBSIZE > image.size or nbb < 4:
        raise CorruptImage("xfs: the log lies outside the filesystem")

    def cycles(first: int, count: int) -> np.ndarray:
        """The cycle number of `count` basic blocks from `first` (a record header keeps
        its magic in the first word and the cycle in the second)."""
        words = np.frombuffer(
            image.read(start + first * BBSIZE, count * BBSIZE), dtype=">u4"
        ).reshape(count, BBSIZE // 4)
        return np.where(words[:, 0] == XLOG_HEADER_MAGIC_NUM, words[:, 1], words[:, 0])

    def cycle(bb: int) -> int:
        return int(cycles(bb, 1)[0])

    newest, oldest = cycle(0), cycle(nbb - 1)
    if newest == oldest or newest != (oldest + 1) & 0xFFFFFFFF:
        return False  # no single wrap point: leave the hard cases to a real log replay
    lo, hi = 0, nbb - 1  # cycle(lo) == newest, cycle(hi) == oldest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cycle(mid) == newest:
            lo = mid
        else:
            hi = mid
    head = hi
    # records written out of order at a crash leave newer blocks past a gap: any newer
    # cycle in the window after the head means the log is not at rest
    window = min(IN_FLIGHT_BBS, nbb - head)
    if (cycles(head, window) == newest).any():
        return False
    first = max(0, head - MAX_RECORD_BBS)
    back = np.frombuffer(image.read(start + first * BBSIZE, (head - first) * BBSIZE), dtype=">u4")
    back = back.reshape(-1, BBSIZE // 4)
    headers = np.flatnonzero((back[:, 0] == XLOG_HEADER_MAGIC_NUM) & (back[:, 1] == newest))
    if not len(headers):
        return False
    rhead = first + int(headers[-1])
    h = LogRecordHeader.parse(image.read(start + rhead * BBSIZE, LogRecordHeader.sizeof()))
    hblks = 1
    if h.h_version & XLOG_VERSION_2 and h.h_size > XLOG_HEADER_CYCLE_SIZE:
        hblks = -(-h.h_size // XLOG_HEADER_CYCLE_SIZE)
    data_bb = rhead + hblks
    if h.h_num_logops != 1 or data_bb + -(-h.h_len // BBSIZE) != head or data_bb >= nbb:
        return False
    op = image.read(start + data_bb * BBSIZE, 12)
    return bool(op[OP_FLAGS_OFFSET] & XLOG_UNMOUNT_TRANS)

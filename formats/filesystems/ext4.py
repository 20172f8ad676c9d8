"""ext2, ext3 and ext4: used blocks from the block groups' block bitmaps.

Layout per the kernel's Documentation/filesystems/ext4 (super.rst, group_descr.rst,
blockgroup.rst). Handled: 1-64 KiB blocks, 64-bit descriptors, flex_bg (bitmaps packed
together: read in runs), bigalloc (a bit per cluster), sparse_super/sparse_super2,
meta_bg descriptor placement, and BLOCK_UNINIT groups (no bitmap on disk: only their
superblock backup and descriptor copies are used, as the kernel computes).

A filesystem whose journal needs recovery (mounted, or not cleanly unmounted) may keep
newer block bitmaps in its journal than on disk: the log is walked (jbd2.py) and every
copy of a bitmap it holds is ORed into the on-disk one, so blocks a recovery would find
allocated are copied too. An external journal or fast commits make that impossible:
such a filesystem is refused (and copied whole).
"""

from __future__ import annotations

import logging

import numpy as np
from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from ..errors import CorruptImage, UnsupportedFeature
from ..image import Image
from . import jbd2, ranges
from .ranges import Ranges

log = logging.getLogger(__package__)

SUPERBLOCK_OFFSET = 1024
EXT4_SUPER_MAGIC = 0xEF53

# super.rst: struct ext4_super_block (the fields a used-block map needs, then the rest skipped)
Superblock = Struct(
    "s_inodes_count" / Int32ul,
    "s_blocks_count_lo" / Int32ul,
    "s_r_blocks_count_lo" / Int32ul,
    "s_free_blocks_count_lo" / Int32ul,
    "s_free_inodes_count" / Int32ul,
    "s_first_data_block" / Int32ul,
    "s_log_block_size" / Int32ul,
    "s_log_cluster_size" / Int32ul,
    "s_blocks_per_group" / Int32ul,
    "s_clusters_per_group" / Int32ul,
    "s_inodes_per_group" / Int32ul,
    "s_mtime" / Int32ul,
    "s_wtime" / Int32ul,
    "s_mnt_count" / Int16ul,
    "s_max_mnt_count" / Int16ul,
    "s_magic" / Int16ul,
    "s_state" / Int16ul,
    "s_errors" / Int16ul,
    "s_minor_rev_level" / Int16ul,
    "s_lastcheck" / Int32ul,
    "s_checkinterval" / Int32ul,
    "s_creator_os" / Int32ul,
    "s_rev_level" / Int32ul,
    "s_def_resuid" / Int16ul,
    "s_def_resgid" / Int16ul,
    "s_first_ino" / Int32ul,
    "s_inode_size" / Int16ul,
    "s_block_group_nr" / Int16ul,
    "s_feature_compat" / Int32ul,
    "s_feature_incompat" / Int32ul,
    "s_feature_ro_compat" / Int32ul,
    "s_uuid" / Bytes(16),
    "s_volume_name" / Bytes(16),
    "s_last_mounted" / Bytes(64),
    "s_algorithm_usage_bitmap" / Int32ul,
    "s_prealloc_blocks" / Int8ul,
    "s_prealloc_dir_blocks" / Int8ul,
    "s_reserved_gdt_blocks" / Int16ul,
    "s_journal_uuid" / Bytes(16),
    "s_journal_inum" / Int32ul,
    "s_journal_dev" / Int32ul,
    "s_last_orphan" / Int32ul,
    "s_hash_seed" / Bytes(16),
    "s_def_hash_version" / Int8ul,
    "s_jnl_backup_type" / Int8ul,
    "s_desc_size" / Int16ul,
    "s_default_mount_opts" / Int32ul,
    "s_first_meta_bg" / Int32ul,
    "s_mkfs_time" / Int32ul,
    "s_jnl_blocks" / Bytes(68),
    "s_blocks_count_hi" / Int32ul,
    "s_r_blocks_count_hi" / Int32ul,
    "s_free_blocks_count_hi" / Int32ul,
    "s_min_extra_isize" / Int16ul,
    "s_want_extra_isize" / Int16ul,
    "s_flags" / Int32ul,
    "s_raid_stride" / Int16ul,
    "s_mmp_interval" / Int16ul,
    "s_mmp_block" / Int64ul,
    "s_raid_stripe_width" / Int32ul,
    "s_log_groups_per_flex" / Int8ul,
    "s_checksum_type" / Int8ul,
    Padding(0x24C - 0x176),
    "s_backup_bgs" / Int32ul[2],
    Padding(0x400 - 0x254),
)
assert Superblock.sizeof() == 1024

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
# what ext3 knows (blkid calls anything beyond these ext4)
EXT3_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
EXT3_RO_COMPAT = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR

BG_BLOCK_UNINIT = 0x2

# group_descr.rst: struct ext4_group_desc; the _hi halves exist when s_desc_size >= 64
_DESC_FIELDS = [
    ("bg_block_bitmap_lo", "<u4", 0x0),
    ("bg_inode_bitmap_lo", "<u4", 0x4),
    ("bg_inode_table_lo", "<u4", 0x8),
    ("bg_flags", "<u2", 0x12),
]
_DESC_FIELDS_64 = [
    ("bg_block_bitmap_hi", "<u4", 0x20),
    ("bg_inode_bitmap_hi", "<u4", 0x24),
    ("bg_inode_table_hi", "<u4", 0x28),
]

#: 2^20 groups of 128 MiB (128 TiB): far beyond what we expect, far below a hostile count
MAX_DESCRIPTOR_BYTES = 64 << 20
#: bitmap bytes gathered at once: bounds memory on a huge filesystem
BATCH_BYTES = 16 << 20


def desc_dtype(size: int) -> np.dtype:
    fields = _DESC_FIELDS + (_DESC_FIELDS_64 if size >= 64 else [])
    names, formats, offsets = zip(*fields)
    return np.dtype(
        {"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": size}
    )


def probe(head: bytes) -> str | None:
    if len(head) < SUPERBLOCK_OFFSET + 1024:
        return None
    raw = head[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 1024]
    if int.from_bytes(raw[0x38:0x3A], "little") != EXT4_SUPER_MAGIC:
        return None
    sb = Superblock.parse(raw)
    if sb.s_log_block_size > 6 or sb.s_rev_level > 1:
        return None
    if sb.s_feature_incompat & INCOMPAT_JOURNAL_DEV:
        return "jbd"
    if sb.s_feature_incompat & ~EXT3_INCOMPAT or sb.s_feature_ro_compat & ~EXT3_RO_COMPAT:
        return "ext4"
    return "ext3" if sb.s_feature_compat & COMPAT_HAS_JOURNAL else "ext2"


def _has_super(ngroups: int, sb) -> np.ndarray:
    """Which groups hold a superblock backup (and the descriptor table after it)."""
    has = np.zeros(ngroups, dtype=bool)
    if sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
        for g in sb.s_backup_bgs:
            if 0 < g < ngroups:
                has[g] = True
    elif sb.s_feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
        has[1:2] = True
        for base in (3, 5, 7):
            p = base
            while p < ngroups:
                has[p] = True
                p *= base
    else:
        has[:] = True
    has[0] = True
    return has


def read_blocks(image: Image, blocks: np.ndarray, bs: int, keep: int) -> np.ndarray:
    """Read the given blocks (in runs of consecutive numbers: flex_bg packs bitmaps
    together) and return their first `keep` bytes, one row per block, in input order."""
    out = np.empty((len(blocks), keep), dtype=np.uint8)
    if not len(blocks):
        return out
    order = np.argsort(blocks, kind="stable")
    sorted_blocks = blocks[order]
    breaks = np.flatnonzero(np.diff(sorted_blocks) != 1) + 1
    for run in np.split(np.arange(len(blocks)), breaks):
        first = int(sorted_blocks[run[0]])
        buf = image.read(first * bs, len(run) * bs)
        out[order[run]] = np.frombuffer(buf, dtype=np.uint8).reshape(len(run), bs)[:, :keep]
    return out


def used(image: Image) -> Ranges:
    """Byte ranges the filesystem uses (plus anything after its end, which we keep)."""
    raw = image.read(SUPERBLOCK_OFFSET, 1024) if image.size >= 2048 else b""
    if len(raw) < 1024 or int.from_bytes(raw[0x38:0x3A], "little") != EXT4_SUPER_MAGIC:
        raise CorruptImage("ext4: no superblock")
    sb = Superblock.parse(raw)
    incompat, ro = sb.s_feature_incompat, sb.s_feature_ro_compat
    if incompat & INCOMPAT_JOURNAL_DEV:
        raise UnsupportedFeature("ext4: an external journal device, not a filesystem")
    if sb.s_log_block_size > 6:
        raise CorruptImage(f"ext4: block size 2^(10+{sb.s_log_block_size}) is invalid")
    bs = 1024 << sb.s_log_block_size
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks = sb.s_blocks_count_lo | ((sb.s_blocks_count_hi << 32) if is64 else 0)
    first_data = sb.s_first_data_block
    if blocks * bs > image.size:
        raise CorruptImage(f"ext4: {blocks} blocks of {bs} bytes do not fit in {image.size} bytes")
    if first_data > 1 or first_data >= blocks:
        raise CorruptImage(f"ext4: first data block {first_data} is invalid")
    if sb.s_reserved_gdt_blocks > bs // 4:  # the kernel's own bound (ext4_fill_super)
        raise CorruptImage(f"ext4: {sb.s_reserved_gdt_blocks} reserved GDT blocks is invalid")
    ratio = 1
    if ro & RO_COMPAT_BIGALLOC:
        if not sb.s_log_block_size <= sb.s_log_cluster_size <= sb.s_log_block_size + 16:
            raise CorruptImage("ext4: cluster size is invalid")
        ratio = 1 << (sb.s_log_cluster_size - sb.s_log_block_size)
        cpg = sb.s_clusters_per_group
    else:
        cpg = sb.s_blocks_per_group
    bpg = cpg * ratio
    if not (8 <= cpg <= 8 * bs and cpg % 8 == 0) or sb.s_blocks_per_group != bpg:
        raise CorruptImage(f"ext4: {cpg} clusters per group is invalid for {bs}-byte blocks")
    ngroups = -(-(blocks - first_data) // bpg)
    desc_size = sb.s_desc_size if is64 else 32
    if desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1):
        raise CorruptImage(f"ext4: group descriptor size {desc_size} is invalid")
    if ngroups * desc_size > MAX_DESCRIPTOR_BYTES:
        raise CorruptImage(f"ext4: {ngroups} block groups is beyond any sane filesystem")
    desc = _descriptors(image, sb, bs, ngroups, desc_size, bpg, first_data)

    def join(lo: str, hi: str) -> np.ndarray:
        v = desc[lo].astype(np.int64)
        if desc_size >= 64:
            v |= desc[hi].astype(np.int64) << 32
        return v

    block_bitmap = join("bg_block_bitmap_lo", "bg_block_bitmap_hi")
    inode_bitmap = join("bg_inode_bitmap_lo", "bg_inode_bitmap_hi")
    inode_table = join("bg_inode_table_lo", "bg_inode_table_hi")
    itable_blocks = -(-sb.s_inodes_per_group * max(sb.s_inode_size, 128) // bs)
    meta = np.concatenate(
        (block_bitmap, inode_bitmap, inode_table, inode_table + itable_blocks - 1)
    )
    if len(meta) and (meta.min() < first_data or meta.max() >= blocks):
        raise CorruptImage("ext4: a group's bitmap or inode table lies outside the filesystem")
    uninit = np.zeros(ngroups, dtype=bool)
    if ro & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM):
        uninit = (desc["bg_flags"] & BG_BLOCK_UNINIT) != 0
    newer: dict[int, list[bytes]] = {}
    if incompat & INCOMPAT_RECOVER:
        newer = _journaled_bitmaps(image, sb, bs, blocks, inode_table, block_bitmap)

    parts = [
        ranges.span(0, max(2 * SUPERBLOCK_OFFSET, (first_data + 1) * bs)),  # boot block, superblock
        ranges.span(blocks * bs, image.size),  # beyond the filesystem: not ours to judge
        np.stack((block_bitmap, block_bitmap + 1), axis=1) * bs,
        np.stack((inode_bitmap, inode_bitmap + 1), axis=1) * bs,
        np.stack((inode_table, inode_table + itable_blocks), axis=1) * bs,
        _uninit_metadata(sb, uninit, ngroups, bs, bpg, first_data, desc_size),
    ]
    parts += _bitmap_ranges(image, block_bitmap, uninit, cpg, ratio, bs, first_data, blocks, newer)
    # metadata of a last, short group may reach past the end as computed: the image ends it
    return ranges.clip(ranges.merge(parts), 0, image.size)


def _group_first(g, bpg: int, first_data: int):
    return first_data + g * bpg


def _descriptors(
    image: Image, sb, bs: int, ngroups: int, desc_size: int, bpg: int, first_data: int
) -> np.ndarray:
    dpb = bs // desc_size
    nblocks = -(-ngroups // dpb)
    # the descriptors follow the superblock's block: block 1, or block 2 with 1 KiB blocks
    # (also on bigalloc, whose s_first_data_block is 0 even then)
    sb_block = SUPERBLOCK_OFFSET // bs
    if sb.s_feature_incompat & INCOMPAT_META_BG:
        # meta_bg: descriptor block i lives in the first group of its meta group (after
        # that group's superblock backup), once s_first_meta_bg blocks have been placed
        first_meta = min(sb.s_first_meta_bg, nblocks)
        locs = np.arange(nblocks, dtype=np.int64)
        meta_groups = locs[first_meta:] * dpb
        has = _has_super(ngroups, sb)
        locs[:first_meta] += sb_block + 1
        firsts = _group_first(meta_groups, bpg, first_data)
        # group 0 starts at block 0 on 1 KiB bigalloc, but its superblock is block 1
        firsts[meta_groups == 0] = sb_block
        locs[first_meta:] = firsts + has[meta_groups]
    else:
        locs = sb_block + 1 + np.arange(nblocks, dtype=np.int64)
    blocks = sb.s_blocks_count_lo
    if sb.s_feature_incompat & INCOMPAT_64BIT:
        blocks |= sb.s_blocks_count_hi << 32
    if len(locs) and locs.max() >= blocks:
        raise CorruptImage("ext4: the group descriptor table lies outside the filesystem")
    raw = read_blocks(image, locs, bs, bs).reshape(-1)
    return np.frombuffer(raw.tobytes(), dtype=desc_dtype(desc_size), count=ngroups)


def _uninit_metadata(
    sb, uninit: np.ndarray, ngroups: int, bs: int, bpg: int, first_data: int, desc_size: int
) -> Ranges:
    """Superblock backups and descriptor copies in BLOCK_UNINIT groups (whose bitmaps
    are not on disk), as the kernel's ext4_init_block_bitmap marks them."""
    if not uninit.any():
        return ranges.empty()
    dpb = bs // desc_size
    nblocks = -(-ngroups // dpb)
    has = _has_super(ngroups, sb)
    groups = np.flatnonzero(uninit & has).astype(np.int64)
    gdt = min(sb.s_first_meta_bg, nblocks) if sb.s_feature_incompat & INCOMPAT_META_BG else nblocks
    span = 1 + gdt + sb.s_reserved_gdt_blocks
    starts = _group_first(groups, bpg, first_data)
    out = [np.stack((starts, starts + span), axis=1)]
    if sb.s_feature_incompat & INCOMPAT_META_BG:
        # each meta group keeps its descriptor block in its first, second and last group
        g = np.arange(ngroups, dtype=np.int64)
        pos = g % dpb
        in_meta = (g // dpb >= sb.s_first_meta_bg) & ((pos <= 1) | (pos == dpb - 1)) & uninit
        sel = g[in_meta]
        first = _group_first(sel, bpg, first_data) + has[sel]
        out.append(np.stack((first, first + 1), axis=1))
    return np.concatenate(out) * bs


def _bitmap_ranges(
    image: Image,
    block_bitmap: np.ndarray,
    uninit: np.ndarray,
    cpg: int,
    ratio: int,
    bs: int,
    first_data: int,
    blocks: int,
    newer: dict[int, list[bytes]],
) -> list[Ranges]:
    """Ranges from the on-disk bitmaps, each ORed with any newer copy the journal holds
    (a union is what recovery could leave allocated, whichever copy it writes last)."""
    ngroups = len(block_bitmap)
    row = cpg // 8
    per_batch = max(1, BATCH_BYTES // row)
    unit = ratio * bs
    total_clusters = -(-(blocks - first_data) // ratio)
    out = []
    for g0 in range(0, ngroups, per_batch):
        g1 = min(ngroups, g0 + per_batch)
        rows = np.zeros((g1 - g0, row), dtype=np.uint8)
        init = ~uninit[g0:g1]
        rows[init] = read_blocks(image, block_bitmap[g0:g1][init], bs, row)
        if newer:
            for i, blk in enumerate(block_bitmap[g0:g1].tolist()):  # per group, not per block
                for copy in newer.get(blk, ()):
                    rows[i] |= np.frombuffer(copy, dtype=np.uint8, count=row)
        count = min((g1 - g0) * cpg, total_clusters - g0 * cpg)
        base = (first_data + g0 * cpg * ratio) * bs
        out.append(ranges.bitmap_ranges(rows.reshape(-1), count, unit, base))
    return out


# -- the journal ------------------------------------------------------------------------

EXT4_EXTENTS_FL = 0x80000
EXT4_EXT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5
#: a journal is at most a few GiB; more blocks than this is hostile
MAX_JOURNAL_BLOCKS = 1 << 24

# inode.rst: the fields needed to find a file's blocks
Inode = Struct(
    "i_mode" / Int16ul,
    "i_uid" / Int16ul,
    "i_size_lo" / Int32ul,
    Padding(0x20 - 0x8),
    "i_flags" / Int32ul,
    Padding(0x28 - 0x24),
    "i_block" / Bytes(60),
    Padding(0x6C - 0x64),
    "i_size_high" / Int32ul,
)
EXTENT_HEADER = np.dtype(
    [
        ("eh_magic", "<u2"),
        ("eh_entries", "<u2"),
        ("eh_max", "<u2"),
        ("eh_depth", "<u2"),
        ("eh_generation", "<u4"),
    ]
)
EXTENT = np.dtype(
    [("ee_block", "<u4"), ("ee_len", "<u2"), ("ee_start_hi", "<u2"), ("ee_start_lo", "<u4")]
)
EXTENT_IDX = np.dtype(
    [("ei_block", "<u4"), ("ei_leaf_lo", "<u4"), ("ei_leaf_hi", "<u2"), ("ei_unused", "<u2")]
)


def _journaled_bitmaps(
    image: Image, sb, bs: int, blocks: int, inode_table: np.ndarray, block_bitmap: np.ndarray
) -> dict[int, list[bytes]]:
    if not sb.s_feature_compat & COMPAT_HAS_JOURNAL or not sb.s_journal_inum:
        raise UnsupportedFeature("ext4: needs recovery from an external journal we cannot read")
    inum = sb.s_journal_inum
    ipg = sb.s_inodes_per_group
    group, index = divmod(inum - 1, ipg) if ipg else (len(inode_table), 0)
    if group >= len(inode_table):
        raise CorruptImage(f"ext4: journal inode {inum} does not exist")
    isize = max(sb.s_inode_size, 128)
    ino = Inode.parse(image.read(int(inode_table[group]) * bs + index * isize, 0x70))
    size = ino.i_size_lo | (ino.i_size_high << 32)
    nblocks = size // bs
    if not 0 < nblocks <= min(MAX_JOURNAL_BLOCKS, blocks):
        raise CorruptImage(f"ext4: journal of {size} bytes is implausible")
    if ino.i_flags & EXT4_EXTENTS_FL:
        where = _extent_map(image, ino.i_block, bs, blocks, nblocks)
    else:
        where = _indirect_map(image, ino.i_block, bs, blocks, nblocks)

    def read_journal_block(i: int) -> bytes:
        phys = int(where[i]) if 0 <= i < nblocks else -1
        if phys <= 0:
            raise CorruptImage(f"ext4: journal block {i} is not mapped")
        return image.read(phys * bs, bs)

    newer = jbd2.journaled_blocks(read_journal_block, nblocks, set(block_bitmap.tolist()))
    log.info(
        "ext4: the journal needs recovery; %d block bitmap(s) taken from it",
        sum(len(v) for v in newer.values()),
    )
    return newer


def _extent_map(image: Image, root: bytes, bs: int, blocks: int, n: int) -> np.ndarray:
    """Physical block of each of a file's first `n` logical blocks (-1: a hole)."""
    out = np.full(n, -1, dtype=np.int64)
    todo: list[tuple[bytes, int | None]] = [(bytes(root), None)]
    nodes = 0
    while todo:
        node, want_depth = todo.pop()
        nodes += 1
        if nodes > 1 + n:  # more tree nodes than blocks: a loop
            raise CorruptImage("ext4: the journal's extent tree loops")
        h = np.frombuffer(node, dtype=EXTENT_HEADER, count=1)[0]
        count, depth = int(h["eh_entries"]), int(h["eh_depth"])
        if (
            int(h["eh_magic"]) != EXT4_EXT_MAGIC
            or depth > MAX_EXTENT_DEPTH
            or (want_depth is not None and depth != want_depth)
            or 12 * (count + 1) > len(node)
        ):
            raise CorruptImage("ext4: the journal's extent tree is invalid")
        if depth == 0:
            ext = np.frombuffer(node, dtype=EXTENT, count=count, offset=12)
            length = ext["ee_len"].astype(np.int64)
            length = np.where(length > 32768, length - 32768, length)  # unwritten extents
            start = ext["ee_start_lo"].astype(np.int64) | (
                ext["ee_start_hi"].astype(np.int64) << 32
            )
            first = ext["ee_block"].astype(np.int64)
            if ((start + length > blocks) | (start == 0)).any():
                raise CorruptImage("ext4: a journal extent lies outside the filesystem")
            for lb, pb, ln in zip(first.tolist(), start.tolist(), length.tolist()):  # per extent
                ln = min(ln, n - lb)
                if ln > 0:
                    out[lb : lb + ln] = np.arange(pb, pb + ln)
        else:
            idx = np.frombuffer(node, dtype=EXTENT_IDX, count=count, offset=12)
            leaves = idx["ei_leaf_lo"].astype(np.int64) | (idx["ei_leaf_hi"].astype(np.int64) << 32)
            if ((leaves <= 0) | (leaves >= blocks)).any():
                raise CorruptImage("ext4: a journal extent index points outside the filesystem")
            for leaf in leaves.tolist():
                todo.append((image.read(leaf * bs, bs), depth - 1))
    return out


def _indirect_map(image: Image, root: bytes, bs: int, blocks: int, n: int) -> np.ndarray:
    """ext2/3 block maps: 12 direct pointers, then single, double, triple indirect.
    Holes (zero pointers) keep their place; only the blocks that reach the first `n`
    logical blocks are read, one batched read per level."""
    per = bs // 4
    ptrs = np.frombuffer(root, dtype="<u4", count=15).astype(np.int64)

    def expand(pointers: np.ndarray, keep: int) -> np.ndarray:
        """The pointers held by the first `keep` indirect blocks in `pointers`."""
        pointers = pointers[:keep]
        if (pointers >= blocks).any():
            raise CorruptImage("ext4: a journal indirect block lies outside the filesystem")
        out = np.zeros((len(pointers), per), dtype=np.int64)
        present = pointers > 0
        if present.any():
            raw = read_blocks(image, pointers[present], bs, bs)
            out[present] = raw.view("<u4").reshape(-1, per)
        return out.reshape(-1)

    parts = [ptrs[:12]]
    left = n - 12
    for depth in range(1, 4):
        if left <= 0:
            break
        level = ptrs[11 + depth : 12 + depth]
        need = min(left, per**depth)
        for d in range(depth, 0, -1):  # height-d blocks needed to reach `need` data blocks
            level = expand(level, -(-need // per**d))
        level = level[:need]
        parts.append(level)
        left -= len(level)
    flat = np.concatenate(parts)[:n]
    if len(flat) < n:
        flat = np.concatenate((flat, np.zeros(n - len(flat), dtype=np.int64)))
    if (flat >= blocks).any():
        raise CorruptImage("ext4: a journal block lies outside the filesystem")
    return np.where(flat > 0, flat, -1)

"""The journal walk: which filesystem blocks a recovery would write, with their copies.

Journals are built here block by block with the same declarations the reader uses; the
end-to-end case (a real crashed ext4) is in test_ext4.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import formats
from formats.filesystems import jbd2

BS = 1024
MAGIC = jbd2.JBD2_MAGIC_NUMBER


def header(btype: int, seq: int) -> bytes:
    return jbd2.JournalHeader.build({"h_magic": MAGIC, "h_blocktype": btype, "h_sequence": seq})


def superblock(start: int, seq: int, incompat: int, maxlen: int = 64) -> bytes:
    return jbd2.JournalSuperblock.build(
        {
            "s_header": {"h_magic": MAGIC, "h_blocktype": jbd2.JBD2_SUPERBLOCK_V2, "h_sequence": 0},
            "s_blocksize": BS,
            "s_maxlen": maxlen,
            "s_first": 1,
            "s_sequence": seq,
            "s_start": start,
            "s_errno": 0,
            "s_feature_compat": 0,
            "s_feature_incompat": incompat,
            "s_feature_ro_compat": 0,
            "s_uuid": bytes(16),
            "s_nr_users": 1,
            "s_dynsuper": 0,
            "s_max_transaction": 0,
            "s_max_trans_data": 0,
            "s_checksum_type": 0,
            "s_padding2": bytes(3),
            "s_num_fc_blks": 0,
        }
    ).ljust(BS, b"\0")


def tag(target: int, flags: int, incompat: int) -> bytes:
    size = jbd2.tag_bytes(incompat)
    hi = target >> 32
    if incompat & jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3:
        raw = b"".join(x.to_bytes(4, "big") for x in (target & 0xFFFFFFFF, flags, hi, 0))
    else:
        raw = (target & 0xFFFFFFFF).to_bytes(4, "big") + bytes(2) + flags.to_bytes(2, "big")
        raw += hi.to_bytes(4, "big")
    raw = raw[:size].ljust(size, b"\0")
    return raw if flags & jbd2.JBD2_FLAG_SAME_UUID else raw + bytes(16)


def journal(
    transactions: list[list[tuple[int, bytes]]], incompat: int, start: int = 5, maxlen: int = 64
):
    """A log from block `start`: per transaction a descriptor, its data, a commit."""
    blocks = {0: superblock(start, 7, incompat, maxlen)}
    pos, seq = start, 7
    for tx in transactions:
        tags = b""
        for i, (target, data) in enumerate(tx):
            flags = (jbd2.JBD2_FLAG_SAME_UUID if i else 0) | (
                jbd2.JBD2_FLAG_LAST_TAG if i == len(tx) - 1 else 0
            )
            if data[:4] == MAGIC.to_bytes(4, "big"):
                flags |= jbd2.JBD2_FLAG_ESCAPE
                data = bytes(4) + data[4:]
            tags += tag(target, flags, incompat)
        blocks[pos] = (header(jbd2.JBD2_DESCRIPTOR_BLOCK, seq) + tags).ljust(BS, b"\0")
        for _, data in tx:
            pos += 1
            blocks[pos] = data if data[:4] != MAGIC.to_bytes(4, "big") else bytes(4) + data[4:]
        pos += 1
        blocks[pos] = header(jbd2.JBD2_COMMIT_BLOCK, seq).ljust(BS, b"\0")
        pos += 1
        seq += 1
    return lambda i: blocks.get(i, bytes(BS))


FEATURES = {
    "plain": 0,
    "64bit": jbd2.JBD2_FEATURE_INCOMPAT_64BIT,
    "csum_v2": jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT,
    "csum_v3": jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT,
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_copies_of_wanted_blocks_come_back_in_log_order(feature):
    incompat = FEATURES[feature]
    a1, a2, b = b"\x01" * BS, b"\x02" * BS, MAGIC.to_bytes(4, "big") + b"\x03" * (BS - 4)
    read = journal([[(100, a1), (200, b), (300, b"x" * BS)], [(100, a2)]], incompat)
    found = jbd2.journaled_blocks(read, 64, {100, 200})
    assert found == {100: [a1, a2], 200: [b]}  # the escaped magic is restored


def test_the_walk_stops_at_the_first_block_of_a_later_sequence():
    read = journal([[(100, b"\x01" * BS)]], 0)
    stale = journal([[(100, b"\x01" * BS)], [(100, b"\x09" * BS)]], 0)

    def mixed(i: int) -> bytes:  # the second transaction's descriptor carries an old number
        if i == 8:
            return (header(jbd2.JBD2_DESCRIPTOR_BLOCK, 3) + stale(i)[12:]).ljust(BS, b"\0")
        return stale(i) if i > 7 else read(i)

    assert jbd2.journaled_blocks(mixed, 64, {100}) == {100: [b"\x01" * BS]}


def test_a_clean_journal_holds_nothing_and_fast_commits_are_refused():
    assert jbd2.journaled_blocks(journal([], 0, start=0), 64, {1}) == {}
    fast = journal([[(100, b"\x01" * BS)]], jbd2.JBD2_FEATURE_INCOMPAT_FAST_COMMIT)
    with pytest.raises(formats.UnsupportedFeature):
        jbd2.journaled_blocks(fast, 64, {100})


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(FEATURES.values())),
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, BS - 1), st.integers(0, 255)), max_size=8
    ),
)
def test_damaged_journals_raise_only_format_errors(incompat, edits):
    txs = [[(100, b"\x01" * BS), (7, b"\x02" * BS)], [(100, b"\x03" * BS)]]
    base = journal(txs, incompat, start=2, maxlen=13)
    blocks = {i: bytearray(base(i)) for i in range(13)}
    assert not edits or jbd2.journaled_blocks(base, 13, {100, 7})  # the seed itself is sound
    for blk, off, value in edits:
        blocks[blk][off] = value
    try:
        found = jbd2.journaled_blocks(lambda i: bytes(blocks.get(i, bytes(BS))), 13, {100, 7})
    except formats.FormatError:
        return
    assert all(len(c) == BS for copies in found.values() for c in copies)

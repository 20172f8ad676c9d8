"""The VHDX metadata log ([MS-VHDX] 2.3): finding the active sequence and replaying it.

A writer puts metadata updates in the log, flushes, then writes them in place; a crash in
between leaves the in-place copies stale and the header's LogGuid set. Reading such a file
without replaying would read stale BAT or metadata, so: a writable open replays the log into
the file and clears LogGuid; a read-only open replays it into an in-memory overlay that
every read of the file goes through. A log that claims changes we cannot apply safely is
refused, never ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptImage
from .layout import (
    DATA_SIGNATURE,
    DESC_SIGNATURE,
    LOG_DESCRIPTOR_SIZE,
    LOG_HEADER_SIZE,
    LOG_SECTOR,
    LOG_SIGNATURE,
    ZERO_SIGNATURE,
    LogDataSector,
    LogDescriptor,
    LogEntryHeader,
    MiB,
    checksum,
)

#: how much CRC work a hostile log may cost, in multiples of the log's length
CHECKSUM_BUDGET = 8


@dataclass(frozen=True)
class LogWrite:
    """One replayed update: `data` at `offset`, or `length` zeros when data is None."""

    offset: int
    length: int
    data: bytes | None


@dataclass(frozen=True)
class Replay:
    writes: list[LogWrite]
    flushed_file_offset: int
    last_file_offset: int
    entries: int


def _circular(log: bytes, pos: int, n: int) -> bytes:
    if pos + n <= len(log):
        return log[pos : pos + n]
    return log[pos:] + log[: n - (len(log) - pos)]


def _entry(log: bytes, pos: int, log_guid: bytes, budget: list[int]):
    """The parsed entry at `pos` with its writes, or None when it is not a valid entry."""
    if log[pos : pos + 4] != LOG_SIGNATURE:
        return None
    hdr = LogEntryHeader.parse(log[pos : pos + LOG_HEADER_SIZE])
    n = hdr.entry_length
    if hdr.log_guid != log_guid or n == 0 or n % LOG_SECTOR or n > len(log):
        return None
    if hdr.tail % LOG_SECTOR or hdr.tail >= len(log) or hdr.sequence_number == 0:
        return None
    desc_sectors = -(-(LOG_HEADER_SIZE + LOG_DESCRIPTOR_SIZE * hdr.descriptor_count) // LOG_SECTOR)
    if desc_sectors * LOG_SECTOR > n:
        return None
    budget[0] -= n
    if budget[0] < 0:
        raise CorruptImage("vhdx: the log has too many overlapping entries to search")
    raw = _circular(log, pos, n)
    if checksum(raw) != hdr.checksum:
        return None
    writes = []
    data_at = desc_sectors * LOG_SECTOR
    for i in range(hdr.descriptor_count):
        at = LOG_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE
        d = LogDescriptor.parse(raw[at : at + LOG_DESCRIPTOR_SIZE])
        if d.sequence_number != hdr.sequence_number:
            return None
        if d.signature == ZERO_SIGNATURE:
            length = int.from_bytes(d.leading_bytes, "little")
            writes.append(LogWrite(d.file_offset, length, None))
        elif d.signature == DESC_SIGNATURE:
            if data_at + LOG_SECTOR > n:
                return None
            sec = LogDataSector.parse(raw[data_at : data_at + LOG_SECTOR])
            seq = (sec.sequence_high << 32) | sec.sequence_low
            if sec.signature != DATA_SIGNATURE or seq != hdr.sequence_number:
                return None
            data = bytes(d.leading_bytes) + bytes(sec.data) + bytes(d.trailing_bytes)
            writes.append(LogWrite(d.file_offset, LOG_SECTOR, data))
            data_at += LOG_SECTOR
        else:
            return None
    return hdr, writes


def find_replay(log: bytes, log_guid: bytes) -> Replay | None:
    """The active sequence's writes, in order; None when no valid sequence exists (2.3.3)."""
    budget = [CHECKSUM_BUDGET * max(len(log), LOG_SECTOR)]
    found: dict[int, tuple] = {}
    for pos in range(0, len(log) - LOG_SECTOR + 1, LOG_SECTOR):
        if log[pos : pos + 4] != LOG_SIGNATURE:
            continue
        entry = _entry(log, pos, log_guid, budget)
        if entry is not None:
            found[pos] = entry
    # the head is the valid entry with the highest sequence number whose chain from its
    # tail is unbroken; a torn last entry simply is not valid and the previous one leads
    for head_pos in sorted(found, key=lambda p: found[p][0].sequence_number, reverse=True):
        head = found[head_pos][0]
        chain = _chain(found, head_pos, len(log))
        if chain is not None:
            writes = [w for p in chain for w in found[p][1]]
            return Replay(writes, head.flushed_file_offset, head.last_file_offset, len(chain))
    return None


def _chain(found: dict[int, tuple], head_pos: int, log_len: int) -> list[int] | None:
    head = found[head_pos][0]
    pos = head.tail
    chain: list[int] = []
    expect = None
    for _ in range(log_len // LOG_SECTOR + 1):
        entry = found.get(pos)
        if entry is None:
            return None
        hdr = entry[0]
        if expect is not None and hdr.sequence_number != expect:
            return None
        chain.append(pos)
        if pos == head_pos:
            return chain if hdr.sequence_number == head.sequence_number else None
        expect = hdr.sequence_number + 1
        pos = (pos + hdr.entry_length) % log_len
    return None


def validate(replay: Replay, *, file_size: int, log_offset: int, log_length: int) -> None:
    """Refuse a replay that would write where no log may write, or that says the file
    lost data it had already flushed."""
    if replay.flushed_file_offset > file_size:
        raise CorruptImage(
            f"vhdx: the log says the file held {replay.flushed_file_offset:#x} bytes when it "
            f"was flushed, but it has {file_size:#x}: the image was truncated, refusing to "
            "read stale metadata"
        )
    limit = max(replay.last_file_offset, file_size)
    for w in replay.writes:
        end = w.offset + w.length
        if w.offset % LOG_SECTOR or w.length % LOG_SECTOR:
            raise CorruptImage(
                f"vhdx: log update at {w.offset:#x} (+{w.length:#x}) is not 4 KiB aligned"
            )
        if w.offset < MiB or end > limit:
            raise CorruptImage(
                f"vhdx: log update at {w.offset:#x} (+{w.length:#x}) is outside "
                f"[1 MiB, {limit:#x}): cannot replay the log"
            )
        if w.offset < log_offset + log_length and end > log_offset:
            raise CorruptImage(f"vhdx: log update at {w.offset:#x} would overwrite the log itself")


class Overlay:
    """Replayed writes laid over reads of the file, for read-only opens."""

    def __init__(self, writes: list[LogWrite]) -> None:
        self.writes = writes
        self.starts = np.array([w.offset for w in writes], dtype=np.int64)
        self.ends = np.array([w.offset + w.length for w in writes], dtype=np.int64)
        self.lowest = int(self.starts.min()) if writes else 0
        self.highest = int(self.ends.max()) if writes else 0

    def __bool__(self) -> bool:
        return bool(self.writes)

    def touching(self, offset: int, n: int) -> Iterator[LogWrite]:
        if offset >= self.highest or offset + n <= self.lowest:
            return
        hit = np.flatnonzero((self.starts < offset + n) & (self.ends > offset))
        for i in hit.tolist():  # in log order: later updates win
            yield self.writes[i]

    def apply(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        for w in self.touching(offset, n):
            s, e = max(w.offset, offset), min(w.offset + w.length, offset + n)
            if w.data is None:
                buf[s - offset : e - offset] = bytes(e - s)
            else:
                buf[s - offset : e - offset] = w.data[s - w.offset : e - w.offset]

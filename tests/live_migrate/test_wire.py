"""The wire declarations: what we build we parse back, and bad fields are refused."""

from __future__ import annotations

import numpy as np
import pytest

from live_migrate import wire
from live_migrate.errors import ProtocolError
from live_migrate.wire import Encoding, Feature, FrameType, PageKind


@pytest.mark.parametrize(
    ("struct", "value"),
    [
        (wire.Welcome, dict(version=1, accepted=False, features=5, reason="no room")),
        (wire.Join, dict(session=bytes(range(16)), channel=3)),
        (wire.RoundEnd, dict(round=7, pages=123456789)),
        (wire.End, dict(rounds=3, pages_sent=99, memory_digest=b"d" * 32, device_state_length=5)),
        (wire.Ack, dict(memory_digest=b"x" * 32)),
        (wire.Resumed, dict(resumed_at=1234.5)),
        (wire.Abort, dict(reason="stream corrupted: é")),
        (wire.DeviceState, dict(crc=42, state=b"registers")),
    ],
)
def test_declarations_round_trip(struct, value) -> None:
    raw = struct.build(value)
    parsed = wire.parse_body(struct, raw, "test")
    assert {k: parsed[k] for k in value} == value
    assert struct.build(parsed) == raw


def test_hello_round_trips_and_is_checked() -> None:
    raw = wire.build_hello(4096, 1000, Feature.ZERO_PAGES | Feature.DELTA, 2)
    hello = wire.parse_hello(raw, 1 << 30)
    assert (hello.page_size, hello.page_count, hello.channels) == (4096, 1000, 2)
    assert hello.features == Feature.ZERO_PAGES | Feature.DELTA
    with pytest.raises(ProtocolError, match="at most"):
        wire.parse_hello(raw, 1000 * 4096 - 1)
    bad = wire.build_hello(3000, 10, Feature(0), 1)
    with pytest.raises(ProtocolError, match="power of two"):
        wire.parse_hello(bad, 1 << 30)
    unknown = bytearray(raw)
    unknown[29] |= 0x80  # a feature bit nobody defined
    with pytest.raises(ProtocolError, match="unknown feature"):
        wire.parse_hello(bytes(unknown), 1 << 30)
    with pytest.raises(ProtocolError, match="HELLO"):
        wire.parse_hello(raw[:-1], 1 << 30)


def test_frame_header_checks() -> None:
    header = wire.build_frame_header(FrameType.BATCH, 100, 5)
    frame = wire.parse_frame_header(header, 5)
    assert (frame.type, frame.length, frame.sequence) == (FrameType.BATCH, 100, 5)
    with pytest.raises(ProtocolError, match="sequence"):
        wire.parse_frame_header(header, 6)
    damaged = bytearray(header)
    damaged[7] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        wire.parse_frame_header(damaged, 5)
    with pytest.raises(ProtocolError, match="at most 0"):
        wire.parse_frame_header(wire.build_frame_header(FrameType.GO, 1, 0), 0)
    unknown = bytearray(wire.build_frame_header(FrameType.GO, 0, 0))
    unknown[2] = 99
    unknown[12:16] = wire.google_crc32c.value(bytes(unknown[:12])).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="unknown type 99"):
        wire.parse_frame_header(unknown, 0)


def batch_body(pages, kinds, full=0, delta=0, words=0, data=b"", encoding=Encoding.RAW):
    parts = wire.build_batch_prefix(
        0,
        np.array(pages, dtype=np.uint64),
        np.array(kinds, dtype=np.uint8),
        full,
        delta,
        words,
        encoding,
        len(data),
    )
    return memoryview(b"".join(bytes(p) for p in parts) + data)


def test_batch_round_trips() -> None:
    data = b"\x01" * 4096 * 2
    body = batch_body([3, 4, 9], [PageKind.FULL, PageKind.ZERO, PageKind.FULL], full=2, data=data)
    batch = wire.parse_batch(body, 4096, 10)
    assert batch.pages.tolist() == [3, 4, 9]
    assert batch.kinds.tolist() == [1, 0, 1]
    assert bytes(batch.stored) == data and batch.raw_length == len(data)


@pytest.mark.parametrize(
    ("pages", "kinds", "full", "match"),
    [
        ([3, 3], [0, 0], 0, "strictly increasing"),
        ([2, 1], [0, 0], 0, "strictly increasing"),
        ([10], [0], 0, "beyond the guest"),
        ([1], [7], 0, "unknown page kind"),
        ([1, 2], [1, 0], 0, "disagree"),
    ],
)
def test_bad_batches_are_refused(pages, kinds, full, match) -> None:
    body = batch_body(pages, kinds, full=full, data=b"\0" * 4096 * full)
    with pytest.raises(ProtocolError, match=match):
        wire.parse_batch(body, 4096, 10)


def test_batch_sizes_are_checked() -> None:
    body = batch_body([1], [PageKind.FULL], full=1, data=b"\0" * 4096)
    with pytest.raises(ProtocolError, match="body of"):
        wire.parse_batch(body[:-1], 4096, 10)
    huge = bytearray(body)
    huge[4:8] = (wire.MAX_BATCH_PAGES + 1).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match=r"pages, 1\.\."):
        wire.parse_batch(memoryview(huge), 4096, 10)
    many = bytearray(body)
    many[8:12] = (wire.MAX_BATCH_PAGES).to_bytes(4, "big")  # full pages > count
    with pytest.raises(ProtocolError, match="full"):
        wire.parse_batch(memoryview(many), 4096, 10)
    reserved = bytearray(body)
    reserved[22] = 1
    with pytest.raises(ProtocolError, match="reserved"):
        wire.parse_batch(memoryview(reserved), 4096, 10)

"""The migration stream: frames declared with construct, and their validation.

Every message is a 16-byte frame header followed by a body of `length` bytes:

    frame   := magic "PM" | type u8 | flags u8 (0) | length u32 | sequence u32 | crc32c u32
    body    := one of the bodies below, by type

All integers in headers are big-endian (network order); page numbers inside a batch are a
little-endian u64 array so that numpy reads them without a copy. `sequence` counts frames
per channel from 0: a lost, repeated or injected frame breaks the count. The header crc
(CRC-32C over the 12 bytes before it) catches a damaged header before its length is
trusted.

Conversation (channel 0; channels 1..N-1 only JOIN, then carry BATCH and ROUND_END):

    source -> HELLO           version, page size, page count, features, channel count
    dest   -> WELCOME         accepted (features the receiver takes) or refused + reason
    source -> BATCH*          pages of round r, on any channel
    source -> ROUND_END       on every channel: the receiver applies round r+1 only after
                              every channel finished round r (a page resent in round r+1
                              must land after its round-r copy)
    source -> DEVICE_STATE    the paused guest's device state
    source -> END             rounds, pages sent, digest of every page's fingerprint
    dest   -> ACK | ABORT     ACK: the destination holds all memory and device state
    source -> GO              the source committed: resume there
    dest   -> RESUMED         the guest runs on the destination
    either -> ABORT           reason; the source resumes, the destination discards

A BATCH body: a 32-byte batch header, `count` page numbers (strictly increasing),
`count` kinds (ZERO, FULL, DELTA) padded with zeros to a multiple of 8 bytes (so that the
data section starts 8-byte aligned for numpy), then the data section as stored (raw, zstd or lz4): the FULL pages'
bytes in page order, then for DELTA pages their word masks (one bit per 8-byte word, page
order) and the new values of the words the masks select. A DELTA page is applied over the
destination's current copy of that page, which is the copy last sent (XBZRLE's idea, at
word granularity so that numpy encodes and decodes it).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

import construct as c
import google_crc32c
import numpy as np

from live_migrate.errors import ProtocolError

PROTOCOL_VERSION = 1
HELLO_MAGIC = b"P2V-MIGRATE\x00"
FRAME_MAGIC = b"PM"
FRAME_HEADER_SIZE = 16

#: page sizes a receiver accepts: powers of two, 512 B (old VAX-era guests) to 1 MiB
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
#: hard cap on guest memory whatever the receiver's own limit (16 TiB)
MAX_MEMORY = 16 << 40
#: pages in one batch, and bytes a batch may decode to: bounds every allocation
MAX_BATCH_PAGES = 1 << 16
MAX_BATCH_DATA = 64 << 20
#: the largest frame any message may announce (a batch at its caps, plus tables)
MAX_FRAME = MAX_BATCH_DATA + MAX_BATCH_PAGES * 9 + 4096
MAX_DEVICE_STATE = 256 << 20
MAX_CHANNELS = 16


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    JOIN = 3
    BATCH = 4
    ROUND_END = 5
    DEVICE_STATE = 6
    END = 7
    ACK = 8
    GO = 9
    RESUMED = 10
    ABORT = 11


class PageKind(enum.IntEnum):
    ZERO = 0
    FULL = 1
    DELTA = 2


class Encoding(enum.IntEnum):
    RAW = 0
    ZSTD = 1
    LZ4 = 2


class Feature(enum.IntFlag):
    """What the source may use; the receiver answers with the subset it accepts."""

    ZERO_PAGES = 1
    ZSTD = 2
    LZ4 = 4
    DELTA = 8
    #: the device state will be QEMU's migration stream. Not an option but a
    #: declaration: a receiver whose target cannot load it refuses the HELLO, and one
    #: whose target is a QEMU refuses a source without it
    QEMU_STATE = 16


# -- declarations ---------------------------------------------------------------------

FrameHeader = c.Struct(
    "magic" / c.Const(FRAME_MAGIC),
    "type" / c.Int8ub,
    "flags" / c.Int8ub,
    "length" / c.Int32ub,
    "sequence" / c.Int32ub,
    "crc" / c.Int32ub,  # CRC-32C of the 12 bytes before it
)

Hello = c.Struct(
    "magic" / c.Const(HELLO_MAGIC),
    "version" / c.Int16ub,
    "page_size" / c.Int32ub,
    "page_count" / c.Int64ub,
    "features" / c.Int32ub,
    "channels" / c.Int8ub,
    "session" / c.Bytes(16),
)

Welcome = c.Struct(
    "version" / c.Int16ub,
    "accepted" / c.Flag,
    "features" / c.Int32ub,
    "reason" / c.PascalString(c.Int16ub, "utf8"),
)

Join = c.Struct(
    "session" / c.Bytes(16),
    "channel" / c.Int8ub,
)

BatchHeader = c.Struct(
    "round" / c.Int32ub,
    "count" / c.Int32ub,  # pages in the batch
    "full_count" / c.Int32ub,
    "delta_count" / c.Int32ub,
    "delta_words" / c.Int32ub,  # 8-byte words the DELTA pages carry, in all
    "encoding" / c.Int8ub,
    "reserved" / c.Const(b"\x00" * 7),
    "stored_length" / c.Int32ub,  # bytes of the data section as carried
)
BATCH_HEADER_SIZE = BatchHeader.sizeof()  # 32: the page table starts 8-byte aligned

RoundEnd = c.Struct(
    "round" / c.Int32ub,
    "pages" / c.Int64ub,  # pages this channel carried in the round (a cross-check)
)

DeviceState = c.Struct(
    "crc" / c.Int32ub,  # CRC-32C of the state
    "state" / c.GreedyBytes,
)

End = c.Struct(
    "rounds" / c.Int32ub,
    "pages_sent" / c.Int64ub,
    "memory_digest" / c.Bytes(32),
    "device_state_length" / c.Int64ub,
)

Ack = c.Struct(
    "memory_digest" / c.Bytes(32),
)

Resumed = c.Struct(
    "resumed_at" / c.Float64b,  # the destination's time.time() when the guest resumed
)

Abort = c.Struct(
    "reason" / c.PascalString(c.Int16ub, "utf8"),
)

_FRAME_HEADER = FrameHeader.compile()
_BATCH_HEADER = BatchHeader.compile()
_FRAME_FIELDS = c.Struct(
    "magic" / c.Const(FRAME_MAGIC),
    "type" / c.Int8ub,
    "flags" / c.Int8ub,
    "length" / c.Int32ub,
    "sequence" / c.Int32ub,
).compile()

#: the largest body each message type may announce; a frame above it is refused before
#: a single byte of its body is read
BODY_CAPS = {
    FrameType.HELLO: Hello.sizeof(),
    FrameType.WELCOME: 2 + 1 + 4 + 2 + 4096,
    FrameType.JOIN: Join.sizeof(),
    FrameType.BATCH: MAX_FRAME,
    FrameType.ROUND_END: RoundEnd.sizeof(),
    FrameType.DEVICE_STATE: 4 + MAX_DEVICE_STATE,
    FrameType.END: End.sizeof(),
    FrameType.ACK: Ack.sizeof(),
    FrameType.GO: 0,
    FrameType.RESUMED: Resumed.sizeof(),
    FrameType.ABORT: 2 + 4096,
}


# -- frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    type: FrameType
    length: int
    sequence: int


def build_frame_header(ftype: FrameType, length: int, sequence: int) -> bytes:
    fields = _FRAME_FIELDS.build(
        dict(type=int(ftype), flags=0, length=length, sequence=sequence & 0xFFFFFFFF)
    )
    return fields + google_crc32c.value(fields).to_bytes(4, "big")


def parse_frame_header(raw: bytes | memoryview, expected_sequence: int) -> Frame:
    """Validate a frame header: magic, crc, known type, zero flags, length under the
    type's cap, sequence in order."""
    raw = bytes(raw)
    if len(raw) != FRAME_HEADER_SIZE:
        raise ProtocolError(f"frame header: {len(raw)} bytes, expected {FRAME_HEADER_SIZE}")
    if raw[:2] != FRAME_MAGIC:
        raise ProtocolError(f"frame {expected_sequence}: bad magic {raw[:2].hex()}")
    h = _FRAME_HEADER.parse(raw)
    if google_crc32c.value(raw[:12]) != h.crc:
        raise ProtocolError(f"frame {expected_sequence}: header checksum mismatch")
    try:
        ftype = FrameType(h.type)
    except ValueError:
        raise ProtocolError(f"frame {expected_sequence}: unknown type {h.type}") from None
    if h.flags:
        raise ProtocolError(f"frame {expected_sequence}: unknown flags {h.flags:#x}")
    if h.length > BODY_CAPS[ftype]:
        raise ProtocolError(
            f"frame {expected_sequence} ({ftype.name}): body of {h.length} bytes, "
            f"at most {BODY_CAPS[ftype]} allowed"
        )
    if h.sequence != expected_sequence & 0xFFFFFFFF:
        raise ProtocolError(
            f"frame sequence {h.sequence}, expected {expected_sequence}: lost or injected frame"
        )
    return Frame(ftype, h.length, h.sequence)


def parse_body(struct: c.Construct, body: bytes | memoryview, what: str) -> c.Container:
    """Parse a whole fixed or bounded body; trailing bytes or a short body are errors."""
    body = bytes(body)
    try:
        parsed = struct.parse(body)
        if struct.build(parsed) != body:
            raise ProtocolError(f"{what}: {len(body)} bytes do not match its layout")
    except (c.ConstructError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what}: malformed ({exc.__class__.__name__})") from None
    return parsed


# -- handshake ------------------------------------------------------------------------


@dataclass(frozen=True)
class HelloInfo:
    page_size: int
    page_count: int
    features: Feature
    channels: int
    session: bytes


def build_hello(page_size: int, page_count: int, features: Feature, channels: int) -> bytes:
    return Hello.build(
        dict(
            version=PROTOCOL_VERSION,
            page_size=page_size,
            page_count=page_count,
            features=int(features),
            channels=channels,
            session=uuid.uuid4().bytes,
        )
    )


def parse_hello(body: bytes | memoryview, max_memory: int) -> HelloInfo:
    """Validate the source's HELLO against the protocol's and this receiver's limits."""
    h = parse_body(Hello, body, "HELLO")
    if h.version != PROTOCOL_VERSION:
        raise ProtocolError(f"HELLO: protocol version {h.version}, this side speaks 1")
    ps = h.page_size
    if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
        raise ProtocolError(f"HELLO: page size {ps} is not a power of two in 512..1M")
    if h.page_count == 0 or h.page_count * ps > min(max_memory, MAX_MEMORY):
        raise ProtocolError(
            f"HELLO: {h.page_count} pages of {ps} bytes, at most "
            f"{min(max_memory, MAX_MEMORY)} bytes of guest memory accepted here"
        )
    if h.features & ~sum(int(f) for f in Feature):
        raise ProtocolError(f"HELLO: unknown feature bits {h.features:#x}")
    if not 1 <= h.channels <= MAX_CHANNELS:
        raise ProtocolError(f"HELLO: {h.channels} channels, 1..{MAX_CHANNELS} allowed")
    return HelloInfo(ps, h.page_count, Feature(h.features), h.channels, h.session)


# -- page batches ---------------------------------------------------------------------


def delta_mask_bytes(page_size: int) -> int:
    """One bit per 8-byte word of a page."""
    return page_size // 64


@dataclass
class Batch:
    """A decoded batch, still as views over the received body (no copy yet)."""

    round: int
    pages: np.ndarray  # uint64, strictly increasing
    kinds: np.ndarray  # uint8 PageKind
    encoding: Encoding
    stored: memoryview  # the data section as carried (empty until read)
    stored_length: int
    full_count: int
    delta_count: int
    delta_words: int
    raw_length: int  # bytes the data section decodes to (within the caps)


def build_batch_prefix(
    round_no: int,
    pages: np.ndarray,
    kinds: np.ndarray,
    full_count: int,
    delta_count: int,
    delta_words: int,
    encoding: Encoding,
    stored_length: int,
) -> list[bytes | memoryview]:
    """The batch header and tables; the caller sends the data section after them."""
    header = _BATCH_HEADER.build(
        dict(
            round=round_no,
            count=len(pages),
            full_count=full_count,
            delta_count=delta_count,
            delta_words=delta_words,
            encoding=int(encoding),
            stored_length=stored_length,
        )
    )
    n = len(pages)
    table = np.zeros(8 * n + kinds_padded(n), dtype=np.uint8)
    table[: 8 * n] = np.ascontiguousarray(pages, dtype="<u8").view(np.uint8)
    table[8 * n : 9 * n] = kinds
    return [header, table.data]


def kinds_padded(n: int) -> int:
    """Bytes the kinds table takes: one per page, rounded up to 8."""
    return (n + 7) & ~7


def batch_tables_size(header: bytes | memoryview) -> int:
    """From a batch header's 32 bytes, the size of the page tables after it (bounded by
    MAX_BATCH_PAGES, checked again by `parse_batch_head`)."""
    count = int.from_bytes(bytes(header[4:8]), "big")
    if count == 0 or count > MAX_BATCH_PAGES:
        raise ProtocolError(f"BATCH: {count} pages, 1..{MAX_BATCH_PAGES} allowed")
    return 8 * count + kinds_padded(count)


def parse_batch_head(head: memoryview, body_length: int, page_size: int, page_count: int) -> Batch:
    """Validate a batch's header and page tables (`head`, the start of a body of
    `body_length` bytes): counts within caps and consistent with the kinds, page numbers
    strictly increasing and in range, the data section sized as announced. The returned
    batch's `stored` is empty: the caller reads the data section where it wants it."""
    if len(head) < BATCH_HEADER_SIZE:
        raise ProtocolError(f"BATCH: {len(head)} bytes, shorter than its header")
    try:
        h = _BATCH_HEADER.parse(bytes(head[:BATCH_HEADER_SIZE]))
    except c.ConstructError:
        raise ProtocolError("BATCH: reserved header bytes are not zero") from None
    n = h.count
    tables = batch_tables_size(head[:BATCH_HEADER_SIZE])
    if len(head) != BATCH_HEADER_SIZE + tables:
        raise ProtocolError(f"BATCH: {len(head)} bytes of header and tables, expected more")
    try:
        encoding = Encoding(h.encoding)
    except ValueError:
        raise ProtocolError(f"BATCH: unknown encoding {h.encoding}") from None
    if h.full_count + h.delta_count > n:
        raise ProtocolError(f"BATCH: {h.full_count} full + {h.delta_count} delta > {n} pages")
    words = page_size // 8
    if h.delta_words > h.delta_count * words:
        raise ProtocolError(f"BATCH: {h.delta_words} delta words for {h.delta_count} pages")
    raw_length = (
        h.full_count * page_size + h.delta_count * delta_mask_bytes(page_size) + h.delta_words * 8
    )
    if raw_length > MAX_BATCH_DATA:
        raise ProtocolError(f"BATCH: decodes to {raw_length} bytes, at most {MAX_BATCH_DATA}")
    if encoding is Encoding.RAW and h.stored_length != raw_length:
        raise ProtocolError(f"BATCH: raw data of {h.stored_length} bytes, expected {raw_length}")
    if encoding is not Encoding.RAW and (h.stored_length == 0 or raw_length == 0):
        raise ProtocolError("BATCH: compressed data section of nothing")
    expected = BATCH_HEADER_SIZE + tables + h.stored_length
    if body_length != expected:
        raise ProtocolError(f"BATCH: body of {body_length} bytes, its header says {expected}")
    off = BATCH_HEADER_SIZE
    pages = np.frombuffer(head, dtype="<u8", count=n, offset=off)
    kinds = np.frombuffer(head, dtype=np.uint8, count=n, offset=off + 8 * n)
    if n > 1 and not bool((pages[1:] > pages[:-1]).all()):
        raise ProtocolError("BATCH: page numbers not strictly increasing")
    if int(pages[-1]) >= page_count:
        raise ProtocolError(f"BATCH: page {int(pages[-1])} beyond the guest's {page_count}")
    if head[off + 9 * n : off + tables].tobytes().strip(b"\x00"):
        raise ProtocolError("BATCH: padding after the page kinds is not zero")
    counts = np.bincount(kinds, minlength=3)
    if len(counts) > 3:
        raise ProtocolError(f"BATCH: unknown page kind {int(kinds.max())}")
    if counts[PageKind.FULL] != h.full_count or counts[PageKind.DELTA] != h.delta_count:
        raise ProtocolError("BATCH: page kinds disagree with the header's counts")
    return Batch(
        round=h.round,
        pages=pages,
        kinds=kinds,
        encoding=encoding,
        stored=memoryview(b""),
        stored_length=h.stored_length,
        full_count=h.full_count,
        delta_count=h.delta_count,
        delta_words=h.delta_words,
        raw_length=raw_length,
    )


def parse_batch(body: memoryview, page_size: int, page_count: int) -> Batch:
    """Validate a whole BATCH body (see `parse_batch_head`); `stored` views its data."""
    if len(body) < BATCH_HEADER_SIZE:
        raise ProtocolError(f"BATCH: {len(body)} bytes, shorter than its header")
    head_size = BATCH_HEADER_SIZE + batch_tables_size(body[:BATCH_HEADER_SIZE])
    if len(body) < head_size:
        raise ProtocolError(f"BATCH: {len(body)} bytes, shorter than its page tables")
    batch = parse_batch_head(body[:head_size], len(body), page_size, page_count)
    batch.stored = body[head_size:]
    return batch

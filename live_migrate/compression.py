"""Batch compression: zstd (level 1, as QEMU's multifd-zstd default) or LZ4.

Both libraries release the GIL, so batches compress on a thread pool. A compressor object
is not thread-safe: each thread keeps its own. Decompression is bounded by the size the
batch header announced, so a hostile stream cannot make the receiver allocate more.
"""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from live_migrate.errors import ProtocolError
from live_migrate.wire import Encoding

ZSTD_LEVEL = 1
#: a compressed batch must save at least this fraction, or it goes raw: decompressing
#: costs the receiver time that a barely smaller batch does not pay back
MIN_SAVING = 0.05

_local = threading.local()


def _zstd() -> zstandard.ZstdCompressor:
    z = getattr(_local, "zstd", None)
    if z is None:
        z = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
    return z


def compress(encoding: Encoding, data: bytes | memoryview) -> bytes | None:
    """Compress `data`, or None when it does not shrink enough to be worth it."""
    if encoding is Encoding.ZSTD:
        out = _zstd().compress(data)
    elif encoding is Encoding.LZ4:
        out = lz4.block.compress(data, store_size=False)
    else:
        raise ValueError(f"not a compression: {encoding}")
    if len(out) > len(data) * (1 - MIN_SAVING):
        return None
    return out


def decompress(encoding: Encoding, data: memoryview, raw_length: int) -> bytes:
    """Decompress a batch's data section to exactly `raw_length` bytes, or refuse it."""
    try:
        if encoding is Encoding.ZSTD:
            size = zstandard.frame_content_size(data)
            if size != raw_length:
                raise ProtocolError(f"BATCH: zstd frame says {size} bytes, the header {raw_length}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_length)
        elif encoding is Encoding.LZ4:
            out = lz4.block.decompress(data, uncompressed_size=raw_length)
        else:
            raise ProtocolError(f"BATCH: {encoding.name} is not a compression")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise ProtocolError(f"BATCH: {encoding.name.lower()} data is corrupt: {exc}") from None
    if len(out) != raw_length:
        raise ProtocolError(f"BATCH: decompressed to {len(out)} bytes, expected {raw_length}")
    return out

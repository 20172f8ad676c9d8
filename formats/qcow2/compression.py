"""Compressed clusters: zlib raw deflate as qemu writes it, and zstd frames.

qemu deflates with a 4 KiB window (windowBits -12) and inflates with the same, so we
write with -12; we read with -15, which accepts any raw deflate stream. Decompression
stops once a whole cluster came out: the descriptor rounds the compressed size up to a
sector, so bytes of the next cluster (or garbage) may follow the stream. Both codecs
release the GIL, so the engine's pool runs them in parallel; zstd contexts are not
thread-safe and live one per thread. zstandard is imported on the first zstd cluster:
most images never have one, and the import costs ~5 ms of every start.
"""

from __future__ import annotations

import io
import threading
import zlib
from typing import TYPE_CHECKING, Any

from ..errors import CorruptImage
from .layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

ZLIB_WBITS_WRITE = -12
ZLIB_WBITS_READ = -15
ZLIB_LEVEL = zlib.Z_DEFAULT_COMPRESSION  # what qemu uses
ZSTD_LEVEL = 3  # zstd's default, what qemu uses

_local = threading.local()

if TYPE_CHECKING:
    import zstandard


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zstd_d", None)
    if d is None:
        import zstandard

        d = _local.zstd_d = zstandard.ZstdDecompressor()
    return d


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zstd_c", None)
    if c is None:
        import zstandard

        c = _local.zstd_c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def decompress(ctype: int, data: bytes | memoryview, cluster_size: int, where: int) -> bytes:
    """One cluster from its compressed bytes; CorruptImage unless a whole cluster results."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(ZLIB_WBITS_READ).decompress(data, cluster_size)
        else:
            out = _zstd_decompress(data, cluster_size)
    except (zlib.error, _ZstdError) as exc:
        raise CorruptImage(
            f"qcow2: compressed cluster at {where:#x} does not decompress: {exc}"
        ) from exc
    if len(out) != cluster_size:
        raise CorruptImage(
            f"qcow2: compressed cluster at {where:#x} holds {len(out):#x} bytes, "
            f"expected {cluster_size:#x}"
        )
    return out


class _ZstdError(Exception):
    """zstandard's error, raised as this one (the module is imported on first use)."""


def _zstd_decompress(data: bytes | memoryview, cluster_size: int) -> bytes:
    import zstandard

    try:
        return _zstd_frames(zstandard, data, cluster_size)
    except zstandard.ZstdError as exc:
        raise _ZstdError(str(exc)) from exc


def _zstd_frames(zstandard: Any, data: bytes | memoryview, cluster_size: int) -> bytes:
    d = _zstd_d()
    try:
        size = zstandard.frame_content_size(bytes(data[:18]))
    except zstandard.ZstdError:
        size = -1
    if size == cluster_size:
        # the common case (qemu and we record the size): one call, trailing bytes ignored
        return d.decompress(data, max_output_size=cluster_size)
    # unknown size, or several frames: read at most one cluster, never more
    reader = d.stream_reader(io.BytesIO(data), read_across_frames=True)
    parts = []
    got = 0
    while got < cluster_size:
        chunk = reader.read(cluster_size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def compress(ctype: int, data: bytes | memoryview) -> bytes:
    if ctype == COMPRESSION_ZSTD:
        return _zstd_c().compress(data)
    c = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, ZLIB_WBITS_WRITE)
    return c.compress(data) + c.flush()

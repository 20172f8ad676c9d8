"""An Image over bytes in memory: parsers fed mutated metadata without touching disk."""

from __future__ import annotations

from formats.image import Image


class MemoryImage(Image):
    format = "memory"

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__(None, len(data))
        self.data = data  # not copied: fuzz tests mutate a seed in place, then restore it

    def _readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]


def mutate_and_run(seed: bytearray, edits: list[tuple[int, int]], fn):
    """Apply (offset, byte) edits to `seed`, call fn(MemoryImage), restore the seed."""
    saved = [(off, seed[off]) for off, _ in edits]
    try:
        for off, value in edits:
            seed[off] = value
        return fn(MemoryImage(seed))
    finally:
        for off, value in reversed(saved):
            seed[off] = value

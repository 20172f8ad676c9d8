"""Finding zeros in data: per-grain masks and runs, with numpy over whole buffers.

The engine asks at the target's cluster size; writers whose allocation unit is larger
(VHD, VHDX and VDI blocks) ask again at ZERO_GRAIN to leave holes inside fresh blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: granule at which fresh blocks skip zeros: they read as zeros unwritten (a file hole)
ZERO_GRAIN = 64 << 10


def nonzero_mask(buf: memoryview, n: int, grain: int) -> np.ndarray:
    """One bool per grain of buf[:n] (the last grain padded with zeros in `buf`): True
    where the grain holds a non-zero byte."""
    count = -(-n // grain)
    if not count:
        return np.zeros(0, dtype=bool)
    arr = np.frombuffer(buf, dtype=np.uint8, count=count * grain)
    if grain % 8 == 0:
        arr = arr.view(np.uint64)
    # an OR-reduction stays in the integers; any() converts every word to bool first
    return np.bitwise_or.reduce(arr.reshape(count, -1), axis=1) != 0


def differ_mask(a: memoryview, b: memoryview, n: int, grain: int) -> np.ndarray:
    """One bool per grain: True where a and b differ."""
    count = -(-n // grain)
    if not count:
        return np.zeros(0, dtype=bool)
    x = np.frombuffer(a, dtype=np.uint8, count=count * grain)
    y = np.frombuffer(b, dtype=np.uint8, count=count * grain)
    if grain % 8 == 0:
        x, y = x.view(np.uint64), y.view(np.uint64)
    return np.bitwise_or.reduce((x ^ y).reshape(count, -1), axis=1) != 0


def mask_runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of True."""
    if not mask.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        yield s, e - s


def nonzero_runs(data: memoryview, grain: int = ZERO_GRAIN) -> list[tuple[int, int]]:
    """(start, end) of the grains of `data` that hold a non-zero byte, merged; a short
    last grain counts as one."""
    n = len(data)
    full = n - n % grain
    out: list[tuple[int, int]] = []
    if full:
        out = [(f * grain, (f + c) * grain) for f, c in mask_runs(nonzero_mask(data, full, grain))]
    if full < n and bytes(data[full:]).count(0) != n - full:
        if out and out[-1][1] == full:
            out[-1] = (out[-1][0], n)
        else:
            out.append((full, n))
    return out

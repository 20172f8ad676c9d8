"""Host cluster reference counts: the packed on-disk widths, and the writer's in-memory
copy with its free space.

qcow2.txt "Host cluster management": refcount blocks hold `cluster_size * 8 /
refcount_bits` entries of 1 to 64 bits; sub-byte entries fill each byte from its least
significant bit. The writer keeps every count of the host file in one numpy array (its
size follows the host file, not the virtual disk) and writes back the blocks it changed.
"""

from __future__ import annotations

import bisect

import numpy as np

from ..errors import CorruptImage, FormatError

_DTYPES = {
    0: np.uint8,
    1: np.uint8,
    2: np.uint8,
    3: np.uint8,
    4: np.uint16,
    5: np.uint32,
    6: np.uint64,
}
_BIG = {4: ">u2", 5: ">u4", 6: ">u8"}


def dtype_for(order: int) -> np.dtype:
    return np.dtype(_DTYPES[order])


def unpack(buf: bytes | memoryview, order: int) -> np.ndarray:
    """The counts a refcount block's bytes hold, in cluster order."""
    bits = 1 << order
    if bits >= 16:
        return np.frombuffer(buf, _BIG[order]).astype(_DTYPES[order])
    raw = np.frombuffer(buf, np.uint8)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)


def pack(counts: np.ndarray, order: int) -> bytes:
    bits = 1 << order
    if bits >= 16:
        return counts.astype(_BIG[order]).tobytes()
    if bits == 8:
        return counts.astype(np.uint8).tobytes()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = counts.astype(np.uint8).reshape(-1, per) << shifts
    return np.bitwise_or.reduce(vals, axis=1).astype(np.uint8).tobytes()


class Refcounts:
    """The writer's refcounts: one count per host cluster, free runs, dirty blocks."""

    def __init__(self, cluster_size: int, order: int, counts: np.ndarray, end: int) -> None:
        self.cluster_size = cluster_size
        self.order = order
        self.max = (1 << (1 << order)) - 1
        self.block_entries = cluster_size * 8 >> order
        self.counts = counts
        #: clusters [0, end) are the host file; allocation past it appends
        self.end = end
        self.dirty: set[int] = set()
        #: sorted [start, count] runs of clusters below `end` with a count of 0
        self.free: list[list[int]] = []
        self._ensure(end)
        zero = (self.counts[:end] == 0).astype(np.int8)
        if zero.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], zero, [0]))))
            self.free = [[s, e - s] for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist())]

    # -- capacity and dirtiness ---------------------------------------------------
    def _ensure(self, n: int) -> None:
        if n > len(self.counts):
            grown = np.zeros(max(n, 2 * len(self.counts), 1024), dtype=self.counts.dtype)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def _touch(self, first: int, last: int) -> None:
        """Mark the blocks covering clusters [first, last] dirty."""
        be = self.block_entries
        self.dirty.update(range(first // be, last // be + 1))

    def _touch_many(self, idx: np.ndarray) -> None:
        if len(idx):
            self.dirty.update(np.unique(idx // self.block_entries).tolist())

    def blocks_needed(self) -> int:
        return -(-self.end // self.block_entries)

    def block(self, b: int) -> bytes:
        be = self.block_entries
        self._ensure((b + 1) * be)
        return pack(self.counts[b * be : (b + 1) * be], self.order)

    # -- allocation ---------------------------------------------------------------
    def alloc(self, n: int) -> np.ndarray:
        """n clusters with a count of 1: reused free runs first, then the file's end."""
        parts: list[np.ndarray] = []
        want = n
        while want and self.free:
            run = self.free[0]
            take = min(want, run[1])
            parts.append(np.arange(run[0], run[0] + take, dtype=np.int64))
            run[0] += take
            run[1] -= take
            if run[1] == 0:
                self.free.pop(0)
            want -= take
        if want:
            parts.append(np.arange(self.end, self.end + want, dtype=np.int64))
            self._ensure(self.end + want)
            self.end += want
        idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.counts[idx] = 1
        if len(parts) == 1:
            self._touch(int(idx[0]), int(idx[-1]))
        else:
            self._touch_many(idx)
        return idx

    def alloc_contiguous(self, n: int) -> int:
        """n adjacent clusters (tables must be contiguous); first fit, else at the end."""
        for i, run in enumerate(self.free):
            if run[1] >= n:
                start = run[0]
                run[0] += n
                run[1] -= n
                if run[1] == 0:
                    self.free.pop(i)
                break
        else:
            start = self.end
            self._ensure(self.end + n)
            self.end += n
        self.counts[start : start + n] = 1
        self._touch(start, start + n - 1)
        return start

    def append(self, n: int) -> int:
        """n clusters at the end with a count of 0, for the caller to count."""
        start = self.end
        self._ensure(start + n)
        self.end += n
        return start

    # -- counting -----------------------------------------------------------------
    def incref(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        add = np.bincount(idx - idx.min()) if len(idx) > 1 else np.ones(1, dtype=np.int64)
        base = int(idx.min())
        where = np.flatnonzero(add) + base
        new = self.counts[where].astype(np.uint64) + add[add != 0].astype(np.uint64)
        if (new > self.max).any():
            raise FormatError(f"qcow2: refcount overflow (more than {self.max} references)")
        self.counts[where] = new.astype(self.counts.dtype)
        self._touch_many(where)

    def decref(self, idx: np.ndarray) -> np.ndarray:
        """Drop one reference per index (repeats allowed); returns clusters now free."""
        if not len(idx):
            return idx
        uniq, times = np.unique(idx, return_counts=True)
        if (uniq >= self.end).any() or (uniq < 0).any():
            raise CorruptImage("qcow2: freeing a cluster outside the file")
        cur = self.counts[uniq].astype(np.int64)
        if (cur < times).any():
            bad = int(uniq[np.flatnonzero(cur < times)[0]])
            raise CorruptImage(f"qcow2: refcount of cluster {bad} would drop below zero")
        self.counts[uniq] = (cur - times).astype(self.counts.dtype)
        self._touch_many(uniq)
        freed = uniq[cur == times]
        self.add_free(freed)
        return freed

    def add_free(self, idx: np.ndarray) -> None:
        """Record clusters whose count is now 0 as reusable (sorted unique input)."""
        if not len(idx):
            return
        idx = np.asarray(idx, dtype=np.int64)
        edges = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(idx)]))
        for s, e in zip(idx[starts].tolist(), (idx[ends - 1] + 1).tolist()):
            self._add_run(s, e - s)

    def _add_run(self, start: int, count: int) -> None:
        i = bisect.bisect_left(self.free, [start, 0])
        self.free.insert(i, [start, count])
        # coalesce with neighbours
        if i + 1 < len(self.free) and self.free[i][0] + self.free[i][1] == self.free[i + 1][0]:
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == self.free[i][0]:
            self.free[i - 1][1] += self.free.pop(i)[1]

    def release(self, start: int, count: int) -> None:
        """Set clusters [start, start+count) to 0 (a table that moved) and reuse them."""
        self.counts[start : start + count] = 0
        self._touch(start, start + count - 1)
        self._add_run(start, count)

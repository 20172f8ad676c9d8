"""A bounded, thread-safe LRU of L2 tables with write-back.

Readers on the conversion pool share it; the single writer marks tables dirty, and a
dirty table pushed out of the cache is written back before it is dropped, so memory
stays bounded whatever the image size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

#: qemu's default L2 cache covers 8 GiB of a 64k-cluster image; we afford a little more
DEFAULT_CACHE_BYTES = 32 << 20


class TableCache:
    def __init__(
        self,
        load: Callable[[int], np.ndarray],
        store: Callable[[int, np.ndarray], None],
        table_bytes: int,
        capacity_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._load = load
        self._store = store
        self._capacity = max(4, capacity_bytes // max(table_bytes, 1))
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def get(self, offset: int) -> np.ndarray:
        """The table at host `offset` (native uint64); callers must not keep it across
        writes to the image."""
        with self._lock:
            table = self._tables.get(offset)
            if table is not None:
                self._tables.move_to_end(offset)
                return table
        # load outside the lock: a slow pread must not stall other readers
        table = self._load(offset)
        with self._lock:
            existing = self._tables.get(offset)
            if existing is not None:
                return existing
            self._insert(offset, table)
        return table

    def put_new(self, offset: int, table: np.ndarray) -> None:
        """Add a freshly allocated table (it is dirty: it exists only in memory)."""
        with self._lock:
            self._insert(offset, table)
            self._dirty.add(offset)

    def mark_dirty(self, offset: int, table: np.ndarray) -> None:
        """`table` changed; it is taken back in if it was pushed out meanwhile."""
        with self._lock:
            if self._tables.get(offset) is not table:
                self._insert(offset, table)
            self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (never write it back)."""
        with self._lock:
            self._tables.pop(offset, None)
            self._dirty.discard(offset)

    def flush(self) -> None:
        with self._lock:
            dirty = sorted(self._dirty)
            tables = [(off, self._tables[off]) for off in dirty]
            self._dirty.clear()
        for off, table in tables:
            self._store(off, table)

    def _insert(self, offset: int, table: np.ndarray) -> None:
        self._tables[offset] = table
        while len(self._tables) > self._capacity:
            old, old_table = self._tables.popitem(last=False)
            if old in self._dirty:
                self._dirty.discard(old)
                self._store(old, old_table)

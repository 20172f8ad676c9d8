"""A source file mapped read-only, so the conversion engine hands its pages to the writer
without first copying them into a buffer of its own.

A plain copy is two kernel copies per byte: page cache -> chunk buffer (`pread`) and chunk
buffer -> the output's page cache (`pwrite`). Through a mapping the writer copies straight
from the source's page cache. Kept because it pays on the work users have (issue 19's
bar: 10%): raw->qcow2 on ext4 of a 4 GiB disk holding 2 GiB of data, page cache dropped
before each run, one process per run, 5 alternating runs each: best 5.28 s / median
6.05 s mapped against 7.29 s / 10.79 s through buffers (load average 15-20 on 2 cores;
warm, in-process, on the bench disk: median 0.218 s against 0.271 s).

A mapping is only safe to touch from user space while its pages exist: a page past the
file's end (another process truncated or punched the file) or one the disk fails to read
raises SIGBUS, which kills the process where `pread` would have returned an error. So:

- the mapping lives under a **read lease** (`fcntl(F_SETLEASE, F_RDLCK)`), which the kernel
  grants only while no one has the file open for writing, and which makes every later
  open for writing and every truncate wait until the holder lets go. The kernel asks by
  SIGIO: we stop handing out views at once and give the lease back as soon as the views
  in flight are done (the writer's copies from them are the kernel's, which turns a
  missing page into an error, never a signal). No lease, no mapping: not a regular file,
  a filesystem without leases, a file someone has open for writing, a caller without the
  right (the file's owner or CAP_LEASE), or a thread other than the main one (where
  Python cannot take the signal);
- every view is populated (`MADV_POPULATE_READ`, Linux 5.14) before it is handed out,
  so a read error is an OSError there and not a signal later; a kernel without it gets
  no mapping;
- what the engine is done with is dropped from the page tables in batches
  (`MADV_DONTNEED`; the page cache keeps the pages), so the resident set stays bounded:
  per chunk, the TLB flushes cost more than the mapping saved.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import stat
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from .fileio import PAGE, madvise

#: madvise(2) advice missing from Python 3.11's mmap module
MADV_POPULATE_READ = 22
#: views the engine is done with are dropped from the page tables this much at a time
DROP_BATCH = 64 << 20


def _address(mm: mmap.mmap) -> int:
    """Where a read-only mapping starts (ctypes will not take a read-only buffer; numpy
    will, and lets go of it at once)."""
    return int(np.frombuffer(mm, dtype=np.uint8, count=0).ctypes.data)


class MappedFile:
    """Views of one leased file; `view` and `unview` may be called from any thread."""

    def __init__(self, fd: int, size: int, mm: mmap.mmap, path: str | None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self._mm = mm
        self._base = _address(mm)
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}  # start -> end of each view handed out
        self._done: list[tuple[int, int]] = []  # views given back, not yet dropped
        self._done_bytes = 0
        self._leased = True
        self.revoked = False

    def view(self, offset: int, n: int) -> memoryview | None:
        """The file's bytes [offset, offset + n), populated, or None once the lease is
        being broken (then read them the ordinary way)."""
        if offset < 0 or n <= 0 or offset + n > self.size:
            return None
        with self._lock:
            if self.revoked or offset in self._active:
                self._give_back_lease()
                return None
            self._active[offset] = offset + n
        start = offset - offset % PAGE
        try:  # without the GIL: populating may read from the disk
            madvise(self._base + start, offset + n - start, MADV_POPULATE_READ)
        except OSError as exc:
            self.unview(offset)
            why = f"cannot read {n} bytes at {offset:#x}: {exc.strerror}"
            raise OSError(exc.errno, why, self.path) from None
        return memoryview(self._mm)[offset : offset + n]

    def unview(self, offset: int) -> None:
        """The view at `offset` is no longer read by anyone (its writes are done)."""
        with self._lock:
            end = self._active.pop(offset, None)
            if end is not None:
                self._done.append((offset, end))
                self._done_bytes += end - offset
                if self._done_bytes >= DROP_BATCH:
                    self._drop_done()
            self._give_back_lease()

    def revoke(self) -> None:
        """The lease is being broken (called from the SIGIO handler, in the main thread,
        possibly while that thread holds the lock: then whoever takes it next gives the
        lease back)."""
        self.revoked = True
        if self._lock.acquire(blocking=False):
            try:
                self._give_back_lease()
            finally:
                self._lock.release()

    def _give_back_lease(self) -> None:
        # under the lock
        if self.revoked and self._leased and not self._active:
            self._leased = False
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)

    def _drop_done(self) -> None:
        # under the lock. One call for the span of what was given back when no view in
        # use lies inside it (chunks go back in order on a plain copy), else one per view
        lo = min(s for s, _ in self._done)
        hi = max(e for _, e in self._done)
        lo -= lo % PAGE
        if any(s < hi and e > lo for s, e in self._active.items()):
            spans = [(s - s % PAGE, e) for s, e in self._done]
        else:
            spans = [(lo, hi)]
        for s, e in spans:
            with contextlib.suppress(OSError):
                self._mm.madvise(mmap.MADV_DONTNEED, s, e - s)
        self._done.clear()
        self._done_bytes = 0

    def close(self) -> None:
        with self._lock:
            self.revoked = True
            self._active.clear()
            self._give_back_lease()
        with contextlib.suppress(BufferError):  # a view still referenced: freed with it
            self._mm.close()


@contextlib.contextmanager
def mapped(fd: int, path: str | None = None) -> Iterator[MappedFile | None]:
    """The file open read-only at `fd`, mapped and leased for the with-block; None where
    that cannot be had safely (the module docstring lists when)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    # the handler first: a lease broken before it is in place would kill us (SIGIO's
    # default action), and it goes last, once the lease is given back
    _catch_sigio(+1)
    m = None
    try:
        m = _map(fd, path)
        if m is not None:
            _live.add(m)
        yield m
    finally:
        if m is not None:
            _live.discard(m)
            m.close()
        _catch_sigio(-1)


def _map(fd: int, path: str | None) -> MappedFile | None:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing somewhere; EACCES, EINVAL: no leases here
        return None
    try:
        size = os.fstat(fd).st_size  # what the lease now protects
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError, OverflowError):  # no address space for it, say
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return None
    m = MappedFile(fd, size, mm, path)
    try:
        madvise(m._base, min(size, PAGE), MADV_POPULATE_READ)
    except OSError:  # EINVAL before Linux 5.14: read errors would be signals
        m.close()  # gives the lease back
        return None
    return m


#: mappings alive now, revoked together on SIGIO (the signal does not say which file)
_live: set[MappedFile] = set()
_users = 0
_previous_handler: Any = None


def _catch_sigio(delta: int) -> None:
    """Count the with-blocks that need SIGIO caught (main thread only, so no lock)."""
    global _users, _previous_handler
    if delta > 0 and _users == 0:
        _previous_handler = signal.signal(signal.SIGIO, _on_sigio)
    _users += delta
    if delta < 0 and _users == 0:
        signal.signal(signal.SIGIO, _previous_handler or signal.SIG_DFL)


def _on_sigio(signum: int, frame: Any) -> None:
    for m in list(_live):
        m.revoke()
    prev = _previous_handler
    if callable(prev):
        prev(signum, frame)

"""How the conversion engine moves a run of bytes from a source file into an output file.

For each run, the cheapest way that applies:

- **share** the blocks (FICLONERANGE, ioctl_ficlonerange(2)): both files on one
  filesystem that can share blocks (XFS with reflink, btrfs), both offsets and the length
  whole filesystem blocks. Nothing is read or written; the output owns its blocks
  afterwards as much as a copy would (the filesystem copies a shared block on write);
- **copy in the kernel** (copy_file_range(2)): both files on one filesystem, the run not
  shareable (unaligned, or the filesystem refuses): the bytes never enter this process;
- **copy through memory** (pread, pwrite) otherwise: different filesystems, a block
  device, a filesystem that supports neither.

A filesystem's refusal is remembered per pair of devices, so a failing call is made once.
The engine chooses between moving a run and reading it (to find zeros, compress, compare
with a backing image): see `Mover.can_move`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass

from .fileio import pwrite_all

#: _IOW(0x94, 13, struct file_clone_range) from linux/fs.h
FICLONERANGE = 0x4020940D
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset

#: errors by which a filesystem (or a pair of them) says it cannot do this at all
_REFUSED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM)

#: a copy through memory goes in pieces of this size
_BOUNCE = 4 << 20


@dataclass
class MoveCounts:
    """Bytes moved each way."""

    shared: int = 0
    copied_in_kernel: int = 0
    copied: int = 0


def _clone(src_fd: int, src_off: int, n: int, dst_fd: int, dst_off: int) -> None:
    fcntl.ioctl(dst_fd, FICLONERANGE, _CLONE_RANGE.pack(src_fd, src_off, n, dst_off))


def shares_blocks(directory: str) -> bool:
    """Whether files in `directory` can share blocks with each other: a block of a hole
    cloned between two scratch files (statfs cannot tell an XFS with reflink from one
    without; a filesystem that cannot refuses before it looks at the range, and a hole
    has no data to write back first)."""
    try:
        with (
            tempfile.TemporaryFile(dir=directory) as a,
            tempfile.TemporaryFile(dir=directory) as b,
        ):
            bs = os.fstatvfs(a.fileno()).f_bsize
            os.ftruncate(a.fileno(), bs)
            _clone(a.fileno(), 0, bs, b.fileno(), 0)
    except OSError:
        return False
    return True


class Mover:
    """Moves runs between files; counts what went which way. Used from one thread."""

    def __init__(self) -> None:
        self.counts = MoveCounts()
        #: (source device, output device) pairs that refused sharing / kernel copies
        self._no_share: set[tuple[int, int]] = set()
        self._no_kernel: set[tuple[int, int]] = set()
        self._files: dict[int, tuple[int, int, bool]] = {}  # fd -> (device, block, regular)
        self._lock = threading.Lock()

    def _file(self, fd: int) -> tuple[int, int, bool]:
        with self._lock:
            known = self._files.get(fd)
            if known is None:
                st = os.fstat(fd)
                regular = stat.S_ISREG(st.st_mode)
                block = os.fstatvfs(fd).f_bsize if regular else 0
                known = self._files[fd] = (st.st_dev, block, regular)
            return known

    def can_move(self, src_fd: int, dst_dev: int) -> bool:
        """Whether runs of `src_fd` stay in the kernel on their way to a file on
        `dst_dev`: a regular file on that very filesystem."""
        dev, _, regular = self._file(src_fd)
        return regular and dev == dst_dev

    def move(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
        """Put the n bytes at src_off of src_fd at dst_off of dst_fd."""
        sdev, _, sreg = self._file(src_fd)
        ddev, block, dreg = self._file(dst_fd)
        pair = (sdev, ddev)
        same = sreg and dreg and sdev == ddev
        if same and pair not in self._no_share and src_off % block == dst_off % block == 0:
            whole = n - n % block
            if whole:
                try:
                    _clone(src_fd, src_off, whole, dst_fd, dst_off)
                except OSError as exc:
                    if exc.errno not in _REFUSED:
                        raise
                    self._no_share.add(pair)
                else:
                    self.counts.shared += whole
                    src_off, dst_off, n = src_off + whole, dst_off + whole, n - whole
        if n and same and pair not in self._no_kernel:
            done = self._copy_in_kernel(src_fd, src_off, dst_fd, dst_off, n)
            if done is None:
                self._no_kernel.add(pair)
            else:
                self.counts.copied_in_kernel += done
                src_off, dst_off, n = src_off + done, dst_off + done, n - done
        if n:
            self._copy(src_fd, src_off, dst_fd, dst_off, n)

    @staticmethod
    def _copy_in_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> int | None:
        """Bytes copied by copy_file_range (fewer at the source's end), None when refused."""
        done = 0
        while done < n:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno in _REFUSED and not done:
                    return None
                raise
            if got == 0:  # the source ends here: the rest reads as zeros
                break
            done += got
        return done

    def _copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
        done = 0
        while done < n:
            step = min(_BOUNCE, n - done)
            data = os.pread(src_fd, step, src_off + done)
            if len(data) < step:  # past the source file's end: zeros
                data += bytes(step - len(data))
            pwrite_all(dst_fd, data, dst_off + done)
            done += step
        self.counts.copied += n


def output_device(path: str) -> int:
    """The device of the filesystem an output at `path` lands on."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_dev
    return os.stat(os.path.dirname(os.path.abspath(path))).st_dev

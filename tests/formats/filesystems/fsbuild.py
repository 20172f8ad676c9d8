"""Building filesystems for tests: a disk that held old data before mkfs (so free space
is not conveniently zero), running the tools, and the copy that keeps only used blocks."""

from __future__ import annotations

import json
import os
import random
import subprocess

from tests.external import p2v

MiB = 1 << 20
#: what free space on a used disk looks like: not zeros
OLD_DATA = (b"old data that must not be copied. " * 32)[:1024] * 1024


def run(*cmd: str, ok=(0,), **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode in ok, (
        f"{' '.join(map(str, cmd))} -> {res.returncode}: {res.stdout}{res.stderr}"
    )
    return res


def old_disk(path, size: int) -> str:
    """A file of `size` bytes full of old data (no holes)."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(OLD_DATA)
        f.write(OLD_DATA[: size % MiB])
    return str(path)


def skip_unused(src: str, out: str, *extra: str) -> dict:
    """`p2v convert --skip-unused` to raw; its statistics as JSON."""
    res = p2v(
        "convert", "--skip-unused", "--output", "json", *extra, "-f", "raw", "-O", "raw", src, out
    )
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    stats["stderr"] = res.stderr
    return stats


def nonzero_bytes(path: str) -> int:
    """Bytes in 4 KiB blocks holding anything but zeros (what a copy really wrote)."""
    import numpy as np

    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            pad = -len(chunk) % 4096
            arr = np.frombuffer(chunk + bytes(pad), dtype=np.uint64).reshape(-1, 512)
            n += int(arr.any(axis=1).sum()) * 4096
    return n


def same_size(a: str, b: str) -> bool:
    return os.path.getsize(a) == os.path.getsize(b)


def grain_bytes(r, grain: int = 4096) -> int:
    """Bytes of the `grain`-sized blocks the ranges touch: what the engine copies (it
    widens ranges to whole grains of the target's cluster size)."""
    from formats.filesystems import ranges

    if not len(r):
        return 0
    widened = r.copy()
    widened[:, 0] = r[:, 0] // grain * grain
    widened[:, 1] = -(-r[:, 1] // grain) * grain
    return ranges.covered(widened)


def write_tree(root) -> dict[str, bytes]:
    """A small directory tree under `root`: random and compressible files, an empty one,
    a nested one. Returns relative path -> content."""
    rng = random.Random(42)
    files = {
        "random.bin": rng.randbytes(700 * 1024),
        "big.bin": rng.randbytes(3 * MiB + 123),
        "text.txt": b"".join(b"line %d of a log file\n" % i for i in range(8000)),
        "empty": b"",
        "small.txt": b"hello\n",
        "dir/sub/nested.bin": rng.randbytes(40 * 1024 + 7),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files

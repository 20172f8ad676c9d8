"""Disk files for the kill tests: random MiB every third MiB, zeros between, so both
the data path and zero detection are busy when the kill comes."""

from __future__ import annotations

import random

MiB = 1 << 20


def striped_disk(path: str, size_mib: int, seed: int, *, last_mib: bool = False) -> str:
    """Write the disk at `path`; `last_mib` also fills the final MiB (end-of-disk paths)."""
    rng = random.Random(seed)
    stripes = [*range(0, size_mib, 3), *([size_mib - 1] if last_mib else [])]
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for i in stripes:
            f.seek(i * MiB)
            f.write(rng.randbytes(MiB))
    return path

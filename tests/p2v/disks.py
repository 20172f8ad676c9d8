"""Disk files for the kill tests (random MiB every third MiB, zeros between, so both
the data path and zero detection are busy when the kill comes), and the kill itself."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable

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


def kill_when(
    cmd: list[str], ready: Callable[[], bool], finished: Callable[[], None], attempts: int = 5
) -> None:
    """Run `cmd` and SIGKILL it as soon as `ready()` holds, polling every millisecond;
    assert the kill landed while it ran. A run that ends between two polls (a fast
    machine) is handed to `finished` (check what it wrote, clear it) and tried again; a
    slow machine only makes the moment easier to catch."""
    for _ in range(attempts):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while proc.poll() is None and not ready():
                time.sleep(0.001)
        finally:
            proc.kill()
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            return
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}) before the kill"
        finished()
    raise AssertionError(f"{cmd} ended before the kill moment in {attempts} attempts")


def allocated(path: str) -> int:
    """Bytes of `path` the filesystem holds (0 while it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0

"""The synthetic guest: its dirty log loses no write, pause and throttle work."""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import pytest

from live_migrate.errors import GuestError
from live_migrate.guest import DirtyTracking, Geometry, SourceGuest
from live_migrate.guests.sim import SimGuest, SimTarget, parse_spec
from tests.external import unavailable


def pages_of(guest: SimGuest) -> np.ndarray:
    return np.frombuffer(guest.memory(), dtype=np.uint64).reshape(guest.geometry.page_count, -1)


def test_spec_parsing() -> None:
    c = parse_spec("sim:64M,workload=hotset,hot=8M,skew=0.5,rate=100M,dirty=scan,seed=3")
    assert (c.size, c.workload, c.hot, c.skew, c.rate) == (
        64 << 20,
        "hotset",
        8 << 20,
        0.5,
        100 << 20,
    )
    assert c.dirty is DirtyTracking.SCAN and c.seed == 3
    assert parse_spec("sim:64M,workload=hotset").hot == 16 << 20  # a quarter by default
    for bad, match in [
        ("sim:", "size is required"),
        ("sim:1M,workload=spin", "workload"),
        ("sim:1M,colour=red", "unknown option"),
        ("sim:1M,rate=fast", "invalid"),
        ("sim:1000", "multiple of 4096"),
        ("sim:1M,workload=hotset,hot=2M", "hot set"),
    ]:
        with pytest.raises(GuestError, match=match):
            parse_spec(bad)


def test_memory_is_read_only_and_filled() -> None:
    with SimGuest(parse_spec("sim:4M")) as guest:
        assert isinstance(guest, SourceGuest)
        mem = pages_of(guest)
        assert not mem.flags.writeable
        zero = (~mem.any(axis=1)).mean()
        assert 0.15 < zero < 0.35, "the mixed fill has about a quarter of zero pages"
        with pytest.raises(TypeError):
            guest.memory()[0] = 1


def test_dirty_log_reports_exactly_the_written_pages() -> None:
    with SimGuest(parse_spec("sim:8M,workload=uniform,deterministic")) as guest:
        guest.start_dirty_log()
        before = pages_of(guest).copy()
        guest.step(1)
        dirty = guest.collect_dirty_log()
        changed = (pages_of(guest) != before).any(axis=1)
        assert changed.sum() > 100
        # a write may leave a page as it was (same value): never the other way round
        assert not (changed & ~dirty).any()
        assert (dirty & ~changed).sum() <= 2
        assert not guest.collect_dirty_log().any(), "nothing written since"


def test_dirty_log_loses_no_write_under_a_running_writer() -> None:
    with SimGuest(parse_spec("sim:16M,workload=uniform,rate=400M,words=1")) as guest:
        guest.start_dirty_log()
        start = pages_of(guest).copy()
        seen = np.zeros(guest.geometry.page_count, dtype=bool)
        for _ in range(20):
            time.sleep(0.01)
            seen |= guest.collect_dirty_log()
        guest.pause()
        seen |= guest.collect_dirty_log()
        changed = (pages_of(guest) != start).any(axis=1)
        assert changed.sum() > 500
        assert not (changed & ~seen).any(), "a write missed by the log"


def test_pause_stops_writes_and_throttle_slows_them() -> None:
    with SimGuest(parse_spec("sim:8M,workload=uniform,rate=20M")) as guest:
        time.sleep(0.2)
        guest.pause()
        assert guest.is_paused
        frozen = guest.memory_hash()
        written = guest.pages_written
        time.sleep(0.1)
        assert guest.memory_hash() == frozen and guest.pages_written == written
        guest.resume()
        t, n = time.monotonic(), guest.pages_written
        time.sleep(0.4)
        full = (guest.pages_written - n) / (time.monotonic() - t)
        guest.set_throttle(0.9)
        t, n = time.monotonic(), guest.pages_written
        time.sleep(0.4)
        slow = (guest.pages_written - n) / (time.monotonic() - t)
        # no floor on the writer's own rate (a loaded machine schedules it late): the
        # throttle's effect is relative
        assert full > 0 and slow < full * 0.3
        with pytest.raises(GuestError, match="running guest"):
            guest.save_device_state()


def test_writer_exits_with_its_parent_and_leaves_no_file(tmp_path) -> None:
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from live_migrate.guests.sim import SimGuest, parse_spec\n"
        "g = SimGuest(parse_spec('sim:1M,workload=uniform,rate=1M'))\n"
        "print(g._proc.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the writer outlived its parent")


def _smaps(address: int, key: str) -> str:
    """A field of this process's mapping at `address` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == key + ":":
                return rest.strip()
    return ""


def _resident(address: int, length: int) -> int:
    """Bytes of [address, address + length) present in memory (/proc/self/pagemap bit
    63). Not smaps' Rss: the kernel may merge a neighbouring mapping with the same flags
    into the same area (numpy asks for huge pages on its large buffers too)."""
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // page * 8)
        entries = np.frombuffer(f.read(length // page * 8), dtype="<u8")
    return int((entries >> np.uint64(63)).sum()) * page


@pytest.mark.parametrize("prealloc", [False, True])
def test_target_memory_asks_for_huge_pages(prealloc: bool) -> None:
    """As QEMU does for guest RAM: the first touch of fresh memory is then one fault
    per 2 MiB, not per 4 KiB page. Preallocated, every page is present at once."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"):
        unavailable("transparent huge pages are Linux only")
    target = SimTarget(Geometry(4096, 1024), prealloc=prealloc)
    try:
        mem = np.frombuffer(target.memory(), dtype=np.uint8)
        address = mem.ctypes.data
        assert address % mmap.PAGESIZE == 0
        assert "hg" in _smaps(address, "VmFlags").split()
        assert _resident(address, 4 << 20) == (4 << 20 if prealloc else 0)
        assert not mem.any()
        del mem
    finally:
        target.close()

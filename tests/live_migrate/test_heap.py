import platform
import subprocess
import sys

from tests.external import unavailable

#: a fresh interpreter mallocs and frees 8 MiB through glibc and says, from mallinfo2,
#: how much of it was mmapped and how much the heap kept after the free
PROBE = """
import ctypes, sys
from live_migrate import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    ).split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert heap.keep_freed_memory()
    assert heap.keep_freed_memory()  # once per process, then a no-op
before = libc.mallinfo2()
block = libc.malloc(8 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


def _malloc_8_mib(mode: str) -> tuple[int, int]:
    res = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    mapped, kept = res.stdout.split()
    return int(mapped), int(kept)


def test_keep_freed_memory_keeps_a_freed_8_mib_temporary_in_the_heap() -> None:
    if platform.libc_ver()[0] != "glibc":
        unavailable("mallopt and mallinfo2 are glibc's")
    # glibc's defaults, the control: a fresh mmap, unmapped again by free
    mapped, kept = _malloc_8_mib("default")
    assert mapped >= 8 << 20 and kept < 8 << 20
    # with the thresholds raised: served from the heap, and still there after free
    mapped, kept = _malloc_8_mib("keep")
    assert mapped == 0 and kept >= 8 << 20

"""Keep freed numpy temporaries in the process instead of handing them back to the kernel.

A batch of scattered pages makes temporaries of a few MiB (the gathered pages, their
old copies, the comparison). glibc serves such sizes with a fresh mmap and unmaps them
when freed, so every batch faults its temporaries in again page by page: measured here,
6.2 us per resent page of gathering and delta encoding, 1.3 us once the memory is
reused. Raising glibc's mmap and trim thresholds keeps that memory for the next batch
(bounded by the largest set of temporaries alive at once).
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: below glibc's own ceiling for the mmap threshold (32 MiB on 64-bit): batches of up
#: to 64 MiB of data still get their own mapping
_THRESHOLD = 32 * 1024 * 1024
_done = False


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        # the symbols already loaded (no ctypes.util.find_library: it runs ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * _THRESHOLD)
    )
    _done = ok
    return ok

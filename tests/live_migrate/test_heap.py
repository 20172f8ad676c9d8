import platform

import pytest

from live_migrate import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    assert heap.keep_freed_memory()
    assert heap.keep_freed_memory()  # once per process, then a no-op

"""Progress bars for long work: a tqdm bar behind the engines' plain callbacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Callback = Callable[[int, int], None]


@contextlib.contextmanager
def byte_bar(desc: str, enabled: bool = True) -> Iterator[Callback | None]:
    """Yield a (done, total) callback drawing a bytes bar on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # 0.1 s to import: only when a bar is drawn

    bar = tqdm(
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()

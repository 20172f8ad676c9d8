"""Bandwidth caps: `--max-bandwidth RATE` for `p2v clone` / `p2v sync`, and the per-source
and per-wave caps of fleet plans.

The cap is applied where the controller takes bytes off the SSH channel: a reader that
waits stops the channel's window from reopening, so the agent on the server stops sending
and the link carries at most the rate (plus one SSH window, 2 MiB, of burst).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?\s*(?:b|b/s|bps)?\s*$", re.IGNORECASE)


def parse_rate(text: str | int | float) -> float:
    """Bytes per second from `40M`, `40MB/s`, `1.5G`, `512Ki` or a plain number of bytes.
    Decimal prefixes are powers of 1000 (as link speeds are quoted), `Ki`/`Mi`/`Gi` of 1024."""
    if isinstance(text, bool):
        raise ValueError(f"bandwidth {text!r}: expected a rate such as 40M or 1.5G")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _RATE.match(str(text))
        if not m:
            raise ValueError(f"bandwidth {text!r}: expected a rate such as 40M, 1.5G or 512Ki")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not value > 0:
        raise ValueError(f"bandwidth {text!r}: must be more than 0")
    return value


class TokenBucket:
    """At most `rate` bytes a second on average, `burst` bytes at once. `take(n)` waits
    until n bytes may pass; the clock and the sleep are handed in so that tests drive it
    step by step."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be more than 0")
        self.rate = float(rate)
        # a quarter of a second's worth: small enough to keep the average honest over a
        # few seconds, large enough that each 4 MiB chunk does not wait twice
        self.burst = float(burst if burst is not None else max(rate / 4, 64 << 10))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, n: int) -> float:
        """Wait until `n` bytes may pass; the seconds waited. A request larger than the
        burst is let through in the debt it leaves (the next ones wait it off)."""
        waited = 0.0
        with self._lock:
            self._refill()
            self._tokens -= n
            if self._tokens < 0:
                waited = -self._tokens / self.rate
        if waited:
            self._sleep(waited)
        return waited


class ThrottledStream:
    """A protocol stream (sendall/recv/close/diagnostics) whose received bytes pass through
    a token bucket."""

    def __init__(self, stream: Any, bucket: TokenBucket) -> None:
        self._stream = stream
        self._bucket = bucket

    def recv(self, n: int) -> bytes:
        data = self._stream.recv(n)
        if data:
            self._bucket.take(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

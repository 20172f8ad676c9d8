"""What a migration reports: progress while it runs, a report when it ends.

The report's fields follow QEMU's `query-migrate` where they overlap (total time, setup
time, downtime, expected downtime, transferred bytes, zero ("duplicate") and normal
pages, dirty rate, bandwidth, dirty-sync count = rounds), so users can compare runs of
both. Times are seconds, rates bytes per second.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from live_migrate.states import MigrationState


@dataclass
class PageCounts:
    """Pages sent, by how they travelled (a page sent in three rounds counts three times)."""

    zero: int = 0  # a flag only
    full: int = 0  # its bytes, uncompressed
    compressed: int = 0  # its bytes, in a compressed batch
    delta: int = 0  # only the words that changed since it was last sent

    def add(self, other: PageCounts) -> None:
        self.zero += other.zero
        self.full += other.full
        self.compressed += other.compressed
        self.delta += other.delta

    @property
    def total(self) -> int:
        return self.zero + self.full + self.compressed + self.delta


@dataclass
class RoundReport:
    round: int
    pages_sent: int
    bytes_sent: int  # on the wire, frames included
    duration: float  # the round's send time plus its dirty-page collection
    bandwidth: float  # bytes on the wire / send time
    dirty_pages: int  # found after the round
    dirty_rate: float  # bytes of pages dirtied per second of the round
    scan_time: float  # the dirty-page collection (a full scan in scan mode)
    expected_downtime: float  # predicted after the round
    throttle: float  # the guest's throttle during the round
    pages: PageCounts = field(default_factory=PageCounts)
    final: bool = False  # the stop-and-copy round, with the guest paused


@dataclass
class MigrationReport:
    state: MigrationState
    error: str | None  # why it failed or was cancelled
    source_running: bool  # the guest runs on the source afterwards
    destination_resumed: bool  # the destination confirmed the guest runs there
    #: the destination acknowledged the memory digest of END: it holds every page sent
    memory_verified: bool
    total_time: float
    setup_time: float
    downtime: float | None  # pause -> destination's RESUMED received; measured
    paused_at: float | None  # time.time() at the pause (compare with the receiver's resumed_at)
    expected_downtime: float | None  # the last prediction before switch-over
    memory_size: int
    page_size: int
    bytes_sent: int
    pages: PageCounts
    rounds: list[RoundReport]
    dirty_tracking: str
    channels: int
    features: list[str]
    max_downtime: float
    max_bandwidth: float | None
    auto_converge: bool
    throttle: float  # the highest throttle applied
    device_state_bytes: int
    states: list[tuple[str, float]]  # (state, seconds since start)
    #: the downtime's steps, seconds each: pause, collect (the final scan in scan mode),
    #: send, device_state, acknowledge (END -> ACK), resume (GO -> RESUMED)
    switch_over: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.state is MigrationState.COMPLETED

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class Progress:
    """A snapshot for progress displays, sent after every round."""

    state: MigrationState
    round: int
    memory_size: int
    bytes_sent: int
    remaining: int  # bytes of dirty pages still to send
    dirty_rate: float
    bandwidth: float
    expected_downtime: float
    throttle: float


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def _rate(n: float) -> str:
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if n < 1000 or unit == "GB/s":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} B/s"


class ProgressBar:
    """A tqdm bar for `Progress` snapshots: bytes sent against memory size, with the
    round, remaining bytes, dirty rate, bandwidth and expected downtime beside it."""

    def __init__(self, enabled: bool = True, desc: str = "migrate") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def __call__(self, p: Progress) -> None:
        if self.bar is None:
            return
        # the total grows with resent pages: the bar never runs backwards
        total = max(p.bytes_sent + p.remaining, p.memory_size)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.set_postfix_str(
            f"round {p.round}, remaining {p.remaining / 2**20:.1f} MiB, "
            f"dirty {_rate(p.dirty_rate)}, bw {_rate(p.bandwidth)}, "
            f"downtime ~{p.expected_downtime * 1000:.0f} ms"
            + (f", throttle {p.throttle:.0%}" if p.throttle else ""),
            refresh=False,
        )
        self.bar.update(p.bytes_sent - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

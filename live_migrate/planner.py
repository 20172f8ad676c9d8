"""The pre-copy model: will a guest converge, how long will it take, what downtime.

Notation (docs/migration.md explains it at length): memory M bytes, of which a fraction z
is zero pages at the start; bandwidth B bytes/s; the guest writes at D bytes/s (pages
written x page size) spread over a writable working set W (the pages it writes at all).

- Round 0 sends every non-zero page: M(1 - z) bytes, in t0 = M(1 - z) / B, plus the zero
  pages the guest writes before round 0 reaches them (they go as data): with a region's
  pages spread over memory, round 0 reaches a page at a uniformly distributed time in
  [0, t0], so that is z times the region's mean dirtied(t) over [0, t0] (t0 grows by
  what they cost: a fixed point, found in a few steps).
- Round i sends the pages dirtied during round i-1. A guest writing uniformly at random
  over W at rate D touches W(1 - exp(-D t / W)) distinct bytes in t seconds (a page
  written twice is sent once); that is D t while D t << W and saturates at W, the
  `min(D t, WWS)` of the classic model (Clark et al., NSDI 2005). A sequential writer
  touches exactly min(D t, W). A workload is a sum of such regions (a hot set beside
  background writes), each with its own W and D.
- So t_i = dirty(t_{i-1}) / B. With rho = D / B and W large the rounds shrink as rho^i:
  the total sent is M(1 - rho^(n+1)) / (1 - rho) and it converges only when rho < 1.
- Switch-over after the first round whose leftover fits: dirty(t_i) / B + S <= T, where
  T is max_downtime and S the cost of the final dirty-page collection (a full scan of M
  in scan mode, at the measured scan speed). Downtime = dirty(t_i) / B + S + 2 RTT.
- Auto-converge (QEMU's cpu-throttle): after two rounds in a row that dirtied more than
  half of what they sent, the throttle x rises (20 %, +10 % per step, 99 % at most) and
  the guest writes at D(1 - x).

Every page on the wire costs 9 bytes of tables besides its data (a zero page costs only
those). These are the bounds `tests/bench/bench_migrate.py` holds the engine to.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from live_migrate.guest import DirtyTracking, SourceGuest

#: wire bytes per page beyond its data: page number (8) and kind (1)
PAGE_OVERHEAD = 9


@dataclass(frozen=True)
class Region:
    """Part of a workload: writes at `rate` bytes/s over `size` bytes."""

    size: int
    rate: float
    sequential: bool = False

    def dirtied(self, seconds: float) -> float:
        """Distinct bytes written in `seconds`."""
        if self.rate <= 0 or seconds <= 0 or self.size <= 0:
            return 0.0
        if self.sequential:
            return min(self.rate * seconds, float(self.size))
        return self.size * -math.expm1(-self.rate * seconds / self.size)

    def mean_dirtied(self, seconds: float) -> float:
        """The mean of `dirtied(t)` over t in [0, seconds]: the bytes of the region
        written before a pass that reaches each page at a uniformly distributed time."""
        if self.rate <= 0 or seconds <= 0 or self.size <= 0:
            return 0.0
        w, a = float(self.size), self.rate * seconds / self.size
        if self.sequential:
            return w * a / 2 if a <= 1 else w * (1 - 1 / (2 * a))
        if a < 1e-6:
            return w * a / 2
        return w * (1 + math.expm1(-a) / a)


@dataclass
class PlanRound:
    round: int
    bytes: float  # data bytes sent (before per-page overhead)
    seconds: float
    throttle: float


@dataclass
class Plan:
    converges: bool
    reason: str
    rounds: int  # pre-copy rounds before switch-over
    total_time: float  # setup excluded
    downtime: float
    bytes_sent: float  # on the wire, final round included
    throttle: float  # the throttle the model needed (auto-converge)
    memory_size: int
    bandwidth: float
    dirty_rate: float
    working_set: int
    max_downtime: float
    schedule: list[PlanRound] = field(default_factory=list)


def plan(
    memory: int,
    bandwidth: float,
    regions: list[Region],
    *,
    max_downtime: float = 0.300,
    zero_fraction: float = 0.0,
    page_size: int = 4096,
    max_rounds: int = 30,
    max_time: float = 600.0,
    auto_converge: bool = False,
    scan_rate: float | None = None,
    rtt: float = 0.0,
    throttle_initial: float = 0.20,
    throttle_increment: float = 0.10,
    throttle_max: float = 0.99,
) -> Plan:
    """Run the model round by round (see the module docstring)."""
    if bandwidth <= 0 or memory <= 0:
        raise ValueError("memory and bandwidth must be positive")
    wire_per_byte = (page_size + PAGE_OVERHEAD) / page_size
    scan = memory / scan_rate if scan_rate else 0.0
    schedule: list[PlanRound] = []
    throttle = 0.0
    high = 0
    seconds = 0.0
    for _ in range(8):  # zero pages written before round 0 reaches them go as data
        written = min(sum(r.mean_dirtied(seconds) for r in regions), memory)
        data0 = memory * (1 - zero_fraction) + zero_fraction * written
        zero_pages = (memory - data0) / page_size
        wire_total = data0 * wire_per_byte + zero_pages * PAGE_OVERHEAD
        seconds = wire_total / bandwidth + scan
    schedule.append(PlanRound(0, data0, seconds, 0.0))
    elapsed = seconds
    sent_last = wire_total
    converges, reason = False, ""
    while True:
        dirty = sum(r.dirtied(seconds * (1 - throttle)) for r in regions)
        wire = dirty * wire_per_byte
        downtime = wire / bandwidth + scan + 2 * rtt
        if downtime <= max_downtime:
            converges, reason = True, "converges"
            break
        if dirty == 0:
            # the engine switches over then too: more rounds cannot shorten the pause
            reason = "the final scan and round trips alone exceed the downtime limit"
            break
        if len(schedule) >= max_rounds:
            reason = f"does not converge within {max_rounds} rounds"
            break
        if elapsed > max_time:
            reason = f"does not converge within {max_time:g} s"
            break
        if auto_converge:
            high = high + 1 if dirty > sent_last / 2 else 0
            if high >= 2:
                high = 0
                throttle = (
                    throttle_initial
                    if throttle == 0
                    else min(throttle + throttle_increment, throttle_max)
                )
        seconds = wire / bandwidth + scan
        schedule.append(PlanRound(len(schedule), dirty, seconds, throttle))
        elapsed += seconds
        wire_total += wire
        sent_last = wire
    if converges or dirty == 0:
        wire_total += wire
    dirty_rate = sum(r.rate for r in regions)
    return Plan(
        converges=converges,
        reason=reason if converges else f"{reason}: {_why(dirty_rate, bandwidth, auto_converge)}",
        rounds=len(schedule),
        total_time=elapsed + (downtime if converges or dirty == 0 else 0.0),
        downtime=downtime,
        bytes_sent=wire_total,
        throttle=throttle,
        memory_size=memory,
        bandwidth=bandwidth,
        dirty_rate=dirty_rate,
        working_set=sum(r.size for r in regions),
        max_downtime=max_downtime,
        schedule=schedule,
    )


def _why(dirty_rate: float, bandwidth: float, auto_converge: bool) -> str:
    rho = dirty_rate / bandwidth
    tip = "" if auto_converge else "; auto-converge may help"
    return f"dirty rate / bandwidth = {rho:.2f}{tip}"


def simple_regions(dirty_rate: float, working_set: int) -> list[Region]:
    """One region: the classic model's D and WWS."""
    return [Region(working_set, dirty_rate)] if dirty_rate > 0 else []


@dataclass
class Measurement:
    dirty_rate: float  # bytes/s of distinct pages dirtied over short intervals
    working_set: int  # bytes of distinct pages dirtied over the whole window
    zero_fraction: float
    seconds: float


def measure(guest: SourceGuest, seconds: float = 2.0, interval: float = 0.1) -> Measurement:
    """Watch a running guest: its dirty rate (distinct pages per short interval) and its
    working set (distinct pages over the window), with its dirty log or by scanning."""
    g = guest.geometry
    mem = np.frombuffer(guest.memory(), dtype=np.uint64).reshape(g.page_count, -1)
    zero = float((~mem.any(axis=1)).mean())
    seen = np.zeros(g.page_count, dtype=bool)
    rates = []
    if guest.dirty_tracking is DirtyTracking.LOG:
        guest.start_dirty_log()
        collect = guest.collect_dirty_log
    else:
        last = mem.copy()

        def collect() -> np.ndarray:
            changed = (mem != last).any(axis=1)
            last[changed] = mem[changed]
            return changed

    try:
        t0 = prev = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(interval)
            dirty = collect()
            now = time.monotonic()
            rates.append(int(dirty.sum()) * g.page_size / (now - prev))
            seen |= dirty
            prev = now
    finally:
        if guest.dirty_tracking is DirtyTracking.LOG:
            guest.stop_dirty_log()
    return Measurement(
        dirty_rate=float(np.median(rates)) if rates else 0.0,
        working_set=int(seen.sum()) * g.page_size,
        zero_fraction=zero,
        seconds=time.monotonic() - t0,
    )

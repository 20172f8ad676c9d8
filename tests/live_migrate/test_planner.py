"""The pre-copy model against its closed forms, and `p2v migrate --plan`."""

from __future__ import annotations

import json
import math

import pytest

from live_migrate import planner
from live_migrate.planner import PAGE_OVERHEAD, Region
from tests.external import p2v

M = 1 << 30
B = 125e6


def test_rounds_shrink_geometrically_with_an_unbounded_working_set() -> None:
    rho = 0.5
    plan = planner.plan(M, B, [Region(1 << 60, rho * B)], max_downtime=0.01)
    assert plan.converges
    step = rho * (4096 + PAGE_OVERHEAD) / 4096  # each page sent costs its tables too
    for a, b in zip(plan.schedule[1:], plan.schedule[2:]):
        assert b.bytes / a.bytes == pytest.approx(step, rel=1e-6)
    # the closed form: total = M (1 - r^(n+1)) / (1 - r), downtime = M r^n / B
    n = plan.rounds
    wire = M * (4096 + PAGE_OVERHEAD) / 4096
    assert plan.bytes_sent == pytest.approx(wire * (1 - step ** (n + 1)) / (1 - step), rel=1e-6)
    assert plan.downtime == pytest.approx(wire * step**n / B, rel=1e-6)
    assert plan.downtime <= 0.01 < plan.downtime / step


def test_dirtying_saturates_at_the_working_set() -> None:
    hot = Region(64 << 20, 1e9)
    assert hot.dirtied(10.0) == pytest.approx(64 << 20, rel=1e-3)
    assert hot.dirtied(1e-4) == pytest.approx(1e5, rel=1e-3)
    assert Region(64 << 20, 1e9, sequential=True).dirtied(0.01) == 1e7
    plan = planner.plan(M, B, [hot], max_downtime=0.3)
    # 64 MiB rewritten far faster than it is sent: every round resends all of it, and it
    # does not fit in 300 ms at 125 MB/s
    assert not plan.converges and "within 30 rounds" in plan.reason
    assert all(r.bytes <= 64 << 20 for r in plan.schedule[1:])


def test_a_guest_faster_than_the_link_converges_only_with_auto_converge() -> None:
    regions = [Region(M, 2 * B)]
    assert not planner.plan(M, B, regions).converges
    plan = planner.plan(M, B, regions, auto_converge=True, max_rounds=60)
    assert plan.converges and plan.throttle >= 0.5
    throttles = [r.throttle for r in plan.schedule]
    assert throttles == sorted(throttles)


def test_zero_pages_and_scan_time_enter_the_model() -> None:
    idle = planner.plan(M, B, [], zero_fraction=0.25)
    assert idle.converges and idle.rounds == 1
    pages = M // 4096
    assert idle.bytes_sent == pytest.approx(0.75 * M + pages * PAGE_OVERHEAD)
    scan = planner.plan(M, B, [], scan_rate=5e9)
    assert scan.downtime == pytest.approx(M / 5e9)
    slow = planner.plan(M, B, [], scan_rate=1e9)  # a 1 GiB scan takes longer than 300 ms
    assert not slow.converges and "scan" in slow.reason and slow.rounds == 1


def test_cli_plan() -> None:
    res = p2v(
        "migrate",
        "--plan",
        "--memory",
        "4G",
        "--dirty-rate",
        "100M",
        "--working-set",
        "64M",
        "--bandwidth",
        "1gbit",
        "--output",
        "json",
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)["plan"]
    assert plan["converges"] and plan["downtime"] <= 0.3
    assert plan["bandwidth"] == 125e6
    assert math.isclose(plan["memory-size"], 4 << 30)
    res = p2v("migrate", "--plan", "--memory", "1G", "--dirty-rate", "200M", "--bandwidth", "100M")
    assert res.returncode == 1 and "does NOT converge" in res.stdout
    assert "auto-converge may help" in res.stdout


@pytest.mark.parametrize("sequential", [False, True])
def test_mean_dirtied_is_the_mean_over_the_pass(sequential: bool) -> None:
    region = Region(256 << 20, 100e6, sequential=sequential)
    for seconds in (1e-3, 0.5, 2.0, 30.0):
        steps = 20000
        numeric = sum(region.dirtied(seconds * (i + 0.5) / steps) for i in range(steps)) / steps
        assert region.mean_dirtied(seconds) == pytest.approx(numeric, rel=1e-4)
    assert region.mean_dirtied(0.0) == 0.0


def test_zero_pages_written_before_round_0_reaches_them_go_as_data() -> None:
    """Round 0 of a guest that writes a quarter-zero memory finds fewer zero pages than
    there were at the start: the writes that landed on zero pages ahead of it (half of
    them, early in a long round 0) make them data."""
    writes = Region(M, 50e6)
    still = planner.plan(M, B, [], zero_fraction=0.25)
    busy = planner.plan(M, B, [writes], zero_fraction=0.25, max_rounds=60)
    t0 = busy.schedule[0].seconds
    expected = 0.25 * writes.mean_dirtied(t0)
    assert busy.schedule[0].bytes == pytest.approx(0.75 * M + expected, rel=1e-9)
    assert 0.4 * 0.25 * 50e6 * t0 < expected < 0.5 * 0.25 * 50e6 * t0  # about D t0 z / 2
    # and t0 is the time those bytes take: the fixed point holds
    wire = busy.schedule[0].bytes * (4096 + PAGE_OVERHEAD) / 4096
    wire += (M - busy.schedule[0].bytes) / 4096 * PAGE_OVERHEAD
    assert t0 == pytest.approx(wire / B, rel=1e-6)
    assert t0 > still.schedule[0].seconds

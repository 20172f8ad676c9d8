"""Migrations of synthetic guests between two processes on loopback: the destination's
memory equals the source's at the pause, page for page, for every workload and switch."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import numpy as np
import pytest

from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guests.sim import SimGuest, parse_spec
from live_migrate.states import MigrationState
from live_migrate.transport import RateLimiter, open_channels
from tests.live_migrate.receiver_process import ReceiverProcess, start_receiver
from tests.live_migrate.stepped import SteppedGuest, SteppedMigration

DONE = [
    MigrationState.SETUP,
    MigrationState.ITERATING,
    MigrationState.STOPPING,
    MigrationState.COMPLETED,
]


@pytest.fixture(scope="module")
def receiver() -> Iterator[ReceiverProcess]:
    """One receiver process for the module's migrations, one after the other."""
    proc = start_receiver("--count", "1000")
    yield proc
    proc.kill()


@pytest.fixture
def migrate_sim(receiver: ReceiverProcess):
    def run(spec: str, channels: int = 1, **options):
        """Migrate a sim guest to the receiver process; return (report, receiver's
        report, source memory hash at the pause, device state hash, states)."""
        with SimGuest(parse_spec(spec)) as guest:
            streams = open_channels(receiver.address, channels)
            migration = Migration(guest, streams, MigrationOptions(**options))
            report = migration.run()
            # after a completed migration the source stays paused: its memory is the
            # memory at the pause
            source_hash = guest.memory_hash() if report.completed else None
            state_hash = guest.device_state_hash()
            states = migration.states
            assert guest.is_paused == (not report.source_running)
        result = receiver.result()
        return report, result, source_hash, state_hash, states

    return run


def check_completed(report, result, source_hash, state_hash, states) -> None:
    assert report.completed, report.error
    assert states == DONE
    assert not report.source_running and report.destination_resumed
    assert result["completed"], result
    assert result["memory_sha256"] == source_hash
    assert result["device_state_sha256"] == state_hash
    # measured, not estimated: the pause on the source and the resume on the destination
    # are two clocks' readings (same host), and the engine's figure lies between them
    # and the RESUMED message's arrival
    measured = result["resumed_at"] - report.paused_at
    assert 0 < measured <= report.downtime + 0.005
    assert report.downtime < report.total_time
    sent = sum(r.pages_sent for r in report.rounds)
    assert sent == report.pages.total == result["pages_received"]
    assert report.rounds[-1].final and not report.rounds[0].final


@pytest.mark.parametrize(
    "workload",
    [
        "workload=idle",
        "workload=uniform,rate=20M",
        "workload=hotset,hot=4M,skew=0.95,rate=40M",
        "workload=sequential,rate=30M",
    ],
)
@pytest.mark.parametrize("dirty", ["log", "scan"])
def test_workload_migrates_exactly(migrate_sim, workload: str, dirty: str) -> None:
    outcome = migrate_sim(f"sim:32M,{workload},dirty={dirty}")
    check_completed(*outcome)
    report = outcome[0]
    assert report.dirty_tracking == dirty
    if "idle" in workload:
        assert report.pages.zero > 0  # the mixed fill has zero pages: sent as flags
        assert report.bytes_sent < 32 << 20


@pytest.mark.parametrize(
    "options",
    [
        {"compress": "zstd"},
        {"compress": "lz4"},
        {"delta": True},
        {"delta": True, "compress": "zstd"},
        {"zero_pages": False},
        {"batch_pages": 37},
    ],
    ids=["zstd", "lz4", "delta", "delta+zstd", "no-zero-pages", "odd-batches"],
)
def test_feature_switches_migrate_exactly(migrate_sim, options: dict) -> None:
    spec = "sim:32M,workload=hotset,hot=2M,skew=0.9,rate=30M,dirty=scan"
    report, *rest = migrate_sim(spec, **options)
    check_completed(report, *rest)
    pages = report.pages
    if options.get("compress"):
        assert pages.compressed > 0 and options["compress"] in report.features
        # the mixed fill's text pages halve: fewer bytes than the memory's data pages
        assert report.bytes_sent < (pages.full + pages.compressed + pages.delta) * 4096
    if options.get("delta"):
        assert pages.delta > 0, "hot pages resent as deltas"
        assert "delta" in report.features
    if options.get("zero_pages") is False:
        assert pages.zero == 0 and report.bytes_sent > 32 << 20


def test_parallel_channels_migrate_exactly(migrate_sim) -> None:
    report, *rest = migrate_sim("sim:64M,workload=uniform,rate=30M", channels=3)
    check_completed(report, *rest)
    assert report.channels == 3
    assert rest[0]["channels"] == 3


def test_bandwidth_cap_is_respected(migrate_sim) -> None:
    cap = 40e6
    report, *rest = migrate_sim("sim:24M,workload=idle,fill=random", max_bandwidth=cap)
    check_completed(report, *rest)
    first = report.rounds[0]
    assert first.bytes_sent > 24e6
    # the bucket may have saved one burst (100 ms of the cap) while the setup ran, a
    # long time on a loaded machine; beyond that, never above the cap
    assert first.bytes_sent <= cap * first.duration + RateLimiter(cap).burst


@pytest.mark.parametrize("capped", [False, True], ids=["final-uncapped", "final-capped"])
def test_the_cap_is_lifted_while_the_guest_is_paused(
    migrate_sim, monkeypatch, capped: bool
) -> None:
    # QEMU sends its final stage unlimited: a paused guest waits for every byte
    drawn = {True: 0, False: 0}  # bytes through the bucket, by whether it was enforced
    take = RateLimiter.take

    def counting(self: RateLimiter, n: int) -> None:
        drawn[self.enabled] += n
        take(self, n)

    monkeypatch.setattr(RateLimiter, "take", counting)
    cap = 10e6
    spec = "sim:16M,workload=hotset,hot=2M,skew=1,rate=20M,fill=random"
    # the 2 MiB hot set fits a 2 s downtime however far below the cap a loaded machine
    # sends, so the migration reaches its final round
    report, *rest = migrate_sim(spec, max_bandwidth=cap, cap_switch_over=capped, max_downtime=2.0)
    check_completed(report, *rest)
    final = report.rounds[-1]
    assert final.bytes_sent > 200e3, "the final round carries hot pages"
    burst = RateLimiter(cap).burst  # what the bucket may have saved before a round
    first = report.rounds[0]
    assert first.bytes_sent <= cap * first.duration + burst
    if capped:
        assert drawn[False] == 0
        assert final.bytes_sent <= cap * final.duration + burst
    else:
        # the final round's pages (and END's replies) went around the bucket
        assert drawn[False] >= final.bytes_sent * 0.9
        assert drawn[True] < report.bytes_sent - final.bytes_sent * 0.9


def test_rounds_go_on_while_they_halve(migrate_sim) -> None:
    spec = "sim:32M,workload=hotset,hot=4M,skew=1,rate=20M,fill=random"
    options = dict(max_bandwidth=40e6, max_downtime=1.0)
    first, *_ = migrate_sim(spec, final_transfer_goal=0, **options)
    check_completed(first, *_)
    assert len(first.rounds) == 2, "QEMU's rule: the first round that fits switches over"
    more, *rest = migrate_sim(spec, **options)
    check_completed(more, *rest)
    assert len(more.rounds) > 2
    assert more.rounds[-1].pages_sent < first.rounds[-1].pages_sent


def test_write_heavy_guest_converges_only_with_auto_converge(migrate_sim) -> None:
    # writes at 3x the link: no round ever gets smaller without a throttle
    spec = "sim:8M,workload=uniform,rate=60M,fill=random"
    options = dict(max_bandwidth=20e6, max_downtime=0.1, max_rounds=6)
    report, result, *_ = migrate_sim(spec, **options)
    assert report.state is MigrationState.FAILED
    assert "no convergence" in report.error and "--auto-converge" in report.error
    assert report.source_running and not result["completed"]
    assert len(report.rounds) == 6 and report.throttle == 0

    # QEMU's cpu-throttle-initial and -increment, raised so the test takes few rounds
    fast = dict(throttle_initial=0.6, throttle_increment=0.2, max_rounds=20)
    report, *rest = migrate_sim(spec, auto_converge=True, **{**options, **fast})
    check_completed(report, *rest)
    assert report.throttle >= 0.6
    throttles = [r.throttle for r in report.rounds]
    assert throttles == sorted(throttles), "the throttle only rises"
    assert throttles[0] == 0 and throttles[-1] >= 0.6


def test_downtime_prediction_includes_the_final_scan(migrate_sim) -> None:
    report, *rest = migrate_sim("sim:64M,workload=idle,dirty=scan")
    check_completed(report, *rest)
    final = report.rounds[-1]
    assert final.scan_time > 0
    # a scan of all memory runs while paused: it is part of the measured downtime
    assert report.downtime >= final.scan_time
    assert report.expected_downtime >= report.rounds[-2].scan_time


def test_source_is_running_when_not_converging_within_time_limit(
    receiver: ReceiverProcess,
) -> None:
    if True:
        with SimGuest(parse_spec("sim:16M,workload=uniform,rate=80M,fill=random")) as guest:
            streams = open_channels(receiver.address, 1)
            options = MigrationOptions(max_bandwidth=10e6, max_time=1.0, max_downtime=0.01)
            t = time.monotonic()
            report = Migration(guest, streams, options).run()
            assert time.monotonic() - t < 6
            assert report.state is MigrationState.FAILED
            assert "limit" in report.error
            assert report.source_running and not guest.is_paused
            before = guest.pages_written
            time.sleep(0.1)
            assert guest.pages_written > before, "the guest runs again"
            assert guest.throttle == 0
        result = receiver.result()
        assert not result["completed"] and "aborted" in result["error"]


def flip(guest: SteppedGuest) -> None:
    """Between rounds: zero some data pages, fill some zero pages, for 4 rounds."""
    if guest.rounds > 4:
        return
    mem = guest.mem
    first = (guest.rounds * 7) % 3  # a different third of the pages each time
    pages = np.arange(first, len(mem), 3)[: len(mem) // 8]
    zero = ~mem[pages].any(axis=1)
    mem[pages[zero]] = guest.rounds  # zero pages get data
    mem[pages[~zero]] = 0  # data pages turn zero
    guest.dirty(pages)


def flip_guest(pages: int, dirty: str) -> SteppedGuest:
    """A guest whose pages turn zero and back between rounds (written just before each
    collection of dirty pages): the kept copy of a page announced as zero must read
    zero, and a zero page written again must go again."""
    rng = np.random.default_rng(5)
    mem = rng.integers(1, 2**63, size=(pages, 512), dtype=np.uint64)
    mem[::3] = 0
    return SteppedGuest(mem, dirty, flip)


@pytest.mark.parametrize(
    "dirty,options",
    [("scan", {}), ("log", {"delta": True}), ("scan", {"delta": True, "batch_pages": 5})],
    ids=["scan", "log+delta", "scan+delta"],
)
def test_pages_turning_zero_and_back_migrate_exactly(
    receiver: ReceiverProcess, dirty: str, options: dict
) -> None:
    guest = flip_guest(600, dirty)
    # no prediction fits a limit this small: rounds go on while the guest writes, and
    # stop when nothing is dirty
    opts = MigrationOptions(max_downtime=1e-9, **options)
    report = SteppedMigration(guest, open_channels(receiver.address, 1), opts).run()
    result = receiver.result()
    assert report.completed, report.error
    assert guest.rounds >= 5 and len(report.rounds) >= 5
    assert result["memory_sha256"] == hashlib.sha256(guest.mem.data).hexdigest()
    assert result["memory_verified"] and report.memory_verified
    # round 0 sends every page; then four writes of 75 pages each, half of them turning
    # zero: they travel as flags
    assert report.pages.total == 600 + 4 * 75
    assert report.pages.zero > 200 + 4 * 30


def test_a_nonzero_page_whose_fingerprint_is_zero_goes_as_data(receiver: ReceiverProcess) -> None:
    """Sent from guest memory, a batch's zero test looks only at the pages whose
    fingerprint is 0: a page of data with fingerprint 0 must still go as data."""
    from live_migrate import pages as pg

    guest = flip_guest(64, "log")
    w = pg.fingerprint_weights(4096)
    guest.mem[7] = 0
    guest.mem[7, 0], guest.mem[7, 1] = w[1], ~w[0] + np.uint64(1)  # w0*w1 - w1*w0 = 0
    assert pg.fingerprints(guest.mem[7:8], w)[0] == 0
    zero_pages = int((~guest.mem.any(axis=1)).sum())
    report = Migration(guest, open_channels(receiver.address, 1), MigrationOptions()).run()
    result = receiver.result()
    assert report.completed, report.error
    assert result["memory_sha256"] == hashlib.sha256(guest.mem.data).hexdigest()
    assert report.pages.zero == result["pages"]["zero"] == zero_pages

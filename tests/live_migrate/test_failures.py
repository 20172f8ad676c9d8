"""Every failure leaves the guest running on exactly one side: before the destination's
ACK that is the source (resumed, unthrottled), and the destination keeps nothing."""

from __future__ import annotations

import os
import threading
import time

import pytest

from live_migrate import wire
from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guests.sim import SHM_DIR, SimGuest, parse_spec
from live_migrate.states import MigrationState
from live_migrate.transport import open_channels
from tests.external import HANG_SECONDS
from tests.live_migrate.frame_proxy import FrameProxy, forward
from tests.live_migrate.receiver_process import start_receiver

FAILED = [MigrationState.SETUP, MigrationState.ITERATING, MigrationState.FAILED]


def targets_left() -> set[str]:
    return {n for n in os.listdir(SHM_DIR or "/tmp") if n.startswith("p2v-sim-target-")}


def assert_runs_here(guest: SimGuest, report) -> None:
    assert report.source_running and not guest.is_paused
    assert guest.throttle == 0
    if guest.config.workload != "idle":
        # the writer runs again: it writes within the bound, however late it is scheduled
        before = guest.pages_written
        deadline = time.monotonic() + HANG_SECONDS
        while guest.pages_written == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guest.pages_written > before, "the source guest writes again"


def run_through_proxy(spec: str, action, **options):
    """Migrate through a FrameProxy; (report, states, source paused?, receiver's report).
    The receiver keeps its target's file on success only: a failure must remove it."""
    before = targets_left()
    receiver = start_receiver("--keep")
    proxy = FrameProxy(receiver.address, action)
    try:
        with SimGuest(parse_spec(spec)) as guest:
            migration = Migration(
                guest, open_channels(proxy.address, 1), MigrationOptions(**options)
            )
            report = migration.run()
            if report.source_running:
                assert_runs_here(guest, report)
            paused = guest.is_paused
        result = receiver.result()
    finally:
        proxy.close()
        receiver.kill()
    if not result["completed"]:
        assert targets_left() == before, "a failed destination keeps nothing"
    return report, migration.states, paused, result


def test_receiver_killed_mid_round_leaves_source_running() -> None:
    before = targets_left()
    receiver = start_receiver()
    try:
        with SimGuest(parse_spec("sim:32M,workload=uniform,rate=10M,fill=random")) as guest:
            migration = Migration(
                guest, open_channels(receiver.address, 2), MigrationOptions(max_bandwidth=10e6)
            )
            threading.Timer(0.6, receiver.proc.kill).start()
            report = migration.run()
            assert report.state is MigrationState.FAILED
            assert migration.states == FAILED
            assert report.error  # the connection's failure, in one line
            assert "\n" not in report.error
            assert_runs_here(guest, report)
    finally:
        receiver.kill()
    assert targets_left() == before, "the killed receiver leaves no memory behind"


def corrupt_data_of_third_batch(ftype, index, header, body):
    if ftype is wire.FrameType.BATCH and index == 2:
        body[-100] ^= 0x40  # a bit of page data: only the memory checksum can tell
    return forward(ftype, index, header, body)


def test_corrupted_page_data_is_caught_by_the_memory_checksum() -> None:
    report, states, paused, result = run_through_proxy(
        "sim:16M,workload=idle,fill=random", corrupt_data_of_third_batch
    )
    assert report.state is MigrationState.FAILED
    assert states == [*FAILED[:2], MigrationState.STOPPING, MigrationState.FAILED]
    assert "checksum" in report.error
    assert report.source_running and not paused
    assert not result["completed"] and result["kept"] is None and result["resumed_at"] is None
    assert not result["memory_verified"] and "checksum" in result["error"]
    assert not report.memory_verified


def corrupt_page_number(ftype, index, header, body):
    if ftype is wire.FrameType.BATCH and index == 1:
        count = int.from_bytes(body[4:8], "big")
        last = wire.BATCH_HEADER_SIZE + 8 * (count - 1)
        body[last + 7] = 0x7F  # the last page number, little-endian: 2^62 and more
    return forward(ftype, index, header, body)


def test_out_of_range_page_is_refused_at_once() -> None:
    report, states, paused, result = run_through_proxy(
        "sim:16M,workload=uniform,rate=5M", corrupt_page_number, max_bandwidth=30e6
    )
    # the destination refuses the batch at once; whether its ABORT reaches the source
    # before the source's last round ends (STOPPING) depends on the machine's load
    assert states in (FAILED, [*FAILED[:2], MigrationState.STOPPING, MigrationState.FAILED])
    assert "beyond the guest" in report.error and "destination aborted" in report.error
    assert report.source_running and not paused
    assert not result["completed"] and "beyond the guest" in result["error"]


def damage_frame_header(ftype, index, header, body):
    if ftype is wire.FrameType.BATCH and index == 1:
        header = header[:8] + bytes([header[8] ^ 1]) + header[9:]  # the sequence number
    return forward(ftype, index, header, body)


def test_damaged_frame_header_is_refused() -> None:
    report, states, paused, result = run_through_proxy("sim:16M,workload=idle", damage_frame_header)
    # the ABORT may overtake the end of round 0 or not: either way it ends in FAILED
    assert states[:2] == FAILED[:2] and states[-1] is MigrationState.FAILED
    assert report.source_running and not paused
    assert "checksum" in result["error"]


def cut_after(frame: wire.FrameType):
    def action(ftype, index, header, body):
        if ftype is frame:
            return None
        return forward(ftype, index, header, body)

    return action


def test_connection_lost_before_the_ack_resumes_the_source() -> None:
    # END never arrives: the destination holds every page but never acknowledges
    report, states, paused, result = run_through_proxy(
        "sim:16M,workload=uniform,rate=5M", cut_after(wire.FrameType.END), reply_timeout=3
    )
    assert states == [*FAILED[:2], MigrationState.STOPPING, MigrationState.FAILED]
    assert report.source_running and not paused
    assert not result["completed"] and result["kept"] is None


def test_connection_lost_after_the_ack_keeps_the_source_paused() -> None:
    # the ACK came back, the GO is lost: the source must not run again (the destination
    # might), and the destination, without GO, does not run either: nothing runs twice
    report, _, paused, result = run_through_proxy(
        "sim:16M,workload=idle", cut_after(wire.FrameType.GO), reply_timeout=3
    )
    assert report.state is MigrationState.FAILED
    assert not report.source_running and paused
    assert "left paused" in report.error
    assert not result["completed"] and result["resumed_at"] is None


def test_destination_refusal_leaves_source_running() -> None:
    receiver = start_receiver("--max-memory", str(8 << 20))
    try:
        with SimGuest(parse_spec("sim:16M,workload=uniform,rate=5M")) as guest:
            migration = Migration(guest, open_channels(receiver.address, 1))
            report = migration.run()
            assert migration.states == [MigrationState.SETUP, MigrationState.FAILED]
            assert "at most 8388608 bytes" in report.error
            assert_runs_here(guest, report)
        result = receiver.result()
        assert not result["completed"]
    finally:
        receiver.kill()


def test_cancel_mid_round_resumes_the_source() -> None:
    receiver = start_receiver()
    try:
        with SimGuest(parse_spec("sim:32M,workload=uniform,rate=5M")) as guest:
            migration = Migration(
                guest, open_channels(receiver.address, 1), MigrationOptions(max_bandwidth=20e6)
            )
            threading.Timer(0.4, migration.cancel).start()
            report = migration.run()
            assert report.state is MigrationState.CANCELLED
            assert migration.states == [*FAILED[:2], MigrationState.CANCELLED]
            assert_runs_here(guest, report)
            with pytest.raises(Exception, match="needs setup"):
                migration.run()
        result = receiver.result()
        assert not result["completed"] and "cancelled" in result["error"]
    finally:
        receiver.kill()

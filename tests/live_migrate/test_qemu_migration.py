"""End to end: a real QEMU guest migrated by the engine to a destination QEMU."""

from __future__ import annotations

import hashlib
import json

import pytest

from live_migrate.engine import MigrationOptions
from live_migrate.guests.qemu import QemuSource
from live_migrate.states import MigrationState

from .guest_image.harness import (
    Hosts,
    SerialLog,
    Workdir,
    build_or_skip,
    check_continuation,
    destination_spec,
    guest_spec,
)
from .guest_image.migration_run import (
    check_cli_migration,
    migrate,
    qemus_by_hand,
    run_cli_migrate,
    start_cli_receiver,
    start_destination,
)


@pytest.fixture(scope="module")
def guest_image():
    return build_or_skip()


@pytest.fixture
def work():
    w = Workdir()
    yield w
    w.cleanup()


@pytest.fixture(scope="module")
def hosts():
    h = Hosts()
    yield h
    h.close()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_migrated_guest_continues_its_counter_with_memory_intact(guest_image, hosts, work):
    spec = guest_spec(guest_image, work, "src", ram_mib=128, mem_mib=32, rate_mb=20)
    source = QemuSource.launch(spec)
    dest = None
    try:
        src_log = SerialLog(spec.serial_log)
        src_log.wait_tick(3, timeout=90, alive=source.process.is_alive)
        dst_spec = destination_spec(spec, work)
        dest = start_destination(hosts, work, dst_spec, snapshot=True)
        report = migrate(source, hosts, dest, MigrationOptions(max_downtime=0.5))
        assert report.state is MigrationState.COMPLETED, report.error
        assert dest.process.wait(30) == 0
        received = dest.report()
        dest.read_qemu_pid()

        # the destination's RAM at resume is the source's RAM at pause (the source
        # QEMU quit after finish(); its RAM file keeps the paused guest's memory)
        assert received["ram_sha256_at_resume"] == file_sha256(spec.ram_path)

        # the counter goes on: no repeat, no gap (one line may be cut by the switch), and
        # the guest re-read all its memory at least twice since resuming: nothing stale
        dst_log = SerialLog(dst_spec.serial_log)
        check_continuation(src_log, dst_log, more=25)
        dst_ticks = dst_log.ticks()
        assert dst_ticks[-1].passes >= dst_ticks[0].passes + 2

        # measured between the pause and RESUMED: inside the migration, however slow the
        # machine (TCG under load takes seconds)
        assert report.downtime is not None and 0 < report.downtime < report.total_time
        assert report.device_state_bytes > 0
        assert report.source_running is False and report.destination_resumed
    finally:
        if dest is not None:
            dest.cleanup()
        source.close()
        if source.process is not None:
            source.process.kill()


def test_cli_migrates_a_qemu_guest_between_hosts(guest_image, hosts, work):
    """`p2v migrate --guest qemu:...` on the source host, `p2v receive --qemu ...` on the
    destination host, each attached to a QEMU started by hand as the docs show."""
    with qemus_by_hand(guest_image, work, ram_mib=128, mem_mib=16, rate_mb=20) as pair:
        recv_report = work.file("receive.json")
        receiver, port = start_cli_receiver(hosts, "--qemu", pair.target, "--json", recv_report)
        try:
            mig_report = work.file("migrate.json")
            res = run_cli_migrate(
                hosts,
                "--guest",
                pair.guest,
                "--to",
                f"{hosts.dst_address}:{port}",
                "--max-downtime",
                "500",
                "--json",
                mig_report,
            )
            assert receiver.wait(30) == 0, receiver.stderr.read()
            with open(recv_report) as f:
                check_cli_migration(pair, res, mig_report, json.load(f))
        finally:
            receiver.kill()
            receiver.wait()


def test_auto_converge_throttles_a_cpu_bound_writer_until_it_fits(guest_image, hosts, work):
    """A guest rewriting 24 MiB as fast as its vCPU goes never fits 0.3 s of a 50 MB/s
    link; auto-converge throttles its vCPU until it does, and the memory still arrives
    whole."""
    spec = guest_spec(guest_image, work, "src", ram_mib=128, mem_mib=24, rate_mb=0, spin=True)
    source = QemuSource.launch(spec)
    dest = None
    try:
        src_log = SerialLog(spec.serial_log)
        src_log.wait_tick(3, timeout=90, alive=source.process.is_alive)
        dst_spec = destination_spec(spec, work)
        dest = start_destination(hosts, work, dst_spec, snapshot=True)
        options = MigrationOptions(
            max_downtime=0.3,
            max_bandwidth=50e6,
            auto_converge=True,
            throttle_initial=0.9,
            throttle_increment=0.09,
            max_time=90,
        )
        report = migrate(source, hosts, dest, options)
        assert report.state is MigrationState.COMPLETED, report.error
        assert report.throttle >= 0.9
        unthrottled = [r for r in report.rounds[1:] if not r.final and r.throttle == 0]
        assert unthrottled and all(r.expected_downtime > 0.3 for r in unthrottled)
        assert dest.process.wait(30) == 0
        assert dest.report()["ram_sha256_at_resume"] == file_sha256(spec.ram_path)
        dest.read_qemu_pid()
        check_continuation(src_log, SerialLog(dst_spec.serial_log), more=10)
    finally:
        if dest is not None:
            dest.cleanup()
        source.close()
        if source.process is not None:
            source.process.kill()

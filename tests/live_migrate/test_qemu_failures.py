"""A destination that dies at any phase leaves the source QEMU guest running.

One source guest serves every scenario of a test (a failed migration leaves it running,
which is the point): the destination QEMU or the receiver is killed for real when the
target is created (setup), in the middle of the first round (iterating), or when the
device state arrives (stopping: the source is paused and its QEMU has already handed
its device state over). After each, the source must count on with its memory intact and
its migration settings put back.
"""

from __future__ import annotations

import json
import time

import pytest

from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guests.qemu import QemuSource
from live_migrate.states import MigrationState
from live_migrate.transport import open_channels

from .guest_image.harness import (
    Hosts,
    SerialLog,
    Workdir,
    build_or_skip,
    destination_spec,
    guest_spec,
    wait_for,
)
from .guest_image.migration_run import (
    Destination,
    migrate,
    start_cli_receiver,
    start_destination,
)

#: slow enough that the first round lasts a few seconds: time to kill something in it
CAPPED = 40e6


@pytest.fixture(scope="module")
def guest_image():
    return build_or_skip()


@pytest.fixture(scope="module")
def hosts():
    h = Hosts()
    yield h
    h.close()


@pytest.fixture(scope="module")
def work():
    w = Workdir()
    yield w
    w.cleanup()


@pytest.fixture(scope="module")
def source(guest_image, work):
    """One guest for the module: each scenario leaves it running (or fails)."""
    spec = guest_spec(guest_image, work, "src", ram_mib=128, mem_mib=32, rate_mb=10)
    src = QemuSource.launch(spec)
    try:
        SerialLog(spec.serial_log).wait_tick(3, timeout=90, alive=src.process.is_alive)
        yield src, spec
    finally:
        src.close()
        src.process.kill()


def _kill_in_round(kill, seen: list):
    """A `during` hook: once round 0 is under way, run `kill(dest)`."""

    def hook(migration):
        wait_for(lambda: migration.state is MigrationState.ITERATING, 30)
        time.sleep(0.5)
        seen.append(migration.state)
        kill()

    return hook


def _check_source_survived(source: QemuSource, log: SerialLog, report, what: str) -> None:
    assert report.state is MigrationState.FAILED, f"{what}: {report.state} {report.error}"
    assert report.source_running, f"{what}: {report.error}"
    assert not source.is_paused
    assert source.qmp.execute("query-status")["status"] == "running", what
    caps = {c["capability"]: c["state"] for c in source.qmp.execute("query-migrate-capabilities")}
    assert caps["x-ignore-shared"] is False, f"{what}: capability left on"
    assert log.keeps_counting(3), f"{what}: the source guest stopped counting"
    assert not log.bad_lines(), f"{what}: {log.bad_lines()}"


def _scenario(source, spec, hosts, work, name, *, fault="", kill=None, cap=None):
    dest: Destination = start_destination(
        hosts, work, destination_spec(spec, work, name), fault=fault, name=name
    )
    seen: list = []
    try:
        hook = None
        if kill is not None:
            hook = _kill_in_round(lambda: kill(dest), seen)
        report = migrate(
            source, hosts, dest, MigrationOptions(max_downtime=0.5, max_bandwidth=cap), during=hook
        )
        if kill is not None:
            assert seen == [MigrationState.ITERATING], f"{name}: killed in {seen}"
        return report
    finally:
        dest.read_qemu_pid(timeout=1)
        dest.cleanup()


def _read_pid_then(action):
    def kill(dest: Destination) -> None:
        dest.read_qemu_pid()
        action(dest)

    return kill


def test_source_keeps_running_when_destination_qemu_dies(source, hosts, work):
    src, spec = source
    log = SerialLog(spec.serial_log)
    cases = [
        ("created", dict(fault="kill-qemu@created")),
        ("iterating", dict(kill=_read_pid_then(Destination.kill_qemu), cap=CAPPED)),
        ("stopping", dict(fault="kill-qemu@load")),
    ]
    for phase, kw in cases:
        report = _scenario(src, spec, hosts, work, f"dst-qemu-{phase}", **kw)
        _check_source_survived(src, log, report, f"destination QEMU killed at {phase}")
        assert "QEMU exited" in (report.error or ""), report.error


def test_source_keeps_running_when_receiver_dies(source, hosts, work):
    src, spec = source
    log = SerialLog(spec.serial_log)
    cases = [
        ("setup", dict(fault="exit@created")),
        ("iterating", dict(kill=Destination.kill_receiver, cap=CAPPED)),
        ("stopping", dict(fault="exit@load")),
    ]
    for phase, kw in cases:
        report = _scenario(src, spec, hosts, work, f"receiver-{phase}", **kw)
        _check_source_survived(src, log, report, f"receiver killed at {phase}")
        if phase == "stopping":
            # the source was paused and its QEMU had handed over the device state
            assert report.downtime is None
            assert any(s == "stopping" for s, _ in report.states)


def test_source_keeps_running_when_the_receiver_has_no_qemu(source, hosts):
    """`p2v receive` started without --qemu builds a sim guest: it must refuse a QEMU
    guest, or the source QEMU would stop for good with its guest in a simulation. The
    HELLO says the device state is QEMU's, so it refuses there: no page is sent and the
    source is never paused."""
    src, spec = source
    log = SerialLog(spec.serial_log)
    receiver, port = start_cli_receiver(hosts, "--output", "json")
    try:
        with hosts.on_source():
            streams = open_channels((hosts.dst_address, port), 1)
        report = Migration(src, streams, MigrationOptions(max_downtime=0.5)).run()
        out, _ = receiver.communicate(timeout=30)
    finally:
        receiver.kill()
        receiver.wait()
    _check_source_survived(src, log, report, "receiver without --qemu")
    assert "p2v receive --qemu" in (report.error or ""), report.error
    assert receiver.returncode == 1 and not json.loads(out)["completed"]
    assert not any(s == "stopping" for s, _ in report.states), report.states
    assert report.bytes_sent < 4096, report.bytes_sent

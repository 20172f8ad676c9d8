"""End to end: a real QEMU guest migrated by the engine to a destination QEMU."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from live_migrate.engine import MigrationOptions
from live_migrate.guests.qemu import QemuSource
from live_migrate.states import MigrationState

from .guest_image.harness import (
    Hosts,
    SerialLog,
    Workdir,
    build_or_skip,
    destination_spec,
    guest_spec,
    start_qemu_by_hand,
)
from .guest_image.migration_run import migrate, start_destination


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
        _check_continuation(src_log, dst_log, more=25)
        dst_ticks = dst_log.ticks()
        assert dst_ticks[-1].passes >= dst_ticks[0].passes + 2

        assert report.downtime is not None and 0 < report.downtime < 2.0
        assert report.device_state_bytes > 0
        assert report.source_running is False and report.destination_resumed
    finally:
        if dest is not None:
            dest.cleanup()
        source.close()
        if source.process is not None:
            source.process.kill()


def _check_continuation(src_log: SerialLog, dst_log: SerialLog, more: int = 15) -> None:
    """The destination's counter starts right after the source's and runs on without a
    gap; the guest's own memory checks stay clean on both sides."""
    last_src = src_log.last_tick()
    dst_log.wait_tick(last_src + more, timeout=60)
    dst_ticks = dst_log.ticks()
    first = dst_ticks[0].tick
    cut = not src_log.text().endswith("\n")
    assert first == last_src + 1 or (cut and first == last_src + 2), (last_src, first)
    assert [t.tick for t in dst_ticks] == list(range(first, first + len(dst_ticks)))
    assert all(t.bad == 0 for t in dst_ticks), dst_log.bad_lines()
    assert not dst_log.bad_lines() and not src_log.bad_lines()


def test_cli_migrates_a_qemu_guest_between_hosts(guest_image, hosts, work):
    """`p2v migrate --guest qemu:...` on the source host, `p2v receive --qemu ...` on the
    destination host, each attached to a QEMU started by hand as the docs show."""
    spec = guest_spec(guest_image, work, "src", ram_mib=128, mem_mib=16, rate_mb=20)
    dst_spec = dataclasses.replace(destination_spec(spec, work), incoming=True)
    src_qemu = start_qemu_by_hand(spec)
    dst_qemu = start_qemu_by_hand(dst_spec)
    receiver = None
    try:
        src_log = SerialLog(spec.serial_log)
        src_log.wait_tick(3, timeout=90)
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        recv_report = work.file("receive.json")
        receiver = subprocess.Popen(
            [
                *hosts.dst_prefix,
                sys.executable,
                "-m",
                "p2v",
                "receive",
                "--listen",
                f"{hosts.dst_address}:0",
                "--qemu",
                f"{dst_spec.qmp_socket},ram={dst_spec.ram_path}",
                "--json",
                recv_report,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = receiver.stderr.readline()
        assert line.startswith("listening on "), line
        port = line.rsplit(":", 1)[1].strip()
        mig_report = work.file("migrate.json")
        res = subprocess.run(
            [
                *hosts.src_prefix,
                sys.executable,
                "-m",
                "p2v",
                "migrate",
                "--guest",
                f"qemu:{spec.qmp_socket},ram={spec.ram_path}",
                "--to",
                f"{hosts.dst_address}:{port}",
                "--max-downtime",
                "500",
                "--no-progress",
                "--json",
                mig_report,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "migrated 128 MiB" in res.stdout
        assert receiver.wait(30) == 0, receiver.stderr.read()
        with open(mig_report) as f:
            report = json.load(f)
        with open(recv_report) as f:
            received = json.load(f)
        assert report["state"] == "completed" and report["dirty_tracking"] == "scan"
        assert received["completed"] and received["device-state-bytes"] > 0
        _check_continuation(src_log, SerialLog(dst_spec.serial_log))
        # the source stays stopped after its device state left, as with QEMU's migrate
        assert src_qemu.poll() is None and dst_qemu.poll() is None
    finally:
        for proc in (receiver, src_qemu, dst_qemu):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


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
        _check_continuation(src_log, SerialLog(dst_spec.serial_log), more=10)
    finally:
        if dest is not None:
            dest.cleanup()
        source.close()
        if source.process is not None:
            source.process.kill()

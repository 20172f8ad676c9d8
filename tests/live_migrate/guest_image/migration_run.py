"""One migration of a QEMU test guest: the engine here, the receiver in a child process
(in the destination's network namespace when there is one); or, as users run it, `p2v
migrate` on the source host and `p2v receive` on the destination host, attached to two
QEMUs started by hand (`qemus_by_hand`, `check_cli_migration`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guests.qemu import QemuSource
from live_migrate.qemu_launcher import QemuSpec
from live_migrate.report import MigrationReport
from live_migrate.transport import open_channels

from .build_guest import GuestImage
from .harness import (
    Hosts,
    SerialLog,
    Workdir,
    check_continuation,
    destination_spec,
    guest_spec,
    start_qemu_by_hand,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@dataclass
class Destination:
    """The receiver child and, once it started one, its QEMU."""

    process: subprocess.Popen
    port: int
    report_path: str
    qemu_pid: int | None = None

    def read_qemu_pid(self, timeout: float = 30.0) -> int | None:
        if self.qemu_pid is None:
            line = _readline(self.process, timeout)
            if line.startswith("qemu "):
                self.qemu_pid = int(line.split()[1])
        return self.qemu_pid

    def report(self) -> dict | None:
        try:
            with open(self.report_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def kill_receiver(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def kill_qemu(self) -> None:
        if self.qemu_pid is not None:
            try:
                os.kill(self.qemu_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.kill_receiver()
        self.kill_qemu()


def _readline(process: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))
    reader.daemon = True
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


def start_destination(
    hosts: Hosts,
    work: Workdir,
    spec: QemuSpec,
    *,
    fault: str = "",
    name: str = "dst",
    snapshot: bool = False,
    attach: bool = False,
) -> Destination:
    spec_path = work.file(f"{name}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(dataclasses.asdict(spec), f)
    report_path = work.file(f"{name}.report.json")
    if os.path.exists(report_path):
        os.unlink(report_path)
    cmd = [
        *hosts.dst_prefix,
        sys.executable,
        "-m",
        "tests.live_migrate.guest_image.receive_child",
        "--listen",
        f"{hosts.dst_address}:0",
        "--spec",
        spec_path,
        "--report",
        report_path,
    ]
    if fault:
        cmd += ["--fault", fault]
    if snapshot:
        cmd.append("--snapshot")
    if attach:
        cmd.append("--attach")
    env = dict(os.environ, PYTHONPATH=REPO)
    with open(work.file(f"{name}.stderr"), "w") as err:
        process = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    line = _readline(process, 30.0)
    if not line.startswith("listening "):
        process.kill()
        with open(work.file(f"{name}.stderr")) as f:
            raise AssertionError(f"receiver did not start: {line!r} {f.read()[-500:]}")
    return Destination(process, int(line.split()[1]), report_path)


def migrate(
    source: QemuSource,
    hosts: Hosts,
    dest: Destination,
    options: MigrationOptions,
    *,
    channels: int = 1,
    during=None,
) -> MigrationReport:
    """Run one migration; `during(migration)` runs in a thread beside it (fault timing)."""
    with hosts.on_source():
        streams = open_channels((hosts.dst_address, dest.port), channels)
    migration = Migration(source, streams, options)
    side = None
    if during is not None:
        side = threading.Thread(target=during, args=(migration,), daemon=True)
        side.start()
    report = migration.run()
    if side is not None:
        side.join(60)
    return report


# --- the same through the CLI, as users run it ----------------------------------------


def start_cli_receiver(hosts: Hosts, *args: str) -> tuple[subprocess.Popen, int]:
    """`p2v receive --listen DST:0 ARGS` on the destination host, and the port it took."""
    process = subprocess.Popen(
        [
            *hosts.dst_prefix,
            sys.executable,
            "-m",
            "p2v",
            "receive",
            "--listen",
            f"{hosts.dst_address}:0",
            *args,
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise AssertionError(f"p2v receive did not start: {line}{process.stderr.read()}")
    return process, int(line.rsplit(":", 1)[1])


def run_cli_migrate(hosts: Hosts, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`p2v migrate ARGS --no-progress` on the source host."""
    return subprocess.run(
        [*hosts.src_prefix, sys.executable, "-m", "p2v", "migrate", *args, "--no-progress"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class ByHand:
    """A source QEMU running the test guest and a destination QEMU waiting with
    `-incoming defer -S`, both started as docs/migration-qemu.md shows."""

    source: QemuSpec
    destination: QemuSpec
    source_qemu: subprocess.Popen
    destination_qemu: subprocess.Popen

    @property
    def guest(self) -> str:
        """What `p2v migrate --guest` takes."""
        return f"qemu:{self.source.qmp_socket},ram={self.source.ram_path}"

    @property
    def target(self) -> str:
        """What `p2v receive --qemu` (and `p2v migrate --remote-qemu`) takes."""
        return f"{self.destination.qmp_socket},ram={self.destination.ram_path}"

    @property
    def source_log(self) -> SerialLog:
        return SerialLog(self.source.serial_log)

    @property
    def destination_log(self) -> SerialLog:
        return SerialLog(self.destination.serial_log)


@contextlib.contextmanager
def qemus_by_hand(image: GuestImage, work: Workdir, **guest: int) -> Iterator[ByHand]:
    """Both QEMUs, the source's guest counting; killed at the end."""
    spec = guest_spec(image, work, "src", **guest)
    dst_spec = dataclasses.replace(destination_spec(spec, work), incoming=True)
    procs = [start_qemu_by_hand(spec)]
    try:
        procs.append(start_qemu_by_hand(dst_spec))
        pair = ByHand(spec, dst_spec, procs[0], procs[1])
        pair.source_log.wait_tick(3, timeout=90)
        yield pair
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def check_cli_migration(
    pair: ByHand, res: subprocess.CompletedProcess, report_path: str, received: dict | None
) -> dict:
    """`p2v migrate` succeeded, the destination guest counts on from the source's last
    tick with its memory checks clean, and the source QEMU is left stopped (as QEMU's own
    migration leaves it); returns the migration's JSON report."""
    assert res.returncode == 0, res.stdout + res.stderr
    size_mib = pair.source.ram_size >> 20
    assert f"migrated {size_mib} MiB" in res.stdout, res.stdout
    with open(report_path) as f:
        report = json.load(f)
    assert report["state"] == "completed" and report["dirty_tracking"] == "scan"
    assert report["source_running"] is False and report["downtime"] > 0
    if received is not None:
        assert received["completed"] and received["device-state-bytes"] > 0
    check_continuation(pair.source_log, pair.destination_log)
    assert pair.source_qemu.poll() is None and pair.destination_qemu.poll() is None
    return report

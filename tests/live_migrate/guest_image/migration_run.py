"""One migration of a QEMU test guest: the engine here, the receiver in a child process
(in the destination's network namespace when there is one)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guests.qemu import QemuSource
from live_migrate.qemu_launcher import QemuSpec
from live_migrate.report import MigrationReport
from live_migrate.transport import open_channels

from .harness import Hosts, Workdir

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

"""The destination host of the QEMU migration tests: a receiver in its own process.

    python -m tests.live_migrate.guest_image.receive_child --listen ADDR:PORT \
        --spec SPEC.json --report REPORT.json [--fault WHAT@PHASE] [--snapshot] [--attach]

It listens (port 0 picks one), prints ``listening PORT``, receives one migration into a
destination QEMU launched from the spec (a `QemuSpec` as JSON), prints ``qemu PID`` when
that QEMU runs, and writes the receiver's report plus, with --snapshot, the SHA-256 of the
guest's RAM as it was just before ``cont`` (compared with the source's RAM at pause).

Faults make the destination fail for real at a chosen moment: ``kill-qemu@created``,
``kill-qemu@load``, ``exit@created``, ``exit@load`` (SIGKILL of the destination QEMU, or
this process dying, when the target is created or when the device state arrives).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys

import numpy as np

from live_migrate.guest import Geometry
from live_migrate.guests.qemu import QemuTarget
from live_migrate.qemu_launcher import QemuProcess, QemuSpec
from live_migrate.receiver import ReceiverOptions, serve
from live_migrate.transport import Listener, parse_address


class ObservedTarget(QemuTarget):
    """A QemuTarget that records its RAM at resume and fails where it is told to."""

    fault: str = ""
    snapshot: np.ndarray | None = None
    resumed = False

    def _inject(self, phase: str) -> None:
        what, _, when = self.fault.partition("@")
        if when != phase:
            return
        if what == "kill-qemu" and self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.process.wait()
        elif what == "exit":
            os._exit(17)

    def load_device_state(self, state: bytes) -> None:
        self._inject("load")
        super().load_device_state(state)

    def resume(self) -> None:
        # a copy (tens of ms) rather than a hash (hundreds) inside the downtime
        if self.snapshot is not None:
            np.copyto(self.snapshot, np.frombuffer(self.memory(), dtype=np.uint8))
        super().resume()
        self.resumed = True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--fault", default="")
    ap.add_argument(
        "--attach",
        action="store_true",
        help="start the destination QEMU before listening and attach to it at the "
        "handshake, as `p2v receive --qemu` does with a QEMU the user started",
    )
    ap.add_argument(
        "--snapshot",
        action="store_true",
        help="copy the RAM at resume and report its hash (adds a memcpy to the downtime)",
    )
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = QemuSpec(**json.load(f))
    targets: list[ObservedTarget] = []

    started: QemuProcess | None = None
    created = False
    if args.attach:
        spec = dataclasses.replace(spec, incoming=True)
        created = not os.path.exists(spec.ram_path)
        with open(spec.ram_path, "ab") as f:
            f.truncate(spec.ram_size)
        started = QemuProcess(spec)

    def factory(geometry: Geometry) -> ObservedTarget:
        ObservedTarget.fault = args.fault
        if started is not None:
            target = ObservedTarget(
                spec.qmp_socket, spec.ram_path, geometry, process=started, owns_ram_file=created
            )
        else:
            target = ObservedTarget.launch(spec, geometry)
        if args.snapshot:
            # allocated (and touched) now, so that the copy at resume is a plain memcpy
            target.snapshot = np.zeros(geometry.memory_size, dtype=np.uint8)
            target.snapshot[::4096] = 1
        targets.append(target)
        assert target.process is not None
        print(f"qemu {target.process.pid}", flush=True)
        target._inject("created")
        return target

    with Listener(parse_address(args.listen)) as listener:
        print(f"listening {listener.address[1]}", flush=True)
        report = serve(listener, factory, ReceiverOptions())
    if started is not None and not targets:
        started.kill()  # no migration came: the QEMU started for it must not linger
    out = dataclasses.asdict(report)
    if targets and targets[0].resumed and targets[0].snapshot is not None:
        # hashed only now: inside resume() it would delay RESUMED, and the downtime
        out["ram_sha256_at_resume"] = hashlib.sha256(targets[0].snapshot).hexdigest()
    out["load_seconds"] = targets[0].load_seconds if targets else None
    with open(args.report + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.report + ".tmp", args.report)
    for target in targets:
        if report.completed:
            target.close()  # the guest runs on here: its QEMU outlives this process
    return 0 if report.completed else 1


if __name__ == "__main__":
    sys.exit(main())

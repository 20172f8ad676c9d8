"""Guest backends, one module each: `sim` (synthetic guest), `qemu` (a real QEMU guest).

`open_source("sim:256M,workload=uniform,rate=50M")` opens a source guest from the
spelling the CLI's `--guest` takes; `target_factory("sim")` gives the receiver's way to
build the destination guest once the handshake told it the geometry.
`open_source("qemu:/run/vm.qmp,ram=/dev/shm/vm.ram")` attaches to a running QEMU whose RAM
is that shared file; `target_factory("qemu:...")` to a destination QEMU started with
`-incoming defer -S` (see docs/migration-qemu.md).
"""

from __future__ import annotations

from live_migrate.errors import GuestError
from live_migrate.guest import Geometry, SourceGuest, TargetFactory, TargetGuest


def open_source(spec: str) -> SourceGuest:
    kind = spec.partition(":")[0]
    if kind == "sim":
        from live_migrate.guests.sim import SimGuest

        return SimGuest.from_spec(spec)
    if kind == "qemu":
        from live_migrate.guests.qemu import open_qemu_source

        return open_qemu_source(spec.partition(":")[2])
    raise GuestError(
        f"unknown guest {spec!r}: expected sim:SIZE[,options] or qemu:QMP_SOCKET,ram=PATH"
    )


def target_factory(
    spec: str = "sim", *, keep: bool = False, prealloc: bool = False
) -> TargetFactory:
    kind = spec.partition(":")[0]
    if kind == "sim":
        from live_migrate.guests.sim import SimTarget

        def make(geometry: Geometry) -> TargetGuest:
            return SimTarget(geometry, keep=keep, prealloc=prealloc)

        return make
    if kind == "qemu":
        from live_migrate.guests.qemu import qemu_target_factory

        return qemu_target_factory(spec.partition(":")[2])
    raise GuestError(f"unknown target {spec!r}: expected sim or qemu:QMP_SOCKET,ram=PATH")

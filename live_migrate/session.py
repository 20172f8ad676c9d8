"""Whole operations for callers such as the CLI: open the guest, connect, migrate, clean
up; or listen, receive, clean up. Each returns the report dataclass."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

from live_migrate import planner
from live_migrate.engine import MigrationOptions, migrate
from live_migrate.guests import open_source, target_factory
from live_migrate.receiver import ReceiveReport, ReceiverOptions, receive, serve
from live_migrate.report import MigrationReport, Progress
from live_migrate.transport import FdStream, Listener, Stream, open_channels


def migrate_to(
    guest_spec: str,
    address: tuple[str, int],
    options: MigrationOptions | None = None,
    *,
    channels: int = 1,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationReport:
    """Migrate the guest `guest_spec` names to the receiver at `address`."""
    guest = open_source(guest_spec)
    try:
        streams = open_channels(address, channels, tls=tls, server_hostname=server_hostname)
        return migrate(guest, streams, options, progress)
    finally:
        close = getattr(guest, "close", None)
        if close is not None:
            close()


def migrate_over(
    guest_spec: str,
    streams: Sequence[Stream],
    options: MigrationOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationReport:
    """Migrate over streams the caller connected (an SSH channel, a socketpair)."""
    guest = open_source(guest_spec)
    try:
        return migrate(guest, streams, options, progress)
    finally:
        close = getattr(guest, "close", None)
        if close is not None:
            close()


def receive_on(
    address: tuple[str, int],
    options: ReceiverOptions | None = None,
    *,
    tls: ssl.SSLContext | None = None,
    target: str = "sim",
    keep: bool = False,
    on_listening: Callable[[tuple[str, int]], None] | None = None,
    once: bool = False,
) -> ReceiveReport:
    """Listen on `address`, receive one migration, return (`once`: whatever the first
    connection brought; else connections refused before their handshake are skipped)."""
    with Listener(address, tls=tls) as listener:
        if on_listening is not None:
            on_listening(listener.address)
        return serve(listener, target_factory(target, keep=keep), options, once=once)


def receive_stdio(
    options: ReceiverOptions | None = None, *, target: str = "sim", keep: bool = False
) -> ReceiveReport:
    """Receive one migration on stdin/stdout (started over SSH: one channel)."""
    return receive(FdStream(0, 1), target_factory(target, keep=keep), options)


def plan_for_guest(
    guest_spec: str, bandwidth: float, seconds: float = 2.0, **model: object
) -> tuple[planner.Plan, planner.Measurement]:
    """Measure a running guest's dirty rate and working set, then run the model."""
    guest = open_source(guest_spec)
    try:
        m = planner.measure(guest, seconds)
        size = guest.geometry.memory_size
    finally:
        close = getattr(guest, "close", None)
        if close is not None:
            close()
    regions = planner.simple_regions(m.dirty_rate, max(m.working_set, guest.geometry.page_size))
    result = planner.plan(
        size,
        bandwidth,
        regions,
        zero_fraction=m.zero_fraction,
        **model,  # type: ignore[arg-type]
    )
    return result, m

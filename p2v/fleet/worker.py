"""`p2v worker`: a Celery worker running the fleet's tasks on this host."""

from __future__ import annotations

import os
import socket

from .app import configure
from .tasks import SETTINGS


def run_worker(
    broker: str,
    *,
    concurrency: int = 2,
    spool: str | None = None,
    lease_seconds: float = 60.0,
    visibility_timeout: float | None = None,
    retry_delays: tuple[float, ...] = (5, 15, 45),
    commit_seconds: float | None = None,
) -> int:
    """Serve tasks until stopped. Threads, not processes: a clone waits on the network and
    its copy threads release the GIL, and a killed worker takes all its copies with it
    (their leases lapse, their tasks return to the queue)."""
    if concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if spool:
        os.makedirs(spool, exist_ok=True)
    if commit_seconds:
        from p2v import clone

        # how much of a copy a killed worker may lose (each commit flushes the image)
        clone.COMMIT_SECONDS = commit_seconds
    SETTINGS.update(spool=spool, lease_seconds=lease_seconds, retry_delays=tuple(retry_delays))
    app = configure(broker, visibility_timeout=visibility_timeout)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--hostname=p2v-{os.getpid()}@{socket.gethostname()}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0

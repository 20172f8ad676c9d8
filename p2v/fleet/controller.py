"""`p2v run PLAN --broker URL`: submit a plan's servers wave by wave and follow them.

A wave is submitted when the one before it has finished (every server done or failed), or
at once from `--wave N` on. Each server is one Celery chain: the clone, then its cut-over
steps in order; a failed step stops that chain only. The controller holds no state of its
own: a controller restarted on the same plan finds the servers' records and submits only
what is not done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from p2v.job import Plan, ServerJob

from .app import configure, redis_client
from .status import DONE, PlanStatus, Store, plan_id, read_status

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class PlanError(Exception):
    """A plan that cannot be submitted (its window closed, no such wave)."""


def steps_of(job: ServerJob) -> list[str]:
    return ["clone", *job.cutover]


def submit_wave(plan: Plan, pid: str, index: int, store: Store) -> int:
    """Send one wave's chains; servers already done are not sent again. The count sent."""
    from celery import chain

    from .tasks import clone_server, cutover_step, encode_server

    not_after = plan.not_after.timestamp() if plan.not_after else None
    sent = 0
    for job in plan.waves[index].servers:
        steps = steps_of(job)
        store.server_init(pid, job.name, index, steps)
        store.retry_failed(pid, job.name)
        if all(store.step_state(pid, job.name, s) == DONE for s in steps):
            continue
        spec = encode_server(job)
        links = [clone_server.si(pid, spec, plan.shared, not_after).set(shadow=f"clone {job.name}")]
        links += [
            cutover_step.si(pid, spec, step, plan.shared).set(shadow=f"{step} {job.name}")
            for step in job.cutover
        ]
        chain(*links).apply_async()
        sent += 1
    return sent


def run_plan(
    plan: Plan,
    broker: str,
    *,
    first_wave: int = 0,
    on_update: Callable[[PlanStatus], None] | None = None,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.time,
) -> PlanStatus:
    """Submit the plan's waves from `first_wave` on, each after the previous finished,
    and follow them to the end; the final status."""
    if not 0 <= first_wave < len(plan.waves):
        raise PlanError(f"--wave {first_wave + 1}: the plan has {len(plan.waves)} waves")
    now = datetime.fromtimestamp(clock(), timezone.utc)
    if plan.not_after and now >= plan.not_after:
        raise PlanError(f"the plan's window closed at {plan.not_after.isoformat()}")
    configure(broker)
    store = Store(redis_client(broker))
    pid = plan_id(plan.path, plan.name)
    waves = [{"name": w.name, "servers": [s.name for s in w.servers]} for w in plan.waves]
    store.register(pid, plan.name, plan.path, waves)
    if plan.not_before and now < plan.not_before:
        wait = (plan.not_before - now).total_seconds()
        log.info("waiting %.0f s for the plan's window (%s)", wait, plan.not_before.isoformat())
        time.sleep(wait)
    status = read_status(store, pid)
    for index in range(first_wave, len(plan.waves)):
        store.set_wave(pid, index)
        sent = submit_wave(plan, pid, index, store)
        log.info("%s: %d servers submitted", plan.waves[index].name, sent)
        while True:
            status = read_status(store, pid)
            if on_update:
                on_update(status)
            if status.waves[index].finished:
                break
            time.sleep(poll)
    return status

"""The Celery application of p2v's fleet: Redis as broker and result backend, tasks
acknowledged late so that a worker's death returns its task to the queue."""

from __future__ import annotations

import os
from typing import Any

try:
    from celery import Celery
    from kombu.transport import redis as kombu_redis
except ImportError as exc:  # an optional part: `p2v run` without --broker needs none of it
    raise ImportError("p2v's fleet needs Celery with Redis: pip install 'p2v[fleet]'") from exc

app = Celery("p2v", include=["p2v.fleet.tasks"])


class _Channel(kombu_redis.Channel):
    """Kombu's Redis channel, made to outlive a broker restart.

    A channel whose connection dropped (Redis restarted) is closed; kombu then tries to
    put its unacknowledged tasks back, or to acknowledge a task that finished after the
    drop, through that closed channel, fails with an AttributeError, and Celery takes it
    for an unrecoverable error: the worker exits. Here both are left undone: the tasks stay
    in Redis's unacked set and the visibility-timeout sweep requeues them, and a requeued
    task whose step is done does not run it again (tasks.py)."""

    do_restore = False

    def basic_ack(self, delivery_tag, multiple=False):
        if self.closed:
            return
        super().basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag, requeue=False):
        if self.closed:
            return
        super().basic_reject(delivery_tag, requeue=requeue)


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport with the channel above."""

    Channel = _Channel


#: seconds an unacknowledged task stays with the worker that took it before Redis hands it
#: to another: a dead worker's clone is requeued after this. Celery's own default (1 h)
#: needs to exceed the longest task, or a live task is delivered twice: the output's lease
#: makes a second delivery wait anyway (INTEROP.md, Fleets)
DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def configure(broker: str, *, visibility_timeout: float | None = None) -> Celery:
    """The application pointed at `broker` (redis://HOST:PORT/N)."""
    if not broker.startswith(("redis://", "rediss://")):
        raise ValueError(f"broker {broker!r}: expected redis://HOST:PORT/N")
    timeout = visibility_timeout or float(
        os.environ.get("P2V_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)
    )
    transport: dict[str, Any] = {
        "visibility_timeout": timeout,
        # look for lapsed tasks every few seconds, not every 100 s (kombu's default sweep)
        "unacked_restore_interval": min(10.0, max(1.0, timeout / 10)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        broker_url=broker,
        broker_transport=f"{__name__}:Transport",
        result_backend=broker,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        # a Redis restart must not lose a publish, a result or the worker's connection
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 60,
            "interval_start": 0.5,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        result_expires=7 * 86400,
        # a copy under way goes on across a broker restart (it is leased and journaled):
        # cancelling it would throw its progress away
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower sees the tasks
        task_send_sent_event=True,
    )
    return app


def redis_client(broker: str, *, patient: bool = True) -> Any:
    """A Redis client on the broker's database; a patient one rides out a restart
    (retries with backoff for about a minute), an impatient one fails at once."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        broker,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.2), 40 if patient else 0),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=30,
        socket_connect_timeout=5,
    )

"""One writer per output: a Redis lease with an expiry, renewed while the copy runs.

A worker that dies stops renewing and its lease lapses after `ttl` seconds; a worker that
stalls past its expiry finds the lease gone at its next renewal and stops writing (the
copy's progress callback raises LeaseLost). Every grant and release is appended to the
lease's log with the holder's writes (logged after each check that the lease is still
held), so a test or an operator can check that no output had two writers at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)

# Compare-and-act in one round trip: only the holder may renew or release. A lease that
# lapsed while nobody else took it (Redis restarted, or was away longer than the ttl) is
# taken back: nobody else can have written, since writing needs the lease.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LeaseLost(Exception):
    """The lease lapsed or another holder took it: stop writing."""


class Lease:
    def __init__(self, redis: Any, key: str, *, ttl: float = 60.0, owner: str | None = None):
        self.redis = redis
        self.key = key
        self.ttl = ttl
        self.owner = owner or uuid.uuid4().hex
        self.lost = False
        self._last_write = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def log_key(self) -> str:
        return self.key + ":log"

    def _log(self, event: str) -> None:
        entry = {"owner": self.owner, "event": event, "at": time.time()}
        self.redis.rpush(self.log_key, json.dumps(entry))

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; start renewing it."""
        if not self.redis.set(self.key, self.owner, nx=True, px=int(self.ttl * 1000)):
            return False
        self._log("acquire")
        self._thread = threading.Thread(target=self._renew_loop, name="p2v-lease", daemon=True)
        self._thread.start()
        return True

    def holder(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def renew(self) -> bool:
        answer = self.redis.eval(_RENEW, 1, self.key, self.owner, int(self.ttl * 1000))
        if answer == 2:
            self._log("reacquire")
        if not answer:
            self.lost = True
        return bool(answer)

    def _renew_loop(self) -> None:
        # renew three times per ttl: one missed renewal (a slow Redis, a restart) is not
        # yet a lost lease
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    log.error("lease %s lost: another worker may write this output", self.key)
                    self._log("lost")
                    return
            except Exception as exc:  # Redis away for a moment: try again next period
                log.warning("lease %s: renewal failed: %s", self.key, exc)

    def check(self) -> None:
        """Raise LeaseLost when this holder may no longer write; otherwise log a write
        (at most once a second) so that the log shows who wrote when."""
        if self.lost:
            raise LeaseLost(f"lease {self.key} lost: another worker took over this output")
        now = time.monotonic()
        if now - self._last_write >= 1.0:
            self._last_write = now
            self._log("write")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and self.redis.eval(_RELEASE, 1, self.key, self.owner):
            self._log("release")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def history(redis: Any, key: str) -> list[dict[str, Any]]:
    """The lease's log: grants, releases, losses and writes, in order."""
    return [json.loads(x) for x in redis.lrange(key + ":log", 0, -1)]


def foreign_writes(redis: Any, key: str) -> list[dict[str, Any]]:
    """Writes logged by anyone but the latest grantee at that point of the log: empty
    when no output was written by two workers at once."""
    current = None
    foreign = []
    for entry in history(redis, key):
        if entry["event"] in ("acquire", "reacquire"):
            current = entry["owner"]
        elif entry["event"] == "write" and entry["owner"] != current:
            foreign.append(entry)
    return foreign

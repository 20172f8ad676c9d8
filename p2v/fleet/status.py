"""What each server of a plan is doing, kept in Redis by the tasks and read by `p2v status`
and the status page.

    p2v:plans                      set of plan ids
    p2v:plan:ID                    hash: name, path, waves (JSON), wave, submitted
    p2v:plan:ID:server:NAME        hash: wave, step, steps (JSON step -> state), bytes_done,
                                   bytes_total, started, updated, error, worker, output

A server's state follows from its steps: failed when one failed, done when all are done,
running when one runs, else waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


class StatusError(Exception):
    """No such plan, or the broker cannot be reached."""


def plan_id(path: str, name: str) -> str:
    """A plan's id: its name and a digest of its file's absolute path (two plans with the
    same name in different directories stay apart)."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def _key(pid: str, server: str | None = None) -> str:
    return f"p2v:plan:{pid}" + (f":server:{server}" if server else "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    """The status of plans in one Redis database."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def register(self, pid: str, name: str, path: str, waves: list[dict[str, Any]]) -> None:
        self.redis.sadd("p2v:plans", pid)
        self.redis.hset(
            _key(pid),
            mapping={
                "name": name,
                "path": path,
                "waves": json.dumps(waves),
                "wave": 0,
                "submitted": time.time(),
            },
        )

    def set_wave(self, pid: str, wave: int) -> None:
        self.redis.hset(_key(pid), "wave", wave)

    def server_init(self, pid: str, server: str, wave: int, steps: list[str]) -> None:
        """A server's record before its first task runs; an existing record is kept (a
        resubmitted plan resumes where it was)."""
        key = _key(pid, server)
        if self.redis.exists(key):
            return
        self.redis.hset(
            key,
            mapping={
                "wave": wave,
                "steps": json.dumps(dict.fromkeys(steps, PENDING)),
                "step": steps[0],
                "bytes_done": 0,
                "bytes_total": 0,
                "error": "",
            },
        )

    def update(self, pid: str, server: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        self.redis.hset(_key(pid, server), mapping={k: _encode(v) for k, v in fields.items()})

    def step(self, pid: str, server: str, step: str, state: str, error: str = "") -> None:
        """Record a step's state (and the server's current step and last error)."""
        key = _key(pid, server)
        steps = json.loads(_text(self.redis.hget(key, "steps") or "{}"))
        steps[step] = state
        fields: dict[str, Any] = {"steps": json.dumps(steps), "step": step}
        if state == RUNNING:
            fields["error"] = ""
        if error:
            fields["error"] = error
        self.update(pid, server, **fields)

    def retry_failed(self, pid: str, server: str) -> None:
        """Failed steps back to pending: a plan run again tries them again."""
        key = _key(pid, server)
        steps = json.loads(_text(self.redis.hget(key, "steps") or "{}"))
        if FAILED in steps.values():
            steps = {k: PENDING if v == FAILED else v for k, v in steps.items()}
            self.redis.hset(key, mapping={"steps": json.dumps(steps), "error": ""})

    def step_state(self, pid: str, server: str, step: str) -> str:
        steps = json.loads(_text(self.redis.hget(_key(pid, server), "steps") or "{}"))
        return steps.get(step, PENDING)

    def plan(self, pid: str) -> dict[str, str]:
        raw = self.redis.hgetall(_key(pid))
        return {_text(k): _text(v) for k, v in raw.items()}

    def server(self, pid: str, server: str) -> dict[str, str]:
        raw = self.redis.hgetall(_key(pid, server))
        return {_text(k): _text(v) for k, v in raw.items()}

    def plans(self) -> list[str]:
        return sorted(_text(p) for p in self.redis.smembers("p2v:plans"))


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return value


@dataclass
class ServerStatus:
    name: str
    wave: int
    state: str
    step: str
    steps: dict[str, str]
    bytes_done: int = 0
    bytes_total: int = 0
    throughput: float | None = None  # bytes/s of the running copy
    eta_seconds: float | None = None
    error: str = ""
    worker: str = ""
    output: str = ""


@dataclass
class WaveStatus:
    index: int
    name: str
    servers: int
    done: int = 0
    failed: int = 0
    running: int = 0

    @property
    def finished(self) -> bool:
        return self.done + self.failed == self.servers


@dataclass
class PlanStatus:
    plan: str
    name: str
    path: str
    wave: int
    waves: list[WaveStatus] = field(default_factory=list)
    servers: list[ServerStatus] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(w.finished for w in self.waves)


def server_state(steps: dict[str, str]) -> str:
    states = set(steps.values())
    if FAILED in states:
        return FAILED
    if states == {DONE}:
        return DONE
    if RUNNING in states or DONE in states:
        return RUNNING
    return PENDING


def read_status(store: Store, pid: str) -> PlanStatus:
    """The plan's status as `p2v status` prints it."""
    meta = store.plan(pid)
    if not meta:
        raise StatusError(f"no plan {pid} on this broker (was it submitted with p2v run --broker?)")
    waves_meta = json.loads(meta.get("waves") or "[]")
    status = PlanStatus(
        plan=pid,
        name=meta.get("name", ""),
        path=meta.get("path", ""),
        wave=int(meta.get("wave") or 0),
    )
    for i, wave in enumerate(waves_meta):
        ws = WaveStatus(index=i, name=wave["name"], servers=len(wave["servers"]))
        for name in wave["servers"]:
            s = _server_status(store, pid, name, i)
            status.servers.append(s)
            ws.done += s.state == DONE
            ws.failed += s.state == FAILED
            ws.running += s.state == RUNNING
        status.waves.append(ws)
    return status


def _server_status(store: Store, pid: str, name: str, wave: int) -> ServerStatus:
    raw = store.server(pid, name)
    steps = json.loads(raw.get("steps") or "{}")
    done, total = int(raw.get("bytes_done") or 0), int(raw.get("bytes_total") or 0)
    s = ServerStatus(
        name=name,
        wave=wave,
        state=server_state(steps) if steps else PENDING,
        step=raw.get("step", ""),
        steps=steps,
        bytes_done=done,
        bytes_total=total,
        error=raw.get("error", ""),
        worker=raw.get("worker", ""),
        output=raw.get("output", ""),
    )
    started = float(raw.get("copy_started") or 0)
    copied = done - int(raw.get("copy_from") or 0)
    if s.state == RUNNING and started and copied > 0:
        elapsed = float(raw.get("updated") or started) - started
        if elapsed > 0:
            s.throughput = copied / elapsed
            s.eta_seconds = max(total - done, 0) / s.throughput
    return s


def plan_status(plan: Any, broker: str) -> PlanStatus:
    """`p2v status PLAN.yaml`: the status of a plan file on a broker; a one-line
    StatusError when the broker cannot be reached or never saw the plan."""
    import redis

    from .app import redis_client

    client = redis_client(broker, patient=False)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StatusError(f"broker {broker} unreachable: {exc}") from exc
    return read_status(Store(client), plan_id(plan.path, plan.name))

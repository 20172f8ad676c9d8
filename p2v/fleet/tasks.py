"""The fleet's tasks: a server's clone, then its cut-over steps, each a Celery task with its
own state in the status store. Names read as what they do (`p2v.clone`, `p2v.cutover`)
and each message carries the server's name, so Flower shows them as such.

A task's arguments carry no secret: a server's password travels as the name of an
environment variable (password_env) that each worker must have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import socket
import subprocess
import time
from typing import Any

from p2v.clone import STATE_FILE, CloneOptions, CloneResult, SyncOptions, clone, sync
from p2v.job import ServerJob
from p2v.ssh import ConnectError, ConnectOptions, connect

from .app import app
from .lease import Lease
from .status import DONE, FAILED, RUNNING, Store

log = logging.getLogger(__name__)

#: set by `p2v worker`: where worker-local outputs go, how long a lease lives, the waits
#: between attempts to reach an unreachable source
SETTINGS: dict[str, Any] = {"spool": None, "lease_seconds": 60.0, "retry_delays": (5, 15, 45)}
#: status updates while copying, at most this often
PROGRESS_SECONDS = 1.0


class StepFailed(Exception):
    """A step that cannot be done; its one-line reason is in the status."""


def encode_server(job: ServerJob) -> dict[str, Any]:
    """A server's task argument (JSON): its connection and clone options, no secret."""
    return dataclasses.asdict(job)


def decode_server(spec: dict[str, Any]) -> ServerJob:
    spec = dict(spec)
    spec["connect"] = ConnectOptions(**spec["connect"])
    spec["clone"] = CloneOptions(**spec["clone"])
    return ServerJob(**spec)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _store() -> Store:
    from .app import redis_client

    return Store(redis_client(app.conf.broker_url))


def _outdir(pid: str, job: ServerJob, shared: bool) -> str:
    if shared:
        return job.outdir
    spool = SETTINGS["spool"]
    if not spool:
        raise StepFailed(
            "the plan's output is worker-local (shared: false): start the worker with --spool DIR"
        )
    if job.name in (".", "..") or "/" in job.name or "\0" in job.name:
        raise StepFailed(f"server name {job.name!r} cannot name a directory in the spool")
    return os.path.join(spool, pid, job.name)


def _fail(store: Store, pid: str, name: str, step: str, reason: str) -> StepFailed:
    reason = " ".join(reason.split())
    log.error("%s: %s failed: %s", name, step, reason)
    store.step(pid, name, step, FAILED, reason)
    return StepFailed(f"{name}: {step}: {reason}")


def _check_password(job: ServerJob) -> None:
    var = job.connect.password_env
    if var and var not in os.environ:
        raise StepFailed(
            f"worker {socket.gethostname()} has no {var} in its environment (password_env)"
        )


#: every step's task: acknowledged late and returned to the queue when its worker dies;
#: max_retries=None: a task that meets another's lease waits for as long as that one runs;
#: StepFailed is an expected failure, logged in one line rather than as a traceback
STEP_TASK = dict(
    bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None, throws=(StepFailed,)
)


@app.task(name="p2v.clone", **STEP_TASK)
def clone_server(
    self, pid: str, server: dict[str, Any], shared: bool = True, not_after: float | None = None
) -> dict[str, Any]:
    """Clone one server into its output, resuming a partial one, under the output's lease."""
    return _run_step(self, pid, server, "clone", shared, not_after)


@app.task(name="p2v.cutover", **STEP_TASK)
def cutover_step(
    self, pid: str, server: dict[str, Any], step: str, shared: bool = True
) -> dict[str, Any]:
    """One cut-over step of one server: sync, shutdown, convert or start."""
    return _run_step(self, pid, server, step, shared, None)


def _run_step(
    task, pid: str, server: dict[str, Any], step: str, shared: bool, not_after: float | None
) -> dict[str, Any]:
    """A step under the output's lease, done at most once: a task delivered twice (Redis
    hands a task to another worker once its visibility timeout passes) finds the step done,
    or the lease held and comes back later."""
    job = decode_server(server)
    store = _store()
    answer = {"server": job.name, "step": step, "state": DONE}
    if _settled(store, pid, job.name, step):
        return {**answer, "again": True}
    try:
        if not_after is not None and time.time() > not_after:
            raise StepFailed("the plan's window closed before it started")
        _check_password(job)
        outdir = _outdir(pid, job, shared)
    except StepFailed as exc:
        raise _fail(store, pid, job.name, step, str(exc)) from exc
    lease = Lease(
        store.redis,
        f"p2v:lease:{pid}:{job.name}",
        ttl=SETTINGS["lease_seconds"],
        owner=f"{_worker_name()}:{task.request.id}",
    )
    if not lease.acquire():
        # another worker writes this output (a task delivered twice, or a worker that
        # stalled): come back once its lease may have lapsed
        log.info("%s: output leased by %s; retrying later", job.name, lease.holder())
        raise task.retry(countdown=max(1.0, lease.ttl / 2), max_retries=None)
    try:
        if _settled(store, pid, job.name, step):  # settled while we waited
            return {**answer, "again": True}
        store.update(pid, job.name, worker=_worker_name(), output=outdir)
        store.step(pid, job.name, step, RUNNING)
        try:
            fields = STEPS[step](store, pid, job, outdir, lease) or {}
        except StepFailed as exc:
            raise _fail(store, pid, job.name, step, str(exc)) from exc
        except Exception as exc:
            raise _fail(store, pid, job.name, step, str(exc) or type(exc).__name__) from exc
        store.update(pid, job.name, **fields)
        # recorded before the lease goes: whoever takes it next finds the step done
        store.step(pid, job.name, step, DONE)
    finally:
        lease.release()
    return {**answer, "output": outdir}


def _settled(store: Store, pid: str, name: str, step: str) -> bool:
    """True when the step is done; a StepFailed when it failed (a second delivery of a
    failed step stops its chain too, without running it again)."""
    state = store.step_state(pid, name, step)
    if state == FAILED:
        raise StepFailed(f"{name}: {step} failed: {store.server(pid, name).get('error', '')}")
    return state == DONE


def _clone(store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease) -> dict:
    result = _clone_with_retries(store, pid, job, outdir, lease)
    size = sum(d.size for d in result.disks)
    fields: dict[str, Any] = {"bytes_done": size, "bytes_total": size}
    fields["resumed_from"] = sum(d.resumed_from for d in result.disks)
    if result.definition:
        fields["definition"] = result.definition
    return fields


def _clone_with_retries(
    store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease
) -> CloneResult:
    delays = list(SETTINGS["retry_delays"])
    attempt = 0
    while True:
        try:
            return clone(
                job.connect,
                outdir,
                job.clone,
                progress_factory=_progress(store, pid, job.name, lease),
            )
        except ConnectError as exc:
            if attempt >= len(delays):
                raise StepFailed(f"unreachable after {attempt + 1} attempts: {exc}") from exc
            delay = delays[attempt]
            attempt += 1
            store.update(
                pid, job.name, error=f"unreachable, attempt {attempt + 1} in {delay}s: {exc}"
            )
            time.sleep(delay)


def _progress(store: Store, pid: str, name: str, lease: Lease):
    """A clone progress factory that checks the lease as each chunk completes and records
    bytes done in the status (completed disks plus the current one)."""
    totals = {"base": 0, "started": 0.0, "last": 0.0}

    @contextlib.contextmanager
    def factory(label: str, total: int):
        def update(done: int, total_: int) -> None:
            lease.check()
            now = time.time()
            if not totals["started"]:
                totals["started"] = now
                store.update(pid, name, copy_started=now, copy_from=totals["base"] + done)
            if now - totals["last"] >= PROGRESS_SECONDS:
                totals["last"] = now
                store.update(
                    pid, name, bytes_done=totals["base"] + done, bytes_total=totals["base"] + total_
                )

        yield update
        totals["base"] += total

    return factory


def _sync(store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease) -> None:
    opts = SyncOptions(
        compress=job.clone.compress, python=job.clone.python, max_bandwidth=job.clone.max_bandwidth
    )
    sync(job.connect, outdir, opts, progress_factory=_progress(store, pid, job.name, lease))


def _shutdown(store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease) -> None:
    session = connect(job.connect)
    try:
        # the connection may drop as the server goes down: that is the step succeeding
        with contextlib.suppress(ConnectError, EOFError, OSError):
            session.run(job.shutdown_command, check=True, timeout=120)
    finally:
        with contextlib.suppress(Exception):
            session.close()


def _convert(store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease) -> None:
    """The guest converted for its target through drivers.guest (libguestfs), the images
    in the clone's disk order."""
    try:
        from drivers.guest import convert_images
    except ImportError as exc:
        raise StepFailed(f"guest conversion unavailable ({exc})") from exc
    try:
        with open(os.path.join(outdir, STATE_FILE)) as f:
            disks = json.load(f)["disks"]
        images = [os.path.join(outdir, d["image"]) for d in disks]
        fmts = [d["format"] for d in disks]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepFailed(f"{outdir}: no finished clone to convert ({exc})") from exc
    if not job.clone.target:  # the plan checks it; a hand-made task might not
        raise StepFailed("guest conversion needs the server's target platform")
    convert_images(images, job.clone.target, fmts=fmts, report_dir=outdir)


def _start(store: Store, pid: str, job: ServerJob, outdir: str, lease: Lease) -> None:
    definition = store.server(pid, job.name).get("definition")
    if not definition or not definition.endswith(".xml"):
        raise StepFailed("no libvirt definition was written (the server's target must be kvm)")
    name = _domain_name(definition)
    # one virsh session: define, then start (libvirt's test:// driver keeps state per
    # connection)
    script = f"define {shlex.quote(definition)}; start {shlex.quote(name)}"
    res = subprocess.run(
        ["virsh", "-q", "-c", job.libvirt_uri or "", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode:
        raise StepFailed(f"virsh: {res.stderr.strip() or res.stdout.strip()}")


def _domain_name(path: str) -> str:
    from defusedxml import ElementTree

    name = ElementTree.parse(path).getroot().findtext("name")
    if not name:
        raise StepFailed(f"{path}: no domain name")
    return name


STEPS = {
    "clone": _clone,
    "sync": _sync,
    "shutdown": _shutdown,
    "convert": _convert,
    "start": _start,
}

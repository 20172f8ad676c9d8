"""Job files: several servers and their disks in one YAML file, cloned (or synced) with
a concurrency limit. `samples/job.yaml` is a commented example.

    concurrency: 2
    defaults: {user: root, identity: ~/.ssh/p2v, format: qcow2, skip_unused: true}
    servers:
      - {name: web1, host: web1.example.com, disks: [/dev/sda], outdir: clones/web1}

Relative paths are relative to the job file. A password is never written in a job file:
`password_env` names the environment variable that holds it.

A fleet plan is a job file that grows waves (ordered groups of servers), a shared output
location, bandwidth caps, a window and cut-over steps (docs/fleet.md):

    output: /mnt/clones                 # every worker sees it (NFS, CephFS); or shared: false
    window: {not_before: 2026-12-08T22:00:00Z, not_after: 2026-12-09T06:00:00Z}
    defaults: {user: root, max_bandwidth: 40M, cutover: [sync, shutdown, convert]}
    waves:
      - name: web
        max_bandwidth: 200M             # shared equally by the wave's servers
        servers: [{host: web1}, {host: web2, target: kvm}]
      - servers: [{host: db1}]

A plain job file is a plan of one wave. Errors name the key and its line.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml

from .bandwidth import parse_rate
from .clone import CloneOptions, CloneResult, SyncOptions, SyncResult, clone, sync
from .ssh import ConnectOptions, parse_target

log = logging.getLogger(__name__)

SERVER_KEYS = {
    "name",
    "host",
    "user",
    "port",
    "identity",
    "known_hosts",
    "accept_new_host_key",
    "sudo",
    "password_env",
    "disks",
    "outdir",
    "format",
    "options",
    "skip_unused",
    "compress",
    "target",
    "verify",
    "snapshot",
    "python",
    "max_bandwidth",
    "cutover",
    "libvirt_uri",
    "shutdown_command",
    "used_bytes",
    "link",
}
PLAN_KEYS = {
    "concurrency",
    "defaults",
    "servers",
    "waves",
    "name",
    "output",
    "shared",
    "window",
    "broker",
}
WAVE_KEYS = {"name", "servers", "max_bandwidth"}
#: cut-over steps, in the order they run when named
CUTOVER_STEPS = ("sync", "shutdown", "convert", "start")
MAX_CONCURRENCY = 64


class JobError(ValueError):
    """A job file that cannot be run as written; `key` names the offending key (its line
    is added where the file is read)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Mapping(dict):
    """A YAML mapping that remembers the line of each of its keys."""

    line: int = 0
    lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        mapping = _Mapping(super().construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        mapping.lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            mapping.lines[key] = key_node.start_mark.line + 1
        return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping
)


def _line_of(key: str | None, *mappings: Any) -> int | None:
    """The line of `key` in the first mapping that holds it, else of that mapping."""
    for m in mappings:
        if isinstance(m, _Mapping) and key is not None and key in m.lines:
            return m.lines[key]
    for m in mappings:
        if isinstance(m, _Mapping):
            return m.line
    return None


def _located(path: str, exc: JobError, *mappings: Any) -> JobError:
    line = _line_of(exc.key, *mappings)
    where = f"{path}: line {line}" if line else path
    key = f" (key {exc.key})" if exc.key else ""
    return JobError(f"{where}{key}: {exc}", exc.key)


@dataclass
class ServerJob:
    name: str
    connect: ConnectOptions
    outdir: str
    clone: CloneOptions
    wave: int = 0
    cutover: list[str] = field(default_factory=list)
    libvirt_uri: str | None = None
    shutdown_command: str = "systemctl poweroff || shutdown -h now"
    used_bytes: int | None = None  # for --estimate: what the copy will carry
    link: float | None = None  # for --estimate: the source's link, bytes/s


@dataclass
class Wave:
    name: str
    servers: list[ServerJob]
    max_bandwidth: float | None = None


@dataclass
class Plan:
    """A checked plan: what `p2v run` submits (or runs here) and `p2v status` reports."""

    path: str
    name: str
    waves: list[Wave]
    concurrency: int = 2
    output: str = ""
    shared: bool = True  # every worker sees `output`: a requeued clone resumes there
    not_before: datetime | None = None
    not_after: datetime | None = None
    broker: str | None = None

    @property
    def servers(self) -> list[ServerJob]:
        return [s for w in self.waves for s in w.servers]


@dataclass
class ServerOutcome:
    name: str
    ok: bool
    error: str | None = None
    result: CloneResult | SyncResult | None = None
    seconds: float = 0.0


@dataclass
class JobResult:
    job: str
    action: str
    concurrency: int
    servers: list[ServerOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.servers)


def _as_list(value: Any, key: str, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise JobError(f"server {name}: {key} must be a string or a list of strings", key)


def _bool(value: Any, key: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise JobError(f"server {name}: {key} must be true or false, not {value!r}", key)
    return value


def _server(raw: Any, defaults: dict[str, Any], base: str, index: int) -> ServerJob:
    if not isinstance(raw, dict):
        raise JobError(f"servers[{index}]: expected a mapping")
    spec = {**defaults, **raw}
    name = str(spec.get("name") or spec.get("host") or f"server{index + 1}")
    if "password" in spec:
        raise JobError(f"server {name}: no password in a job file; use password_env", "password")
    unknown = set(spec) - SERVER_KEYS
    if unknown:
        raise JobError(
            f"server {name}: unknown keys {', '.join(sorted(unknown))}", sorted(unknown)[0]
        )
    if not spec.get("host"):
        raise JobError(f"server {name}: host is required", "host")
    user, host = parse_target(str(spec["host"]), default_user=spec.get("user"))
    if spec.get("user") and "@" not in str(spec["host"]):
        user = str(spec["user"])

    def path(p: str) -> str:
        return os.path.join(base, os.path.expanduser(p))

    port = spec.get("port", 22)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise JobError(f"server {name}: port must be 1..65535", "port")
    connect = ConnectOptions(
        host=host,
        user=user,
        port=port,
        key_files=[path(k) for k in _as_list(spec.get("identity"), "identity", name)],
        known_hosts=path(spec["known_hosts"]) if spec.get("known_hosts") else None,
        accept_new_host_key=_bool(
            spec.get("accept_new_host_key", False), "accept_new_host_key", name
        ),
        sudo=_bool(spec.get("sudo", False), "sudo", name),
        password_env=spec.get("password_env"),
    )
    compress = spec.get("compress", "zlib")
    if compress not in ("zlib", "none"):
        raise JobError(f"server {name}: compress must be zlib or none", "compress")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise JobError(f"server {name}: options must be a mapping", "options")
    opts = CloneOptions(
        out_format=str(spec.get("format", "qcow2")),
        options={str(k): str(v) for k, v in options.items()},
        disks=_as_list(spec.get("disks"), "disks", name) or None,
        skip_unused=_bool(spec.get("skip_unused", False), "skip_unused", name),
        compress=compress == "zlib",
        target=spec.get("target"),
        verify=_bool(spec.get("verify", True), "verify", name),
        snapshot=_bool(spec.get("snapshot", False), "snapshot", name),
        python=str(spec.get("python", "python3")),
        max_bandwidth=_rate(spec.get("max_bandwidth"), "max_bandwidth", f"server {name}"),
    )
    outdir = path(str(spec.get("outdir") or name))
    cutover = _as_list(spec.get("cutover"), "cutover", name)
    for step in cutover:
        if step not in CUTOVER_STEPS:
            raise JobError(
                f"server {name}: cut-over step {step!r} is not one of {', '.join(CUTOVER_STEPS)}",
                "cutover",
            )
    # the steps run in their fixed order, whatever order the file names them in
    cutover = [step for step in CUTOVER_STEPS if step in cutover]
    uri = spec.get("libvirt_uri")
    if "start" in cutover and not uri:
        raise JobError(f"server {name}: cut-over step start needs libvirt_uri", "cutover")
    if ("convert" in cutover or "start" in cutover) and not opts.target:
        raise JobError(f"server {name}: cut-over steps convert/start need a target", "cutover")
    return ServerJob(
        name=name,
        connect=connect,
        outdir=outdir,
        clone=opts,
        cutover=cutover,
        libvirt_uri=str(uri) if uri else None,
        shutdown_command=str(spec.get("shutdown_command") or ServerJob.shutdown_command),
        used_bytes=_size(spec.get("used_bytes"), "used_bytes", f"server {name}"),
        link=_rate(spec.get("link"), "link", f"server {name}"),
    )


def _size(value: Any, key: str, who: str) -> int | None:
    size = _rate(value, key, who)  # spelled as rates are: 200G, 1.5T, 512Gi
    return None if size is None else int(size)


def _rate(value: Any, key: str, who: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise JobError(f"{who}: {exc}", key) from exc


def _when(value: Any, key: str) -> datetime | None:
    """A window bound: an ISO 8601 time (YAML may have parsed it already); UTC unless it
    says otherwise."""
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise JobError(f"window: {key} {value!r} is not an ISO 8601 time", key) from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_LineLoader)  # a SafeLoader: plain data only
    except OSError as exc:
        raise JobError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def load_plan(path: str) -> Plan:
    """Parse and check a job file or fleet plan. Nothing runs on an error: the message
    names the file, the line and the key."""
    doc = _read(path)
    if not isinstance(doc, dict) or not (doc.get("servers") or doc.get("waves")):
        raise JobError(f"{path}: expected a mapping with a non-empty `servers` or `waves` list")
    base = os.path.dirname(os.path.abspath(path))
    try:
        plan = _plan(doc, path, base)
    except JobError as exc:
        if exc.args[0].startswith(path):
            raise
        raise _located(path, exc, doc) from exc
    servers = plan.servers
    names = [s.name for s in servers]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise JobError(f"{path}: server names repeat: {', '.join(sorted(dupes))}")
    outdirs = [os.path.realpath(s.outdir) for s in servers]
    if len(set(outdirs)) != len(outdirs):
        raise JobError(f"{path}: two servers share an outdir")
    return plan


def _plan(doc: dict, path: str, base: str) -> Plan:
    unknown = set(doc) - PLAN_KEYS
    if unknown:
        raise JobError(f"unknown keys {', '.join(sorted(unknown))}", sorted(unknown)[0])
    if "servers" in doc and "waves" in doc:
        raise JobError("a plan has `servers` or `waves`, not both", "waves")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise JobError("defaults must be a mapping", "defaults")
    concurrency = doc.get("concurrency", 2)
    if not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise JobError(f"concurrency must be 1..{MAX_CONCURRENCY}", "concurrency")
    output = doc.get("output")
    if output is not None and not isinstance(output, str):
        raise JobError("output must be a directory path", "output")
    out_base = os.path.join(base, os.path.expanduser(output)) if output else base
    shared = doc.get("shared", True)
    if not isinstance(shared, bool):
        raise JobError("shared must be true or false", "shared")
    window = doc.get("window") or {}
    if not isinstance(window, dict) or set(window) - {"not_before", "not_after"}:
        raise JobError("window takes not_before and not_after", "window")
    try:
        not_before = _when(window.get("not_before"), "not_before")
        not_after = _when(window.get("not_after"), "not_after")
    except JobError as exc:
        raise _located(path, exc, window) from exc
    if not_before and not_after and not_after <= not_before:
        raise JobError("window: not_after comes before not_before", "window")
    broker = doc.get("broker")
    if broker is not None and not str(broker).startswith(("redis://", "rediss://")):
        raise JobError("broker must be a redis:// URL", "broker")
    raw_waves = [{"servers": doc["servers"]}] if "servers" in doc else doc["waves"]
    if not isinstance(raw_waves, list) or not raw_waves:
        raise JobError("waves must be a non-empty list", "waves")
    waves, index = [], 0
    for w, raw in enumerate(raw_waves):
        if not isinstance(raw, dict):
            raise JobError(f"waves[{w}]: expected a mapping", "waves")
        try:
            wave = _wave(raw, w, defaults, out_base, index)
        except JobError as exc:
            if exc.args[0].startswith(path):
                raise
            raise _located(path, exc, *_near(raw, exc), raw, defaults) from exc
        index += len(wave.servers)
        waves.append(wave)
    # the name goes into Redis keys and the status page's URLs: plain characters only
    name = doc.get("name")
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])
    elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise JobError("name: letters, digits, '_', '.' and '-' only (at most 100)", "name")
    return Plan(
        path=os.path.abspath(path),
        name=name,
        waves=waves,
        concurrency=concurrency,
        output=out_base,
        shared=shared,
        not_before=not_before,
        not_after=not_after,
        broker=str(broker) if broker else None,
    )


def _near(wave: dict, exc: JobError) -> list[Any]:
    """The server mappings of a wave whose message names them: where to look for the key."""
    servers = wave.get("servers")
    if not isinstance(servers, list):
        return []
    text = str(exc)
    return [
        s
        for s in servers
        if isinstance(s, dict)
        and any(text.startswith(f"server {s.get(k)}:") for k in ("name", "host") if s.get(k))
    ]


def _wave(raw: dict, w: int, defaults: dict, base: str, first: int) -> Wave:
    unknown = set(raw) - WAVE_KEYS
    if unknown:
        raise JobError(f"waves[{w}]: unknown keys {', '.join(sorted(unknown))}", sorted(unknown)[0])
    servers = raw.get("servers")
    if not isinstance(servers, list) or not servers:
        raise JobError(f"waves[{w}]: servers must be a non-empty list", "servers")
    cap = _rate(raw.get("max_bandwidth"), "max_bandwidth", f"waves[{w}]")
    jobs = [_server(s, defaults, base, first + i) for i, s in enumerate(servers)]
    for job in jobs:
        job.wave = w
        if cap:
            # a wave's cap is shared equally by its servers, whichever workers run them
            share = cap / len(jobs)
            job.clone.max_bandwidth = min(job.clone.max_bandwidth or share, share)
    return Wave(name=str(raw.get("name") or f"wave {w + 1}"), servers=jobs, max_bandwidth=cap)


def load_job(path: str) -> tuple[list[ServerJob], int]:
    """Parse and check a job file: (servers, concurrency)."""
    plan = load_plan(path)
    return plan.servers, plan.concurrency


def run_job(
    path: str, *, action: str = "clone", concurrency: int | None = None, progress_factory=None
) -> JobResult:
    """Clone (or sync) every server of the job, at most `concurrency` at a time, wave
    after wave. A server's failure is reported and does not stop the others."""
    plan = load_plan(path)
    staged = [s.name for s in plan.servers if s.cutover]
    if staged:
        # cut-over steps are tasks with their own state, kept in Redis: they run on workers
        raise JobError(
            f"{path}: cut-over steps ({', '.join(staged)}) run on workers: "
            "p2v run PLAN --broker redis://HOST:PORT/N"
        )
    now = datetime.now(timezone.utc)
    if plan.not_after and now >= plan.not_after:
        raise JobError(f"{path}: the plan's window closed at {plan.not_after.isoformat()}")
    if plan.not_before and now < plan.not_before:
        log.info("waiting for the plan's window (%s)", plan.not_before.isoformat())
        time.sleep((plan.not_before - now).total_seconds())
    limit = concurrency or plan.concurrency
    t0 = time.monotonic()
    result = JobResult(job=path, action=action, concurrency=limit)

    def one(job: ServerJob) -> ServerOutcome:
        start = time.monotonic()
        log.info("%s: %s started", job.name, action)
        try:
            if action == "sync":
                res: CloneResult | SyncResult = sync(
                    job.connect,
                    job.outdir,
                    SyncOptions(
                        compress=job.clone.compress,
                        python=job.clone.python,
                        max_bandwidth=job.clone.max_bandwidth,
                    ),
                    progress_factory=progress_factory,
                )
            else:
                res = clone(job.connect, job.outdir, job.clone, progress_factory=progress_factory)
        except Exception as exc:
            log.error("%s: %s failed: %s", job.name, action, exc)
            return ServerOutcome(job.name, False, error=str(exc), seconds=time.monotonic() - start)
        log.info("%s: %s done", job.name, action)
        return ServerOutcome(job.name, True, result=res, seconds=time.monotonic() - start)

    with cf.ThreadPoolExecutor(limit, thread_name_prefix="p2v-job") as pool:
        for wave in plan.waves:
            result.servers += pool.map(one, wave.servers)  # a wave starts when one ends
    result.seconds = time.monotonic() - t0
    return result

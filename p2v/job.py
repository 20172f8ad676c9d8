"""Job files: several servers and their disks in one YAML file, cloned (or synced) with
a concurrency limit. `samples/job.yaml` is a commented example.

    concurrency: 2
    defaults: {user: root, identity: ~/.ssh/p2v, format: qcow2, skip_unused: true}
    servers:
      - {name: web1, host: web1.example.com, disks: [/dev/sda], outdir: clones/web1}

Relative paths are relative to the job file. A password is never written in a job file:
`password_env` names the environment variable that holds it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

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
}
MAX_CONCURRENCY = 64


class JobError(ValueError):
    """A job file that cannot be run as written."""


@dataclass
class ServerJob:
    name: str
    connect: ConnectOptions
    outdir: str
    clone: CloneOptions


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
    raise JobError(f"server {name}: {key} must be a string or a list of strings")


def _bool(value: Any, key: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise JobError(f"server {name}: {key} must be true or false, not {value!r}")
    return value


def _server(raw: Any, defaults: dict[str, Any], base: str, index: int) -> ServerJob:
    if not isinstance(raw, dict):
        raise JobError(f"servers[{index}]: expected a mapping")
    spec = {**defaults, **raw}
    name = str(spec.get("name") or spec.get("host") or f"server{index + 1}")
    if "password" in spec:
        raise JobError(f"server {name}: no password in a job file; use password_env")
    unknown = set(spec) - SERVER_KEYS
    if unknown:
        raise JobError(f"server {name}: unknown keys {', '.join(sorted(unknown))}")
    if not spec.get("host"):
        raise JobError(f"server {name}: host is required")
    user, host = parse_target(str(spec["host"]), default_user=spec.get("user"))
    if spec.get("user") and "@" not in str(spec["host"]):
        user = str(spec["user"])

    def path(p: str) -> str:
        return os.path.join(base, os.path.expanduser(p))

    port = spec.get("port", 22)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise JobError(f"server {name}: port must be 1..65535")
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
        raise JobError(f"server {name}: compress must be zlib or none")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise JobError(f"server {name}: options must be a mapping")
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
    )
    outdir = path(str(spec.get("outdir") or name))
    return ServerJob(name=name, connect=connect, outdir=outdir, clone=opts)


def load_job(path: str) -> tuple[list[ServerJob], int]:
    """Parse and check a job file: (servers, concurrency)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise JobError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("servers"), list) or not doc["servers"]:
        raise JobError(f"{path}: expected a mapping with a non-empty `servers` list")
    unknown = set(doc) - {"concurrency", "defaults", "servers"}
    if unknown:
        raise JobError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise JobError(f"{path}: defaults must be a mapping")
    concurrency = doc.get("concurrency", 2)
    if not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise JobError(f"{path}: concurrency must be 1..{MAX_CONCURRENCY}")
    base = os.path.dirname(os.path.abspath(path))
    servers = [_server(s, defaults, base, i) for i, s in enumerate(doc["servers"])]
    names = [s.name for s in servers]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise JobError(f"{path}: server names repeat: {', '.join(sorted(dupes))}")
    outdirs = [os.path.realpath(s.outdir) for s in servers]
    if len(set(outdirs)) != len(outdirs):
        raise JobError(f"{path}: two servers share an outdir")
    return servers, concurrency


def run_job(
    path: str, *, action: str = "clone", concurrency: int | None = None, progress_factory=None
) -> JobResult:
    """Clone (or sync) every server of the job, at most `concurrency` at a time. A
    server's failure is reported and does not stop the others."""
    servers, default_concurrency = load_job(path)
    limit = concurrency or default_concurrency
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
                    SyncOptions(compress=job.clone.compress, python=job.clone.python),
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
        result.servers = list(pool.map(one, servers))
    result.seconds = time.monotonic() - t0
    return result

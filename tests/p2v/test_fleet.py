"""Fleets end to end: a real redis-server on 127.0.0.1 (random port, temporary directory,
append-only), real `p2v worker` processes, a real sshd serving the sources' disks, and
qemu-img compare as the judge of every output."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.external import need_tool
from tests.p2v.disks import striped_disk
from tests.p2v.sshd import free_port

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: generous: a loaded machine makes these tests slower, never red
DEADLINE = 600


class Redis:
    def __init__(self, root: str) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(os.path.join(self.root, "redis.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.root,
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while not self.ping():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def ping(self) -> bool:
        return (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            == "PONG"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis writes its append-only file and exits
            self.proc.wait(30)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path):
    need_tool("redis-server", "redis-cli")
    root = tmp_path / "redis"
    root.mkdir()
    server = Redis(str(root))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def p2v(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **kw.pop("env", {})}
    kw.setdefault("timeout", DEADLINE)
    return subprocess.run(
        [sys.executable, "-m", "p2v", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        **kw,
    )


class Workers:
    def __init__(self, broker: str, root: str) -> None:
        self.broker = broker
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        n: int = 1,
        *,
        env: dict[str, str] | None = None,
        concurrency: int = 2,
        lease: float = 4,
        visibility: float = 8,
        commit: float = 1,
    ) -> list[subprocess.Popen]:
        started = []
        for _ in range(n):
            i = len(self.procs)
            spool = os.path.join(self.root, f"spool{i}")
            log = open(os.path.join(self.root, f"worker{i}.log"), "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "p2v",
                    "worker",
                    "--broker",
                    self.broker,
                    "--concurrency",
                    str(concurrency),
                    "--spool",
                    spool,
                    "--lease-seconds",
                    str(lease),
                    "--visibility-timeout",
                    str(visibility),
                    "--retry-delays",
                    "0.5,0.5",
                    "--commit-seconds",
                    str(commit),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
            self.procs.append(proc)
            started.append(proc)
        return started

    def wait_ready(self, procs: list[subprocess.Popen]) -> None:
        """Until each worker says it is ready (Celery's start-up is not what a test times)."""
        for proc in procs:
            i = self.procs.index(proc)
            path = os.path.join(self.root, f"worker{i}.log")
            wait_for(lambda p=path: " ready." in Path(p).read_text(errors="replace"), "a worker")

    def kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            self.kill(proc)

    def logs(self) -> str:
        out = []
        for i in range(len(self.procs)):
            with open(os.path.join(self.root, f"worker{i}.log"), errors="replace") as f:
                out.append(f.read()[-3000:])
        return "\n".join(out)


@pytest.fixture
def workers(redis_server, tmp_path):
    root = tmp_path / "workers"
    root.mkdir()
    pool = Workers(redis_server.url, str(root))
    try:
        yield pool
    finally:
        pool.stop()


def write_plan(tmp_path, sshd, waves: list[list[dict]], **top) -> str:
    """A plan whose servers are disks served by the test sshd (each its own source)."""
    doc = {
        "output": str(tmp_path / "out"),
        "defaults": {
            "host": f"root@{sshd.host}",
            "port": sshd.port,
            "identity": sshd.user_key,
            "known_hosts": sshd.known_hosts,
            "format": "raw",
            "compress": "none",
            "verify": True,
        },
        "waves": [{"name": f"wave{i + 1}", "servers": w} for i, w in enumerate(waves)],
        **top,
    }
    path = tmp_path / "plan.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def sources(tmp_path, n: int, size_mib: int = 24) -> list[str]:
    root = tmp_path / "sources"
    root.mkdir(exist_ok=True)
    return [striped_disk(str(root / f"disk{i}.raw"), size_mib, seed=i) for i in range(n)]


def output_of(tmp_path, name: str, disk: str) -> str:
    return str(tmp_path / "out" / name / os.path.basename(disk))


def assert_same(src: str, out: str) -> None:
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", src, out], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def status_json(plan: str, broker: str) -> dict:
    res = p2v("status", plan, "--broker", broker, "--output", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_two_waves_on_three_workers_clone_six_sources(sshd, workers, redis_server, tmp_path):
    need_tool("qemu-img")
    disks = sources(tmp_path, 6)
    servers = [{"name": f"s{i}", "disks": [d]} for i, d in enumerate(disks)]
    plan = write_plan(tmp_path, sshd, [servers[:3], servers[3:]])
    workers.start(3)
    res = p2v("run", plan, "--broker", redis_server.url)
    assert res.returncode == 0, res.stdout + res.stderr + workers.logs()
    for i, d in enumerate(disks):
        assert_same(d, output_of(tmp_path, f"s{i}", d))
    status = status_json(plan, redis_server.url)
    assert [s["state"] for s in status["servers"]] == ["done"] * 6
    assert [(w["done"], w["failed"]) for w in status["waves"]] == [(3, 0), (3, 0)]
    # wave 2 started after wave 1 ended: every wave-2 copy began after the last wave-1
    # server's record was last updated
    r = redis_server.client()
    pid = status["plan"]
    ends = [float(r.hget(f"p2v:plan:{pid}:server:s{i}", "updated")) for i in range(3)]
    starts = [float(r.hget(f"p2v:plan:{pid}:server:s{i}", "copy_started")) for i in range(3, 6)]
    assert min(starts) >= max(ends)


def wait_for(predicate, what: str, timeout: float = DEADLINE, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.2)


def server_record(r, pid: str, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"p2v:plan:{pid}:server:{name}").items()}


def plan_pid(plan: str) -> str:
    from p2v.fleet.status import plan_id
    from p2v.job import load_plan

    loaded = load_plan(plan)
    return plan_id(loaded.path, loaded.name)


def start_run(plan: str, broker: str, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "p2v", "run", plan, "--broker", broker],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_log(tmp_path) -> str:
    return (tmp_path / "run.log").read_text()


def test_worker_killed_mid_copy_another_resumes_with_no_second_writer(
    sshd, workers, redis_server, tmp_path
):
    need_tool("qemu-img")
    from p2v.fleet.lease import foreign_writes, history

    disks = sources(tmp_path, 2, size_mib=48)  # 16 MiB of data each
    # capped at 2 MB/s: each copy lasts ~8 s, long enough to be killed in the middle
    servers = [{"name": f"k{i}", "disks": [d], "max_bandwidth": "2M"} for i, d in enumerate(disks)]
    plan = write_plan(tmp_path, sshd, [servers])
    pid = plan_pid(plan)
    r = redis_server.client()
    (first,) = workers.start(1)
    run = start_run(plan, redis_server.url, tmp_path)
    try:
        # both copies under way on the first worker, some bytes written
        wait_for(
            lambda: all(
                int(server_record(r, pid, s["name"]).get("bytes_done") or 0) > 2 * MiB
                for s in servers
            ),
            "copies under way",
            logs=workers.logs,
        )
        workers.kill(first)
        workers.start(1)
        assert run.wait(DEADLINE) == 0, run_log(tmp_path) + workers.logs()
    finally:
        if run.poll() is None:
            run.kill()
    for s, d in zip(servers, disks):
        assert_same(d, output_of(tmp_path, s["name"], d))
        record = server_record(r, pid, s["name"])
        # the second worker picked up the partial output, not a fresh copy
        assert int(record["resumed_from"]) > 0
        key = f"p2v:lease:{pid}:{s['name']}"
        owners = [e["owner"] for e in history(r, key) if e["event"] == "acquire"]
        assert len(set(owners)) >= 2  # the killed worker's lease lapsed, another took it
        assert foreign_writes(r, key) == []


def test_redis_restarted_mid_run_loses_nothing(sshd, workers, redis_server, tmp_path):
    need_tool("qemu-img")
    disks = sources(tmp_path, 3, size_mib=36)
    servers = [{"name": f"r{i}", "disks": [d], "max_bandwidth": "2M"} for i, d in enumerate(disks)]
    plan = write_plan(tmp_path, sshd, [servers[:2], servers[2:]])
    pid = plan_pid(plan)
    workers.start(2)
    run = start_run(plan, redis_server.url, tmp_path)
    try:
        r = redis_server.client()
        wait_for(
            lambda: int(server_record(r, pid, "r0").get("bytes_done") or 0) > MiB,
            "a copy under way",
            logs=workers.logs,
        )
        redis_server.stop()
        time.sleep(2)
        redis_server.start()
        assert run.wait(DEADLINE) == 0, run_log(tmp_path) + workers.logs()
    finally:
        if run.poll() is None:
            run.kill()
    for s, d in zip(servers, disks):
        assert_same(d, output_of(tmp_path, s["name"], d))
    status = status_json(plan, redis_server.url)
    assert [s["state"] for s in status["servers"]] == ["done"] * 3


def test_unreachable_source_and_missing_password_fail_alone(sshd, workers, redis_server, tmp_path):
    need_tool("qemu-img")
    disks = sources(tmp_path, 2)
    secret = "hunter2-never-in-redis"
    servers = [
        {"name": "good", "disks": [disks[0]]},
        {"name": "gone", "disks": [disks[1]], "port": free_port()},  # nobody listens
        {"name": "locked", "disks": [disks[1]], "password_env": "P2V_FLEET_TEST_PASSWORD"},
    ]
    plan = write_plan(tmp_path, sshd, [servers])
    workers.start(1)  # without P2V_FLEET_TEST_PASSWORD
    res = p2v("run", plan, "--broker", redis_server.url, env={"P2V_FLEET_TEST_PASSWORD": secret})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert_same(disks[0], output_of(tmp_path, "good", disks[0]))
    by_name = {s["name"]: s for s in status_json(plan, redis_server.url)["servers"]}
    assert by_name["good"]["state"] == "done"
    assert by_name["gone"]["state"] == "failed"
    assert "unreachable after 3 attempts" in by_name["gone"]["error"]
    assert by_name["locked"]["state"] == "failed"
    assert "P2V_FLEET_TEST_PASSWORD" in by_name["locked"]["error"]
    assert "\n" not in by_name["gone"]["error"] + by_name["locked"]["error"]
    # the controller had the password; nothing it sent through Redis carries it
    redis_server.client().bgrewriteaof()
    time.sleep(1)
    for dirpath, _, files in os.walk(redis_server.root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                assert secret.encode() not in fh.read()


def test_malformed_plan_is_refused_in_one_line_and_nothing_submitted(redis_server, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "waves:\n"
        "  - name: one\n"
        "    servers:\n"
        "      - {name: a, host: h1}\n"
        "      - name: b\n"
        "        host: h2\n"
        "        max_bandwidth: lots\n"
    )
    res = p2v("run", str(plan), "--broker", redis_server.url)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "line 7" in lines[0] and "max_bandwidth" in lines[0]
    assert redis_server.client().dbsize() == 0


#: set by tests/bench/bench_fleet.py: also run the plan on one worker and print both times
SCALE_BENCH = os.environ.get("P2V_FLEET_SCALE_BENCH") == "1"


def copy_windows(redis_server, plan: str, name: str, servers: list[dict]) -> list[tuple]:
    """Each server's copy as (started, last update), from the status its task kept."""
    from p2v.fleet.status import plan_id

    client = redis_server.client()
    pid = plan_id(plan, name)
    windows = []
    for s in servers:
        raw = client.hgetall(f"p2v:plan:{pid}:server:{s['name']}")
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        windows.append((float(fields["copy_started"]), float(fields["updated"])))
    return windows


@pytest.mark.slow
def test_three_workers_copy_six_capped_sources_at_once(sshd, workers, redis_server, tmp_path):
    """Scale-out: three workers of two slots each carry all six capped copies at the same
    time (every copy starts before any ends). The issue's speed figure (three workers at
    least 2.5x faster than one) depends on the machine, so it is measured and recorded by
    tests/bench/bench_fleet.py, which runs this test with P2V_FLEET_SCALE_BENCH=1."""
    need_tool("qemu-img")
    disks = sources(tmp_path, 6, size_mib=288)  # 96 MiB of data each: ~25 s at the cap
    # no verify pass: the copies' CPU work (hashing) does not parallelise on two cores,
    # their capped transfers do, and the transfers are what this compares
    servers = [
        {"name": f"x{i}", "disks": [d], "max_bandwidth": "4M", "verify": False}
        for i, d in enumerate(disks)
    ]
    seconds = {}
    for n in (3, 1) if SCALE_BENCH else (3,):
        root = tmp_path / f"with{n}"
        root.mkdir()
        plan = write_plan(root, sshd, [servers], name=f"scale{n}")
        # each copy outlasts the fault tests' visibility timeout: no second deliveries here
        started = workers.start(n, visibility=600, commit=30)
        workers.wait_ready(started)
        t0 = time.monotonic()
        res = p2v("run", plan, "--broker", redis_server.url)
        seconds[n] = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr + workers.logs()
        for s, d in zip(servers, disks):
            assert_same(d, output_of(root, s["name"], d))
        for proc in started:
            workers.kill(proc)
        windows = copy_windows(redis_server, plan, f"scale{n}", servers)
        in_flight = sum(1 for start, _ in windows if start < min(end for _, end in windows))
        # n workers of two slots: min(6, 2n) copies run before the first one ends
        assert in_flight >= min(6, 2 * n), windows
    if SCALE_BENCH:
        print(f"P2V-FLEET-SCALE one={seconds[1]:.2f} three={seconds[3]:.2f}")


def test_worker_local_outputs_are_recorded_per_server(sshd, workers, redis_server, tmp_path):
    need_tool("qemu-img")
    disks = sources(tmp_path, 2)
    servers = [{"name": f"l{i}", "disks": [d]} for i, d in enumerate(disks)]
    plan = write_plan(tmp_path, sshd, [servers], shared=False)
    workers.start(2)
    res = p2v("run", plan, "--broker", redis_server.url)
    assert res.returncode == 0, res.stdout + res.stderr + workers.logs()
    for s, d in zip(status_json(plan, redis_server.url)["servers"], disks):
        assert s["state"] == "done"
        # the output sits in a worker's spool, and the status says where and on which worker
        assert s["output"].startswith(workers.root) and s["worker"]
        assert_same(d, os.path.join(s["output"], os.path.basename(d)))
    assert not os.path.exists(tmp_path / "out")

"""`p2v status`: JSON and text for a plan, and the status page loaded by headless Chromium
(a screenshot is kept in the test's temporary directory); an unknown plan and a dead broker
give error pages, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from tests.external import need_tool, unavailable
from tests.p2v import test_fleet as rig
from tests.p2v.sshd import free_port
from tests.p2v.test_fleet import ROOT, p2v, plan_pid, sources, write_plan

redis_server = rig.redis_server
workers = rig.workers


class ServerStates(HTMLParser):
    """The rows of the page's servers table: name -> state, as the DOM holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, str] = {}
        self.errors: list[str] = []
        self._in_error = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "server" in (a.get("class") or "").split():
            self.states[a["data-name"]] = a["data-state"]
        self._in_error = tag == "p" and a.get("class") == "error"

    def handle_data(self, data):
        if self._in_error:
            self.errors.append(data)
            self._in_error = False


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    unavailable("chromium is not installed (Debian package chromium; make test installs it)")


def browse(url: str, tmp_path, shot: str) -> str:
    """The DOM after Chromium loaded `url`, and a screenshot of it in tmp_path."""
    base = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    if os.geteuid() == 0:
        base.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    png = tmp_path / shot
    subprocess.run(
        [*base, f"--screenshot={png}", "--window-size=1280,720", url],
        capture_output=True,
        timeout=180,
        check=True,
    )
    assert png.stat().st_size > 1000
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    )
    return dom.stdout


@pytest.fixture
def status_page(redis_server, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2v",
            "status",
            "--serve",
            f"127.0.0.1:{port}",
            "--broker",
            redis_server.url,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=5).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_reports_a_finished_plan_and_its_page_shows_every_server(
    sshd, workers, redis_server, status_page, tmp_path
):
    need_tool("qemu-img")
    disks = sources(tmp_path, 3)
    servers = [{"name": f"p{i}", "disks": [d]} for i, d in enumerate(disks)]
    servers[2]["port"] = free_port()  # unreachable: the page shows a failure too
    plan = write_plan(tmp_path, sshd, [servers[:2], servers[2:]])
    workers.start(1)
    res = p2v("run", plan, "--broker", redis_server.url)
    assert res.returncode == 1, res.stdout + res.stderr

    text = p2v("status", plan, "--broker", redis_server.url)
    assert text.returncode == 0, text.stderr
    assert "p0: done" in text.stdout and "p2: failed" in text.stdout
    assert "wave1: 2 done, 0 failed" in text.stdout

    url = f"{status_page}/plan/{plan_pid(plan)}"
    parser = ServerStates()
    parser.feed(browse(url, tmp_path, "status.png"))
    assert parser.states == {"p0": "done", "p1": "done", "p2": "failed"}
    code, body = get(url + ".json")
    assert code == 200 and '"state": "failed"' in body

    # an unknown plan: an error page in the browser too
    parser = ServerStates()
    parser.feed(browse(f"{status_page}/plan/no-such-plan", tmp_path, "unknown.png"))
    assert parser.states == {} and "no plan no-such-plan" in " ".join(parser.errors)
    code, body = get(f"{status_page}/plan/no-such-plan")
    assert code == 404 and "Traceback" not in body


def test_status_page_with_a_dead_broker_is_an_error_page(tmp_path):
    port, dead = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2v",
            "status",
            "--serve",
            f"127.0.0.1:{port}",
            "--broker",
            f"redis://127.0.0.1:{dead}/0",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                code, body = get(f"http://127.0.0.1:{port}/plan/anything")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert code == 503
        assert "the broker cannot be reached" in body and "Traceback" not in body
        parser = ServerStates()
        parser.feed(browse(f"http://127.0.0.1:{port}/", tmp_path, "dead.png"))
        assert parser.errors and "broker" in parser.errors[0]
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read()


def test_status_of_a_plan_with_a_dead_broker_is_one_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("servers: [{host: a}]\n")
    res = p2v("status", str(plan), "--broker", f"redis://127.0.0.1:{free_port()}/0")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1
    assert "unreachable" in res.stderr

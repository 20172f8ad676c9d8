"""`p2v migrate` and `p2v receive` as users run them: two processes on loopback, and the
stream carried in an SSH connection to a real sshd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.external import need_root, need_tool, p2v
from tests.live_migrate.receiver_process import ROOT


def start_cli_receiver(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2v",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--hash",
            "--output",
            "json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"p2v receive did not start: {line}{proc.stderr.read()}")
    return proc, line.split()[-1]


def test_migrate_and_receive_commands(tmp_path) -> None:
    receiver, address = start_cli_receiver()
    report_path = str(tmp_path / "report.json")
    try:
        res = p2v(
            "migrate",
            "--guest",
            "sim:16M,workload=hotset,hot=1M,rate=20M",
            "--to",
            address,
            "--channels",
            "2",
            "--compress",
            "zstd",
            "--delta",
            "--max-downtime",
            "250",
            "--json",
            report_path,
            "--no-progress",
        )
        assert res.returncode == 0, res.stderr + res.stdout
        assert "migrated 16 MiB" in res.stdout and "downtime" in res.stdout
        out, _ = receiver.communicate(timeout=30)
    finally:
        receiver.kill()
    received = json.loads(out)
    assert received["completed"] and received["channels"] == 2
    with open(report_path) as f:
        report = json.load(f)
    assert report["state"] == "completed" and report["source_running"] is False
    assert report["max_downtime"] == 0.25 and report["channels"] == 2
    for key in ("total_time", "setup_time", "downtime", "bytes_sent", "expected_downtime"):
        assert report[key] > 0
    assert set(report["pages"]) == {"zero", "full", "compressed", "delta"}
    assert report["pages"]["compressed"] > 0
    rnd = report["rounds"][0]
    for key in ("pages_sent", "dirty_rate", "bandwidth", "duration", "bytes_sent"):
        assert key in rnd
    assert sum(r["pages_sent"] for r in report["rounds"]) == received["pages-received"]
    assert [s for s, _ in report["states"]] == ["setup", "iterating", "stopping", "completed"]


def test_migrate_command_fails_cleanly_without_a_receiver() -> None:
    res = p2v("migrate", "--guest", "sim:4M", "--to", "127.0.0.1:1", "--no-progress")
    assert res.returncode == 1
    assert res.stderr.startswith("p2v: error: cannot connect to 127.0.0.1:1")
    assert "Traceback" not in res.stderr


def test_receive_command_with_once_ends_at_a_bad_stream() -> None:
    receiver, address = start_cli_receiver("--once")
    host, port = address.rsplit(":", 1)
    import socket

    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64)
        out, _ = receiver.communicate(timeout=30)
    assert receiver.returncode == 1
    result = json.loads(out)
    assert not result["completed"] and "bad magic" in result["error"]


def _refused_connections(address: str, pki: dict[str, str], stranger: dict[str, str]) -> int:
    """Connect as everything that is not the migration: garbage instead of TLS, TLS
    without a client certificate and with one from another CA, then, trusted, garbage
    and a HELLO of another protocol version. How many were tried."""
    import socket
    import ssl

    from live_migrate import wire
    from live_migrate.transport import tls_client_context

    host, port = address.rsplit(":", 1)
    ca = pki["ca"] + ".crt"
    hello = wire.Hello.build(
        dict(version=2, page_size=4096, page_count=16, features=0, channels=1, session=bytes(16))
    )
    framed = wire.build_frame_header(wire.FrameType.HELLO, len(hello), 0) + hello
    tries: list[tuple[ssl.SSLContext | None, bytes]] = [
        (None, b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64),
        (tls_client_context(ca), b"\0" * 64),
        (tls_client_context(ca, stranger["client"] + ".crt", stranger["client"] + ".key"), b""),
        (tls_client_context(ca, pki["client"] + ".crt", pki["client"] + ".key"), b"\1" * 64),
        (tls_client_context(ca, pki["client"] + ".crt", pki["client"] + ".key"), framed),
    ]
    for ctx, data in tries:
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            try:
                s = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
                s.sendall(data)
                s.recv(4096)  # the refusal (a WELCOME, an alert) or the close
            except (ssl.SSLError, OSError):
                pass  # refused during the TLS handshake
    return len(tries)


def test_receive_command_keeps_waiting_after_refused_connections(tmp_path) -> None:
    """Every connection refused before its handshake is one log line; the migration the
    receiver was started for still arrives, and its report says the memory verified."""
    from tests.live_migrate.pki import make_pki

    pki, stranger = make_pki(str(tmp_path), "good"), make_pki(str(tmp_path), "other")
    receiver, address = start_cli_receiver(
        "--tls-cert",
        pki["server"] + ".crt",
        "--tls-key",
        pki["server"] + ".key",
        "--tls-client-ca",
        pki["ca"] + ".crt",
    )
    try:
        tried = _refused_connections(address, pki, stranger)
        res = p2v(
            "migrate",
            "--guest",
            "sim:8M",
            "--to",
            address,
            "--tls-ca",
            pki["ca"] + ".crt",
            "--tls-cert",
            pki["client"] + ".crt",
            "--tls-key",
            pki["client"] + ".key",
            "--json",
            str(tmp_path / "sent.json"),
            "--no-progress",
        )
        assert res.returncode == 0, res.stderr + res.stdout
        out, err = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    assert receiver.returncode == 0, err
    refusals = [line for line in err.splitlines() if "refused a connection" in line]
    assert len(refusals) == tried, err
    assert "Traceback" not in err
    received = json.loads(out)
    assert received["completed"] and received["memory-verified"] is True
    with open(tmp_path / "sent.json") as f:
        assert json.load(f)["memory_verified"] is True


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    need_root()
    need_tool("ssh-keygen")
    if not os.path.exists("/usr/sbin/sshd"):
        need_tool("sshd")
    from tests.p2v.sshd import start_sshd

    server = start_sshd(str(tmp_path_factory.mktemp("sshd")))
    try:
        yield server
    finally:
        server.stop()


def test_migrate_via_ssh_carries_the_stream_in_the_ssh_connection(sshd, tmp_path) -> None:
    report_path = str(tmp_path / "report.json")
    remote = f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m p2v"
    t = time.monotonic()
    res = p2v(
        "migrate",
        "--guest",
        "sim:16M,workload=uniform,rate=10M",
        "--via-ssh",
        sshd.target,
        "-p",
        str(sshd.port),
        "-i",
        sshd.user_key,
        "--known-hosts",
        sshd.known_hosts,
        "--remote-command",
        remote,
        "--json",
        report_path,
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert time.monotonic() - t < 60
    with open(report_path) as f:
        report = json.load(f)
    assert report["state"] == "completed" and report["downtime"] > 0
    assert report["bytes_sent"] > 8 << 20


def test_migrate_via_ssh_reports_a_missing_receiver(sshd) -> None:
    res = p2v(
        "migrate",
        "--guest",
        "sim:4M",
        "--via-ssh",
        sshd.target,
        "-p",
        str(sshd.port),
        "-i",
        sshd.user_key,
        "--known-hosts",
        sshd.known_hosts,
        "--remote-command",
        "/nonexistent/p2v",
        "--no-progress",
    )
    assert res.returncode == 1
    assert "migration failed" in res.stdout and "running on the source" in res.stdout
    assert "/nonexistent/p2v" in res.stdout or "status 127" in res.stdout

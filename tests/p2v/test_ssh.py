"""SSH sessions against a real OpenSSH server: host keys are checked for real, every
way of logging in works or fails with a clear message, and no secret leaks."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import time

import pytest

from p2v import remote
from p2v.ssh import (
    AuthenticationError,
    HostKeyError,
    RemoteCommandError,
    connect,
    parse_target,
)
from tests.external import need_tool, p2v
from tests.p2v.conftest import connect_options
from tests.p2v.sshd import keygen, running_sshd

SECRET = "correct-horse-battery-staple-7741"


def test_unknown_host_key_is_refused_without_the_flag(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyError, match="unknown host key") as info:
        connect(connect_options(sshd, known_hosts=str(known)))
    assert "--accept-new-host-key" in str(info.value)
    assert "SHA256:" in str(info.value)
    assert known.read_text() == ""


def test_accept_new_host_key_trusts_once_and_logs_it(sshd, tmp_path, caplog):
    known = tmp_path / "sub" / "known_hosts"
    options = connect_options(sshd, known_hosts=str(known), accept_new_host_key=True)
    with caplog.at_level(logging.WARNING, logger="p2v.ssh"), connect(options) as s:
        assert s.run("echo ok").text == "ok\n"
    assert "trusting new host key" in caplog.text
    assert sshd.host_pub.split()[1] in known.read_text()
    # the key is now known: no flag needed
    with connect(connect_options(sshd, known_hosts=str(known))) as s:
        assert s.is_active


def test_changed_host_key_is_refused_even_with_the_flag(sshd, tmp_path):
    other = keygen(str(tmp_path / "other_host_key"))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other.rsplit(' ', 1)[0]}\n")
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        connect(connect_options(sshd, known_hosts=str(known), accept_new_host_key=True))
    assert known.read_text().count("\n") == 1  # nothing added


def test_hashed_known_hosts_entries_are_honoured(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(pathlib.Path(sshd.known_hosts).read_text())
    need_tool("ssh-keygen")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "|1|" in known.read_text()
    with connect(connect_options(sshd, known_hosts=str(known))) as s:
        assert s.is_active


def test_wrong_key_is_refused(sshd, tmp_path):
    stranger = str(tmp_path / "stranger")
    keygen(stranger)
    with pytest.raises(AuthenticationError, match="authentication failed"):
        connect(connect_options(sshd, key_files=[stranger]))


def test_ssh_agent_keys_log_in(sshd, tmp_path, monkeypatch):
    need_tool("ssh-agent", "ssh-add")
    sock = str(tmp_path / "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": sock}
        subprocess.run(["ssh-add", sshd.user_key], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        monkeypatch.setenv("HOME", str(tmp_path))  # no default keys to fall back on
        with connect(connect_options(sshd, key_files=[], use_agent=True)) as s:
            assert s.run("echo agent").text == "agent\n"
    finally:
        proc.terminate()
        proc.wait()


def test_password_from_environment_is_never_logged(tmp_path, monkeypatch, caplog):
    with running_sshd(str(tmp_path / "pw"), password_auth=True) as server:
        monkeypatch.setenv("P2V_TEST_PW", SECRET)
        monkeypatch.setenv("HOME", str(tmp_path))
        with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as info:
            connect(connect_options(server, key_files=[], password_env="P2V_TEST_PW"))
        assert "password" in str(info.value)
        assert SECRET not in caplog.text and SECRET not in str(info.value)
        # the CLI: the password only ever comes from the environment
        env = {**os.environ, "P2V_TEST_PW": SECRET, "HOME": str(tmp_path)}
        res = p2v(
            "--debug",
            "clone",
            "-p",
            str(server.port),
            "--known-hosts",
            server.known_hosts,
            "--password-env",
            "P2V_TEST_PW",
            "--no-agent",
            f"root@{server.host}",
            "-O",
            "raw",
            str(tmp_path / "out"),
            env=env,
        )
        assert res.returncode != 0
        assert "authentication failed" in res.stderr
        assert SECRET not in res.stdout + res.stderr
    res = p2v("clone", "--password", SECRET, "root@127.0.0.1", str(tmp_path / "o"))
    assert res.returncode == 2  # no such option: a password is never a command-line value


def test_missing_password_variable_is_reported(sshd, monkeypatch, tmp_path):
    monkeypatch.delenv("P2V_NOPE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AuthenticationError, match="P2V_NOPE"):
        connect(connect_options(sshd, key_files=[], password_env="P2V_NOPE"))


def test_run_gives_output_and_exit_status(sshd):
    with connect(connect_options(sshd)) as s:
        done = s.run("echo out; echo err >&2")
        assert (done.exit_status, done.text, done.stderr) == (0, "out\n", b"err\n")
        assert s.run("cat", input=b"echo back").stdout == b"echo back"
        with pytest.raises(RemoteCommandError) as info:
            s.run("echo broken >&2; exit 3")
        assert info.value.exit_status == 3 and "broken" in info.value.stderr
        assert s.run("exit 4", check=False).exit_status == 4


def test_sudo_wraps_commands_and_the_agent(sshd):
    need_tool("sudo")
    with connect(connect_options(sshd, sudo=True)) as s:
        assert s.run("id -u").text.strip() == "0"
        conn = remote.start_agent(s)
        try:
            assert conn.hello["uid"] == 0
        finally:
            conn.close()


def test_agent_exits_and_leaves_no_process(sshd):
    with connect(connect_options(sshd)) as s:
        conn = remote.start_agent(s)
        pid = conn.hello["pid"]
        assert os.path.exists(f"/proc/{pid}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert b"python3\0-c\0" in cmdline  # the agent came down the channel, not from disk
        conn.close()
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")


def test_parse_target():
    assert parse_target("admin@db1") == ("admin", "db1")
    assert parse_target("root@[::1]") == ("root", "::1")
    assert parse_target("host", default_user="me") == ("me", "host")


def test_agent_stream_survives_many_rekeys(sshd, tmp_path, monkeypatch):
    import concurrent.futures as cf

    from p2v import ssh

    monkeypatch.setattr(ssh, "REKEY_BYTES", 8 << 20)  # a rekey every 8 MiB
    data = os.urandom(64 << 20)
    path = tmp_path / "random.raw"
    path.write_bytes(data)
    with connect(connect_options(sshd)) as s:
        conn = remote.start_agent(s)
        try:
            disk = remote.RemoteDisk.open(conn, str(path))

            def read(offset: int) -> bytes:
                return disk.read(offset, 4 << 20)

            with cf.ThreadPoolExecutor(6) as pool:
                parts = list(pool.map(read, range(0, len(data), 4 << 20)))
            assert b"".join(parts) == data
        finally:
            conn.close()

"""Logging in as a real user, end to end through `p2v clone`: passwords (from an
environment variable the user names, and from a prompt answered on a terminal) and a
non-root account that reads disks through `sudo -n`.

The account is a throwaway local user made for this module (useradd, a home under /tmp,
removed afterwards); its sudo rule is a file in /etc/sudoers.d/ checked by `visudo -cf`
and removed after each test. The server is the test sshd with password logins on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from p2v import clone as cloning
from p2v import remote
from p2v.ssh import connect
from tests.external import need_root, need_tool, p2v, qemu_img
from tests.p2v.conftest import connect_options
from tests.p2v.sshd import running_sshd

MiB = 1 << 20
#: the agent's interpreter named exactly as the sudo rule names it: sudo's secure_path
#: could otherwise find another python3 first (/usr/local/bin) and refuse it
PYTHON = "/usr/bin/python3"


@dataclasses.dataclass
class Account:
    name: str
    uid: int
    password: str
    workdir: str  # world-traversable, so only a file's own mode can keep the user out


@pytest.fixture(scope="module")
def account():
    need_root()
    need_tool("useradd", "userdel", "chpasswd", "sudo", "visudo")
    if not os.path.exists(PYTHON):
        pytest.fail(f"{PYTHON} is missing: the agent runs with the server's python3")
    name = "p2vt" + secrets.token_hex(4)
    # not $TMPDIR: it may sit under a directory the test user cannot enter
    workdir = tempfile.mkdtemp(prefix="p2v-auth-", dir="/tmp")
    os.chmod(workdir, 0o755)
    home = os.path.join(workdir, "home")
    password = "pw-" + secrets.token_urlsafe(18)
    subprocess.run(
        ["useradd", "-M", "-U", "-d", home, "-s", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    try:
        os.mkdir(home, 0o700)
        shutil.chown(home, name, name)
        # also unlocks the account: sshd without PAM refuses every login, keys included,
        # to an account whose shadow entry is locked ("!")
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        yield Account(name, pwd.getpwnam(name).pw_uid, password, workdir)
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(account):
    need_tool("ssh-keygen")
    with running_sshd(os.path.join(account.workdir, "sshd"), password_auth=True) as srv:
        # AuthorizedKeysFile is one file for every user: the test key logs this user in too
        yield dataclasses.replace(srv, user=account.name)


@pytest.fixture(scope="module")
def disks(account):
    """Two small disks: one the user may read, one only root may (mode 600)."""
    paths = {}
    for label, mode in (("open", 0o644), ("secret", 0o600)):
        path = os.path.join(account.workdir, f"{label}.raw")
        with open(path, "wb") as f:
            f.truncate(24 * MiB)
            for offset in (0, 5 * MiB + 4096, 17 * MiB):
                f.seek(offset)
                f.write(os.urandom(MiB))
        os.chmod(path, mode)
        paths[label] = path
    return paths


@pytest.fixture
def client_env(tmp_path, account):
    """The client's environment: a HOME without ~/.ssh keys, so only what a test names
    (a password, a key file) can log in."""
    home = tmp_path / "client"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    return env


@pytest.fixture
def sudo_rule(account, tmp_path):
    """Passwordless sudo for the agent's interpreter only, as an administrator grants it."""
    draft = tmp_path / "sudoers"
    draft.write_text(f"{account.name} ALL=(root) NOPASSWD: {PYTHON}\n")
    check = subprocess.run(["visudo", "-cf", str(draft)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    path = f"/etc/sudoers.d/p2v-test-{account.name}"  # no dot: sudo skips such names
    tmp = path + "~"  # sudo ignores names ending in ~ while the file is written
    with open(tmp, "w") as f:
        f.write(draft.read_text())
    os.chmod(tmp, 0o440)
    os.rename(tmp, path)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clone_args(server, disk: str, out: str, *extra: str) -> list[str]:
    return [
        "clone",
        "-p",
        str(server.port),
        "--known-hosts",
        server.known_hosts,
        "--no-agent",
        "--no-progress",
        "--python",
        PYTHON,
        *extra,
        server.target,
        "--disk",
        disk,
        "-O",
        "qcow2",
        out,
    ]


def assert_clone_equals(disk: str, out: str) -> None:
    image = os.path.join(out, cloning.image_name(disk, set(), "qcow2"))
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", disk, image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2v: error: "), res.stderr
    return lines[0]


def user_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def assert_nothing_left_running(uid: int) -> None:
    deadline = time.monotonic() + 5
    while user_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert user_processes(uid) == []


def sshd_log(server) -> str:
    with open(os.path.join(server.root, "sshd.log"), errors="replace") as f:
        return f.read()


# -- passwords ----------------------------------------------------------------------


def test_password_from_named_variable_logs_in_and_clones(
    server, account, disks, client_env, tmp_path
):
    env = {**client_env, "P2V_TEST_SECRET": account.password}
    out = str(tmp_path / "out")
    args = clone_args(server, disks["open"], out, "--password-env", "P2V_TEST_SECRET")
    res = p2v("--debug", *args, env=env)  # debug logging: paramiko's too
    assert res.returncode == 0, res.stderr
    assert_clone_equals(disks["open"], out)
    assert account.password not in res.stdout + res.stderr
    assert account.password not in sshd_log(server)
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as f:
            assert account.password.encode() not in f.read(), name
    assert_nothing_left_running(account.uid)


def test_wrong_password_fails_with_one_line(server, account, disks, client_env, tmp_path):
    wrong = "not-" + account.password
    env = {**client_env, "P2V_TEST_SECRET": wrong}
    args = clone_args(
        server, disks["open"], str(tmp_path / "out"), "--password-env", "P2V_TEST_SECRET"
    )
    line = one_line_error(p2v(*args, env=env))
    assert f"{account.name}@127.0.0.1: authentication failed (password)" in line
    assert wrong not in line
    debug = p2v("--debug", *args, env=env)
    assert debug.returncode != 0
    assert "AuthenticationError" in debug.stderr
    assert wrong not in debug.stdout + debug.stderr
    assert not os.path.exists(tmp_path / "out" / cloning.image_name(disks["open"], set(), "qcow2"))


def _run_on_terminal(args: list[str], env: dict[str, str], answer: bytes) -> tuple[int, bytes]:
    """Run p2v on a new pseudo-terminal (its controlling terminal, as an interactive
    shell gives it), answer the password prompt, and return its status and all it wrote."""
    master, slave = os.openpty()
    # a session leader that opens no terminal has none: claim the pty before exec
    claim = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, '-m', 'p2v'] + sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", claim, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()
    answered = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal's other side is gone
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"password: " in seen:
                os.write(master, answer + b"\n")
                answered = True
        assert answered, bytes(seen)
        return proc.wait(timeout=30), bytes(seen)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_password_prompt_on_a_terminal(server, account, disks, client_env, tmp_path):
    out = str(tmp_path / "out")
    status, seen = _run_on_terminal(
        clone_args(server, disks["open"], out, "--ask-password"),
        client_env,
        account.password.encode(),
    )
    assert f"{account.name}@127.0.0.1's password: ".encode() in seen
    assert status == 0, seen.decode(errors="replace")
    assert account.password.encode() not in seen  # the terminal did not echo it
    assert_clone_equals(disks["open"], out)


def test_password_prompt_without_a_terminal_is_refused(
    server, account, disks, client_env, tmp_path
):
    args = clone_args(server, disks["open"], str(tmp_path / "out"), "--ask-password")
    line = one_line_error(p2v(*args, env=client_env, stdin=subprocess.DEVNULL))
    assert "needs a terminal" in line and "--password-env" in line


# -- a non-root user and sudo -------------------------------------------------------


def test_sudo_lets_a_non_root_user_clone_a_root_only_disk(
    server, account, disks, sudo_rule, client_env, tmp_path
):
    assert os.stat(disks["secret"]).st_mode & 0o777 == 0o600
    options = connect_options(server, sudo=True)
    with connect(connect_options(server)) as plain:
        conn = remote.start_agent(plain, python=PYTHON)
        try:
            assert conn.hello["uid"] == account.uid
        finally:
            conn.close()
    with connect(options) as s:
        conn = remote.start_agent(s, python=PYTHON)
        try:
            assert conn.hello["uid"] == 0
        finally:
            conn.close()
    out = str(tmp_path / "out")
    args = clone_args(server, disks["secret"], out, "-i", server.user_key, "--sudo")
    res = p2v(*args, env=client_env)
    assert res.returncode == 0, res.stderr
    assert "verified" in res.stdout
    assert_clone_equals(disks["secret"], out)
    assert_nothing_left_running(account.uid)


def test_sudo_without_a_rule_fails_clearly(server, account, disks, client_env, tmp_path):
    assert not [n for n in os.listdir("/etc/sudoers.d") if account.name in n]
    args = clone_args(server, disks["secret"], str(tmp_path / "out"), "-i", server.user_key)
    line = one_line_error(p2v(*args, "--sudo", env=client_env))
    assert "sudo: a password is required" in line
    assert "NOPASSWD" in line and PYTHON in line and account.name in line
    assert_nothing_left_running(account.uid)


def test_root_only_disk_without_sudo_is_a_permission_error(
    server, account, disks, client_env, tmp_path
):
    args = clone_args(server, disks["secret"], str(tmp_path / "out"), "-i", server.user_key)
    line = one_line_error(p2v(*args, env=client_env))
    assert disks["secret"] in line and "Permission denied" in line
    assert f"uid {account.uid}" in line and "--sudo" in line
    assert_nothing_left_running(account.uid)

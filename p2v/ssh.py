"""SSH sessions to the physical server: paramiko behind a small typed facade.

The rest of p2v never sees a paramiko type: `connect()` returns a `Session` whose
`run(cmd)` gives a `Completed` (or raises `RemoteCommandError` with the exit status and
stderr), and whose `open_exec_channel(cmd)` gives a byte stream for the agent.

Host keys are checked against known_hosts, as OpenSSH's `StrictHostKeyChecking=yes` does:
an unknown key stops the clone unless the user passes `accept_new_host_key` (an explicit,
logged trust on first use, the key then added to known_hosts); a changed key always stops
it (virt-p2v's unchecked host keys are the hole users reported, INTEROP.md). Passwords
come from a prompt or from an environment variable the user names, never from the command
line, and are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import shlex
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import paramiko

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
#: OpenSSH's strongest common AEAD ciphers first: no separate MAC pass, and AES-NI
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
#: one channel carries at most window / RTT: a larger window than paramiko's 2 MiB
#: keeps a long link full (INTEROP.md), and large packets cut per-packet Python work
WINDOW_SIZE = 8 << 20
MAX_PACKET_SIZE = 256 << 10
#: paramiko rekeys every 512 MiB; OpenSSH waits far longer for AES (2^32 blocks). Each
#: rekey stalls the stream, so we rekey every 4 GiB: well inside AES-GCM's safe margin
REKEY_BYTES = 4 << 30
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


class SSHError(Exception):
    """Base of the SSH side's errors (one line each, for the CLI)."""


class ConnectError(SSHError):
    pass


class HostKeyError(SSHError):
    """The server's host key is unknown or has changed."""


class AuthenticationError(SSHError):
    pass


class RemoteCommandError(SSHError):
    def __init__(self, command: str, exit_status: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        super().__init__(f"remote command {command!r} failed with status {exit_status}: {detail}")
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr


@dataclass
class Completed:
    command: str
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass
class ConnectOptions:
    """How to reach and log in to the server. Secrets are never fields here: a password
    is read from the environment variable `password_env` names, or prompted for."""

    host: str
    user: str
    port: int = DEFAULT_PORT
    key_files: Sequence[str] = ()
    use_agent: bool = True
    password_env: str | None = None
    ask_password: bool = False
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    sudo: bool = False
    timeout: float = 30.0
    keepalive: int = 15
    extra: dict = field(default_factory=dict)

    @property
    def known_hosts_path(self) -> str:
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")

    @property
    def host_key_name(self) -> str:
        """The name known_hosts files the key under, as OpenSSH spells it."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"


def parse_target(target: str, default_user: str | None = None) -> tuple[str, str]:
    """'user@host' -> (user, host); a bare host logs in as the local user."""
    user, sep, host = target.rpartition("@")
    if not sep:
        user = default_user or getpass.getuser()
    if not host or not user:
        raise SSHError(f"{target!r}: expected USER@HOST")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return user, host


def fingerprint(key: paramiko.PKey) -> str:
    """SHA256:base64 fingerprint, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class ExecChannel:
    """A remote command's stdin/stdout as a byte stream (for the agent), stderr kept."""

    def __init__(self, channel: paramiko.Channel, command: str) -> None:
        self._chan = channel
        self.command = command
        self._stderr = bytearray()
        self._err_lock = threading.Lock()

    def sendall(self, data: bytes) -> None:
        self._chan.sendall(data)

    def recv(self, n: int) -> bytes:
        return self._chan.recv(n)

    def _collect_stderr(self) -> None:
        with self._err_lock:
            while self._chan.recv_stderr_ready():
                chunk = self._chan.recv_stderr(65536)
                if not chunk:
                    break
                self._stderr += chunk
                del self._stderr[:-8192]

    @property
    def stderr(self) -> str:
        self._collect_stderr()
        return self._stderr.decode("utf-8", "replace")

    @property
    def exit_status(self) -> int | None:
        return self._chan.exit_status if self._chan.exit_status_ready() else None

    def diagnostics(self) -> str:
        parts = []
        status = self.exit_status
        if status is not None and status >= 0:
            parts.append(f"remote command exited with status {status}")
        err = [line for line in self.stderr.strip().splitlines() if line.strip()]
        if err:
            parts.append(err[-1])
        if not self._chan.get_transport() or not self._chan.get_transport().is_active():
            parts.append("SSH connection closed")
        return "; ".join(parts)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._chan.shutdown_write()
        with contextlib.suppress(Exception):
            self._chan.close()


class Session:
    """One authenticated SSH connection."""

    def __init__(self, transport: paramiko.Transport, options: ConnectOptions) -> None:
        self._transport = transport
        self.options = options

    @property
    def name(self) -> str:
        return f"{self.options.user}@{self.options.host}"

    @property
    def is_active(self) -> bool:
        return self._transport.is_active()

    def wrap(self, command: str) -> str:
        """Run `command` through `sudo -n` when asked: never prompts, fails at once."""
        if not self.options.sudo:
            return command
        return f"sudo -n -- sh -c {shlex.quote(command)}"

    def _open(self, command: str) -> paramiko.Channel:
        try:
            chan = self._transport.open_session(
                window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE
            )
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.name}: cannot start a command: {exc}") from exc
        return chan

    def open_exec_channel(self, command: str) -> ExecChannel:
        """Start `command` (already wrapped for sudo by the caller if needed) and return
        its stdin/stdout as a stream."""
        return ExecChannel(self._open(command), command)

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        input: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        """Run a shell command on the server (through sudo if the session uses it)."""
        wrapped = self.wrap(command)
        chan = self._open(wrapped)
        chan.settimeout(timeout)
        stderr = bytearray()

        def drain_stderr() -> None:
            with contextlib.suppress(Exception):
                while True:
                    chunk = chan.recv_stderr(65536)
                    if not chunk:
                        return
                    stderr.extend(chunk)

        err_thread = threading.Thread(target=drain_stderr, daemon=True)
        err_thread.start()
        out = bytearray()
        try:
            if input:
                chan.sendall(input)
            chan.shutdown_write()
            while True:
                chunk = chan.recv(1 << 20)
                if not chunk:
                    break
                out.extend(chunk)
            status = chan.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            raise ConnectError(f"{self.name}: {command!r}: {exc}") from exc
        finally:
            err_thread.join(timeout=5)
            chan.close()
        done = Completed(command, status, bytes(out), bytes(stderr))
        if check and status != 0:
            raise RemoteCommandError(command, status, stderr.decode("utf-8", "replace"))
        return done

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- host keys ----------------------------------------------------------------------


def _load_known_hosts(path: str) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if os.path.exists(path):
        try:
            keys.load(path)
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"{path}: cannot read known hosts: {exc}") from exc
    return keys


def _check_host_key(options: ConnectOptions, known: paramiko.HostKeys, key: paramiko.PKey) -> None:
    name = options.host_key_name
    entry = known.lookup(name)
    offered = f"{key.get_name()} {fingerprint(key)}"
    if entry is not None:
        ours = entry.get(key.get_name())
        if ours is not None and ours == key:
            return
        theirs = ", ".join(f"{t} {fingerprint(k)}" for t, k in entry.items())
        # never trust-on-first-use over a changed key: that is what an attacker looks like
        raise HostKeyError(
            f"HOST KEY CHANGED for {name}: the server offers {offered} but "
            f"{options.known_hosts_path} holds {theirs}. Someone may be intercepting the "
            "connection; if the server was really reinstalled, remove the old key "
            f"(ssh-keygen -R '{name}') and check the new one"
        )
    if not options.accept_new_host_key:
        raise HostKeyError(
            f"unknown host key for {name}: {offered}. Check this fingerprint with the "
            f"server's administrator, then add it to {options.known_hosts_path} or rerun "
            "with --accept-new-host-key"
        )
    log.warning(
        "trusting new host key for %s: %s (--accept-new-host-key); added to %s",
        name,
        offered,
        options.known_hosts_path,
    )
    _append_known_host(options.known_hosts_path, name, key)


def _append_known_host(path: str, name: str, key: paramiko.PKey) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    # append one line: rewriting the file would drop the user's comments and options
    with open(path, "a") as f:
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")


# -- authentication -----------------------------------------------------------------


def _load_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException as exc:
        raise AuthenticationError(
            f"{path}: the key is encrypted; load it into ssh-agent (ssh-add) and retry"
        ) from exc
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise AuthenticationError(f"{path}: cannot load the key: {exc}") from exc


def _password(options: ConnectOptions) -> str | None:
    if options.password_env:
        value = os.environ.get(options.password_env)
        if value is None:
            raise AuthenticationError(
                f"environment variable {options.password_env} (named by --password-env) is not set"
            )
        return value
    if options.ask_password:
        if not sys.stdin.isatty():
            raise AuthenticationError("a password prompt needs a terminal; use --password-env")
        return getpass.getpass(f"{options.user}@{options.host}'s password: ")
    return None


def _authenticate(transport: paramiko.Transport, options: ConnectOptions) -> None:
    user = options.user
    tried: list[str] = []

    def try_key(key: paramiko.PKey, label: str) -> bool:
        tried.append(label)
        try:
            transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            return False
        except paramiko.SSHException as exc:
            raise AuthenticationError(f"{options.host}: {exc}") from exc
        return transport.is_authenticated()

    for path in options.key_files:
        if try_key(_load_key(path), f"key {path}"):
            return
    if options.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        agent = paramiko.Agent()
        try:
            for key in agent.get_keys():
                if try_key(key, f"agent key {fingerprint(key)}"):
                    return
        finally:
            agent.close()
    if not options.key_files:
        for name in DEFAULT_KEYS:
            path = os.path.expanduser(f"~/.ssh/{name}")
            if os.path.exists(path):
                try:
                    key = _load_key(path)
                except AuthenticationError as exc:
                    log.debug("%s", exc)
                    continue
                if try_key(key, f"key {path}"):
                    return
    password = _password(options)
    if password is not None:
        tried.append("password")
        try:
            transport.auth_password(user, password)
        except paramiko.AuthenticationException:
            pass
        except paramiko.SSHException as exc:
            raise AuthenticationError(f"{options.host}: {exc}") from exc
        finally:
            del password
        if transport.is_authenticated():
            return
    what = ", ".join(tried) if tried else "no key, agent or password available"
    raise AuthenticationError(f"{user}@{options.host}: authentication failed ({what})")


def connect(options: ConnectOptions) -> Session:
    """Open, verify and authenticate an SSH connection."""
    plog = logging.getLogger("paramiko")
    if plog.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
        plog.setLevel(logging.WARNING)  # its per-connection INFO lines are noise to users
    known = _load_known_hosts(options.known_hosts_path)
    try:
        sock = socket.create_connection((options.host, options.port), timeout=options.timeout)
    except OSError as exc:
        raise ConnectError(f"{options.host}:{options.port}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        transport.packetizer.REKEY_BYTES = REKEY_BYTES
        transport.packetizer.REKEY_BYTES_OVERFLOW_MAX = REKEY_BYTES
        sec = transport.get_security_options()
        sec.ciphers = tuple(c for c in CIPHERS if c in sec.ciphers) + tuple(
            c for c in sec.ciphers if c not in CIPHERS
        )
        entry = known.lookup(options.host_key_name)
        if entry is not None:
            # ask for the key type we already know, so a rotation to another type is not
            # mistaken for a change
            first = [t for t in sec.key_types if t in entry]
            sec.key_types = tuple(first) + tuple(t for t in sec.key_types if t not in first)
        try:
            transport.start_client(timeout=options.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(
                f"{options.host}:{options.port}: SSH handshake failed: {exc}"
            ) from exc
        _check_host_key(options, known, transport.get_remote_server_key())
        _authenticate(transport, options)
        if options.keepalive:
            transport.set_keepalive(options.keepalive)
    except BaseException:
        transport.close()
        raise
    log.debug("connected to %s@%s:%d", options.user, options.host, options.port)
    return Session(transport, options)

"""A real OpenSSH server on 127.0.0.1 playing the physical server in p2v tests.

Random free port, temporary host and user keys, its own sshd_config; root logs in with the
user key (sshd runs as root with `UsePAM no` and `StrictModes no`). Used by the tests and
by tests/bench/bench_clone.py. `start_sshd(..., host=, prefix=, network=)` runs it in
another network namespace instead (the QEMU migration tests' destination host).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: str, kind: str = "ed25519") -> str:
    for old in (path, path + ".pub"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "p2v-test", "-f", path],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(path + ".pub") as f:
        return f.read().strip()


@dataclass
class Sshd:
    root: str
    port: int
    proc: subprocess.Popen
    host_key: str  # private key path
    host_pub: str  # "ssh-ed25519 AAAA..."
    user_key: str  # private key path
    known_hosts: str
    config: str
    user: str = "root"
    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_args(self) -> list[str]:
        """OpenSSH client options that reach this server (for baselines in tests/bench)."""
        return [
            "-p",
            str(self.port),
            "-i",
            self.user_key,
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        ]

    def connection_pids(self) -> list[int]:
        """The per-connection sshd children (killing one cuts that connection)."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def cut_connections(self) -> int:
        pids = self.connection_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        self.cut_connections()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_sshd(
    root: str,
    *,
    password_auth: bool = False,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    network: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    extra_config: str = "",
) -> Sshd:
    """sshd listening on `host`, started under `prefix` (e.g. `ip netns exec NS`); the
    readiness probe connects from within `network()` (where `host` is reachable)."""
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    os.makedirs(root, exist_ok=True)
    host_key = os.path.join(root, "host_ed25519")
    host_pub = keygen(host_key)
    user_key = os.path.join(root, "user_ed25519")
    user_pub = keygen(user_key)
    authorized = os.path.join(root, "authorized_keys")
    with open(authorized, "w") as f:
        f.write(user_pub + "\n")
    port = free_port()
    config = os.path.join(root, "sshd_config")
    with open(config, "w") as f:
        f.write(
            f"Port {port}\n"
            f"ListenAddress {host}\n"
            f"HostKey {host_key}\n"
            f"PidFile {os.path.join(root, 'sshd.pid')}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin yes\n"
            "PubkeyAuthentication yes\n"
            f"PasswordAuthentication {'yes' if password_auth else 'no'}\n"
            "KbdInteractiveAuthentication no\n"
            "MaxStartups 50\n"
            "MaxSessions 50\n"
            "LogLevel ERROR\n" + extra_config
        )
    known_hosts = os.path.join(root, "known_hosts")
    with open(known_hosts, "w") as f:
        f.write(f"[{host}]:{port} {host_pub.rsplit(' ', 1)[0]}\n")
    log = open(os.path.join(root, "sshd.log"), "wb")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", config], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            with network(), socket.create_connection((host, port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(os.path.join(root, "sshd.log")) as f:
                raise RuntimeError(f"sshd did not start: {f.read()}")
        time.sleep(0.05)
    return Sshd(
        root=root,
        port=port,
        proc=proc,
        host_key=host_key,
        host_pub=host_pub.rsplit(" ", 1)[0],
        user_key=user_key,
        known_hosts=known_hosts,
        config=config,
        host=host,
    )


@contextlib.contextmanager
def running_sshd(root: str, **kw) -> Iterator[Sshd]:
    server = start_sshd(root, **kw)
    try:
        yield server
    finally:
        server.stop()

"""A "physical server" with no Python at all: OpenSSH's sshd whose sessions run in a chroot
holding only busybox (Debian's busybox-static), in a network namespace the test creates.

sshd runs under `ip netns exec NS` in a mount namespace of its own, where the chroot gets
/proc, the namespace's /sys (so its NICs are the namespace's: loopback and a veth pair
with known MACs), and a tmpfs /dev holding null, zero, urandom and any loop devices the
test hands over; these mounts die with sshd. Every session is
`chroot [--userspec=U:G] ROOT /bin/sh -c "$SSH_ORIGINAL_COMMAND"`: the userspec comes from
a file the test may rewrite (a server where the login is not root). Disks are files in
ROOT/disks (the server sees /disks/NAME). Clients reach sshd from inside the namespace
(`in_netns`), or through `ip netns exec` for CLI runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tests.external import need_root, need_tool
from tests.netns import in_netns
from tests.p2v.sshd import Sshd, start_sshd

BUSYBOX = "/bin/busybox"
#: the veth pair's MACs: what the no-Python inventory must report
MACS = {"p2vbb0": "02:00:00:00:bb:01", "p2vbb1": "02:00:00:00:bb:02"}
#: sets up the chroot's mounts in sshd's own mount namespace, then becomes sshd
MOUNTS = r"""
set -e
mount -t proc proc "$0/proc"
mount -t sysfs sysfs "$0/sys"
mount -t tmpfs -o mode=755 tmpfs "$0/dev"
mknod -m 666 "$0/dev/null" c 1 3
mknod -m 666 "$0/dev/zero" c 1 5
mknod -m 444 "$0/dev/urandom" c 1 9
for spec in $P2V_LOOPS; do
  name=${spec%%:*}; nums=${spec#*:}; mknod -m 600 "$0/dev/$name" b ${nums%%:*} ${nums#*:}
done
exec "$@"
"""


@dataclass
class BusyboxServer:
    sshd: Sshd
    root: str  # the chroot, on this machine
    netns: str
    userspec: str  # the file holding chroot's --userspec option (empty: root)

    def disk(self, name: str) -> tuple[str, str]:
        """(path on this machine, path the server sees) of a disk file."""
        return os.path.join(self.root, "disks", name), f"/disks/{name}"

    def login_as(self, uid: int | None) -> None:
        with open(self.userspec, "w") as f:
            f.write(f"--userspec={uid}:{uid}\n" if uid is not None else "")

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        with in_netns(self.netns):
            yield

    def cli_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def build_root(root: str) -> None:
    """A root holding busybox and its applets, and nothing else (no Python, no libc)."""
    for d in ("bin", "dev", "proc", "sys", "tmp", "disks", "etc"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    _run("chroot", root, "/bin/busybox", "--install", "-s", "/bin")
    with open(os.path.join(root, "etc", "os-release"), "w") as f:
        f.write('ID=busybox\nNAME="BusyBox test server"\nVERSION_ID=1\n')


@contextlib.contextmanager
def busybox_server(workdir: str, loops: dict[str, tuple[int, int]] | None = None):
    """The server, torn down on exit. `loops` maps a /dev name to (major, minor)."""
    need_root()
    need_tool("ip", "chroot", "mount", "mknod", "ssh-keygen")
    if not os.path.exists(BUSYBOX):
        need_tool("busybox")
    root = os.path.join(workdir, "root")
    build_root(root)
    netns = f"p2v-bb-{os.getpid()}-{abs(hash(workdir)) % 10000}"
    _run("ip", "netns", "add", netns)
    server = None
    try:
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run(
            "ip", "-n", netns, "link", "add", "p2vbb0", "address", MACS["p2vbb0"],
            "type", "veth", "peer", "name", "p2vbb1", "address", MACS["p2vbb1"],
        )  # fmt: skip
        userspec = os.path.join(workdir, "userspec")
        with open(userspec, "w") as f:
            f.write("")
        os.environ["P2V_LOOPS"] = " ".join(f"{n}:{a}:{b}" for n, (a, b) in (loops or {}).items())
        try:
            sshd = start_sshd(
                os.path.join(workdir, "sshd"),
                prefix=["ip", "netns", "exec", netns, "sh", "-c", MOUNTS, root],
                network=lambda: in_netns(netns),
                extra_config=(
                    f'ForceCommand /usr/sbin/chroot $(cat {userspec}) {root} /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
                ),
            )
        finally:
            os.environ.pop("P2V_LOOPS", None)
        server = BusyboxServer(sshd=sshd, root=root, netns=netns, userspec=userspec)
        yield server
    finally:
        if server is not None:
            server.sshd.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)

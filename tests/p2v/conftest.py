"""Fixtures for the P2V tests: a real sshd on 127.0.0.1 as the "physical server", and
its disks: files holding a GPT with a FAT and an ext4 partition made by mkfs."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.external import need_root, need_tool

MiB = 1 << 20


@pytest.fixture(scope="session")
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


def build_server_disk(path: str, size_mib: int = 192) -> dict[str, int]:
    need_tool("sgdisk", "mkfs.vfat", "mcopy", "mkfs.ext4")
    from samples.disk import build_disk

    return build_disk(
        path, size_mib * MiB, fat_size=64 * MiB, libs=6 * MiB, text=6 * MiB, rand=6 * MiB
    )


@pytest.fixture(scope="session")
def pristine_disk(tmp_path_factory):
    """A server disk built once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("disk")
    path = str(root / "disk.raw")
    layout = build_server_disk(path)
    # garbage in free space: --skip-unused must not copy it, a full clone must
    with open(path, "r+b") as f:
        f.seek(size_of(path) - 24 * MiB)
        f.write(os.urandom(MiB))
    return path, layout


def size_of(path: str) -> int:
    return os.stat(path).st_size


@pytest.fixture
def server_disk(pristine_disk, tmp_path):
    """A private copy of the server disk (sparse), with its partition layout."""
    src, layout = pristine_disk
    dst = str(tmp_path / "server" / "sda.raw")
    os.makedirs(os.path.dirname(dst))
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    return dst, layout


def connect_options(server, **kw):
    from p2v.ssh import ConnectOptions

    base = {
        "host": server.host,
        "user": server.user,
        "port": server.port,
        "key_files": [server.user_key],
        "known_hosts": server.known_hosts,
        "use_agent": False,
    }
    base.update(kw)
    return ConnectOptions(**base)

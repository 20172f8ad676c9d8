"""A real QEMU guest migrated through the CLI over TLS and over SSH, between the two
hosts of the harness (network namespaces when the machine allows, else loopback).

TLS: `p2v receive --qemu ... --tls-cert/--tls-key` on the destination, `p2v migrate
--tls --tls-ca` on the source, which verifies the receiver's certificate and address.
SSH: `p2v migrate --via-ssh` starts `p2v receive --stdio --qemu ...` itself through a
real sshd running on the destination host, after checking its host key.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.external import need_root, need_tool

from .guest_image.harness import Hosts, Workdir, build_or_skip
from .guest_image.migration_run import (
    REPO,
    check_cli_migration,
    qemus_by_hand,
    run_cli_migrate,
    start_cli_receiver,
)
from .pki import make_pki

GUEST = dict(ram_mib=128, mem_mib=16, rate_mb=20)


@pytest.fixture(scope="module")
def guest_image():
    return build_or_skip()


@pytest.fixture
def work():
    w = Workdir()
    yield w
    w.cleanup()


@pytest.fixture(scope="module")
def hosts():
    h = Hosts()
    yield h
    h.close()


@pytest.fixture(scope="module")
def sshd(hosts, tmp_path_factory):
    """sshd on the destination host: in its namespace, on its address."""
    need_root()
    need_tool("ssh-keygen")
    if not os.path.exists("/usr/sbin/sshd"):
        need_tool("sshd")
    from tests.p2v.sshd import start_sshd

    server = start_sshd(
        str(tmp_path_factory.mktemp("sshd")),
        host=hosts.dst_address,
        prefix=hosts.dst_prefix,
        network=hosts.on_source,
    )
    try:
        yield server
    finally:
        server.stop()


def test_cli_migrates_a_qemu_guest_over_tls_to_a_verified_receiver(
    guest_image, hosts, work, tmp_path
):
    good = make_pki(str(tmp_path), "good", ips=[hosts.dst_address])
    other = make_pki(str(tmp_path), "other", ips=[hosts.dst_address])
    with qemus_by_hand(guest_image, work, **GUEST) as pair:
        recv_report = work.file("receive.json")
        receiver, port = start_cli_receiver(
            hosts,
            "--qemu",
            pair.target,
            "--tls-cert",
            good["server"] + ".crt",
            "--tls-key",
            good["server"] + ".key",
            "--json",
            recv_report,
        )
        try:
            to = ["--guest", pair.guest, "--to", f"{hosts.dst_address}:{port}", "--tls"]
            # a certificate from a CA the source does not trust: nothing is sent, the
            # guest counts on at the source, and the receiver waits for the real source
            res = run_cli_migrate(hosts, *to, "--tls-ca", other["ca"] + ".crt")
            assert res.returncode == 1, res.stdout + res.stderr
            assert "certificate verify failed" in res.stderr, res.stderr
            assert pair.source_log.keeps_counting()
            assert receiver.poll() is None

            mig_report = work.file("migrate.json")
            res = run_cli_migrate(
                hosts,
                *to,
                "--tls-ca",
                good["ca"] + ".crt",
                "--max-downtime",
                "500",
                "--auto-converge",  # a loaded machine may send slower than the guest writes
                "--json",
                mig_report,
            )
            assert receiver.wait(30) == 0, receiver.stderr.read()
            assert "refused a connection" in receiver.stderr.read()
            with open(recv_report) as f:
                check_cli_migration(pair, res, mig_report, json.load(f))
        finally:
            receiver.kill()
            receiver.wait()


def test_cli_migrates_a_qemu_guest_over_ssh_to_a_receiver_it_starts(guest_image, hosts, work, sshd):
    with qemus_by_hand(guest_image, work, **GUEST) as pair:
        remote = f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -m p2v"
        via = [
            "--guest",
            pair.guest,
            "--via-ssh",
            sshd.target,
            "-p",
            str(sshd.port),
            "-i",
            sshd.user_key,
            "--remote-command",
            remote,
        ]
        # without the destination QEMU the remote receiver would build a sim guest and
        # the source would stop for good: refused before anything starts
        res = run_cli_migrate(hosts, *via, "--known-hosts", sshd.known_hosts)
        assert res.returncode == 1 and "--remote-qemu" in res.stderr, res.stderr
        # a host key other than the one known for the destination: no connection
        wrong = work.file("known_hosts.wrong")
        with open(wrong, "w") as f:
            f.write(f"[{sshd.host}]:{sshd.port} {_other_host_key(work)}\n")
        res = run_cli_migrate(hosts, *via, "--known-hosts", wrong, "--remote-qemu", pair.target)
        assert res.returncode == 1 and "HOST KEY CHANGED" in res.stderr, res.stdout + res.stderr
        assert pair.source_log.keeps_counting()

        mig_report = work.file("migrate.json")
        res = run_cli_migrate(
            hosts,
            *via,
            "--known-hosts",
            sshd.known_hosts,
            "--remote-qemu",
            pair.target,
            "--max-downtime",
            "500",
            "--auto-converge",  # a loaded machine may send slower than the guest writes
            "--json",
            mig_report,
        )
        check_cli_migration(pair, res, mig_report, None)


def _other_host_key(work: Workdir) -> str:
    from tests.p2v.sshd import keygen

    return keygen(work.file("other_host_key")).rsplit(" ", 1)[0]

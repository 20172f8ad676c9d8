"""`p2v migrate --via-ssh`: start `p2v receive --stdio` on the destination over SSH and
carry the migration stream in that SSH connection (one channel; the SSH session's
encryption and host-key check replace TLS). With `remote_qemu` that receiver fills the
destination QEMU it names (`p2v receive --qemu`)."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

from live_migrate import session
from live_migrate.engine import MigrationOptions
from live_migrate.report import MigrationReport, Progress
from live_migrate.transport import RecvStream
from p2v import ssh


def migrate_via_ssh(
    guest_spec: str,
    target: str,
    options: MigrationOptions,
    *,
    port: int = ssh.DEFAULT_PORT,
    key_files: Sequence[str] = (),
    known_hosts: str | None = None,
    accept_new_host_key: bool = False,
    remote_command: str = "p2v",
    remote_qemu: str | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationReport:
    user, host = ssh.parse_target(target)
    connect = ssh.ConnectOptions(
        host=host,
        user=user,
        port=port,
        key_files=tuple(key_files),
        known_hosts=known_hosts,
        accept_new_host_key=accept_new_host_key,
    )
    with ssh.connect(connect) as conn:
        command = f"{remote_command} receive --stdio --output json"
        if remote_qemu:
            command += f" --qemu {shlex.quote(remote_qemu)}"
        channel = conn.open_exec_channel(conn.wrap(command))
        try:
            report = session.migrate_over(guest_spec, [RecvStream(channel)], options, progress)
        finally:
            channel.close()
        if not report.completed:
            remote = channel.diagnostics()
            if remote:
                report.error = f"{report.error} (remote {shlex.split(remote_command)[0]}: {remote})"
        return report

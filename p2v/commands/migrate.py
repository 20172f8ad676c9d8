"""Live migration commands: `p2v migrate` (source, or `--plan`) and `p2v receive`
(destination). Thin: parse, call one live_migrate.session function, print."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING

from p2v.output import human_size, parse_size, print_json, to_jsonable

if TYPE_CHECKING:
    from live_migrate.engine import MigrationOptions

# live_migrate is imported by the handlers: `p2v convert` should not pay for it

RECEIVE_PORT = 4444  # QEMU's documentation examples use it for -incoming tcp


def parse_rate(text: str) -> float:
    """Bytes per second: '125M' (bytes, powers of 1024 like QEMU's max-bandwidth),
    or bits: '1gbit', '1Gbps', '800mbit' (powers of 1000, as links are sold)."""
    t = text.strip().lower().removesuffix("/s")
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(bit|bps)", t)
    if m:
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
        return float(m.group(1)) * scale / 8
    return float(parse_size(t))


def _add_tls_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true", help="encrypt with TLS (see --tls-ca)")
    p.add_argument("--tls-ca", help="CA file that signed the receiver's certificate")
    p.add_argument("--tls-cert", help="client certificate, if the receiver asks for one")
    p.add_argument("--tls-key", help="key of --tls-cert")
    p.add_argument("--tls-name", help="name in the receiver's certificate (default: host)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a running guest's memory to a `p2v receive`",
        description=(
            "Pre-copy live migration: send all memory while the guest runs, then the "
            "pages it dirtied, round after round, until the rest fits in --max-downtime; "
            "then pause, send the rest and the device state, resume on the destination. "
            "Any failure before the destination acknowledges leaves the guest running "
            "here. With --plan, predict instead of migrating."
        ),
    )
    p.add_argument(
        "--guest",
        help="the guest, e.g. sim:1G,workload=hotset,hot=64M,rate=100M, or a running QEMU: "
        "qemu:QMP_SOCKET,ram=PATH[,throttle=auto|cgroup|duty-cycle]",
    )
    p.add_argument("--to", metavar="ADDR:PORT", help="the receiver's address")
    p.add_argument(
        "--via-ssh",
        metavar="USER@HOST",
        help="start the receiver over SSH and carry the stream in the SSH connection",
    )
    p.add_argument(
        "--max-downtime",
        type=float,
        default=300,
        metavar="MS",
        help="largest acceptable pause (default 300 ms, as QEMU)",
    )
    p.add_argument(
        "--max-bandwidth",
        type=parse_rate,
        metavar="RATE",
        help="cap for all channels, e.g. 125M (bytes/s) or 1gbit",
    )
    p.add_argument("--channels", type=int, default=1, help="parallel connections (default 1)")
    p.add_argument("--compress", choices=("none", "zstd", "lz4"), default="none")
    p.add_argument(
        "--delta",
        action="store_true",
        help="send resent pages as deltas against their last sent copy",
    )
    p.add_argument(
        "--no-zero-pages",
        action="store_true",
        help="send zero pages as data (to measure what the flag saves)",
    )
    p.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle the guest when it dirties memory faster than the link",
    )
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--max-time", type=float, default=600, metavar="SECONDS")
    p.add_argument("--json", metavar="REPORT", help="write the JSON report to this file")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--no-progress", action="store_true")
    _add_tls_client(p)
    ssh = p.add_argument_group("--via-ssh")
    ssh.add_argument("-p", "--port", type=int, default=22, help="SSH port")
    ssh.add_argument("-i", dest="identity", action="append", default=[], help="private key")
    ssh.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    ssh.add_argument("--accept-new-host-key", action="store_true")
    ssh.add_argument(
        "--remote-command", default="p2v", help="how to run p2v on the destination (default: p2v)"
    )
    ssh.add_argument(
        "--remote-qemu",
        metavar="QMP_SOCKET,ram=PATH",
        help="the destination QEMU (started there with -incoming defer -S): what the remote "
        "`p2v receive --qemu` attaches to; required with --guest qemu:...",
    )
    plan = p.add_argument_group("--plan")
    plan.add_argument("--plan", action="store_true", help="predict; do not migrate")
    plan.add_argument("--memory", type=parse_size, help="guest memory (without --guest)")
    plan.add_argument("--dirty-rate", type=parse_rate, help="bytes/s the guest writes")
    plan.add_argument(
        "--working-set", type=parse_size, help="bytes the guest writes at all (default: all memory)"
    )
    plan.add_argument("--zero-fraction", type=float, default=0.0)
    plan.add_argument(
        "--bandwidth", type=parse_rate, help="link rate for the plan (default --max-bandwidth)"
    )
    plan.add_argument(
        "--scan-rate", type=parse_rate, help="scan speed, for guests without a dirty log (e.g. 5G)"
    )
    plan.add_argument(
        "--measure",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to watch --guest for its dirty rate (default 2)",
    )
    p.set_defaults(func=cmd_migrate)

    r = sub.add_parser(
        "receive",
        help="receive a live migration (the destination side)",
        description="Wait for one `p2v migrate`, build the guest here, resume it, exit. "
        "Connections refused before their HELLO (garbage, another protocol version, a "
        "failed TLS handshake) are logged and the wait goes on, unless --once.",
    )
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="ADDR:PORT", help=f"default port {RECEIVE_PORT}")
    where.add_argument(
        "--stdio", action="store_true", help="speak on stdin/stdout (how --via-ssh starts it)"
    )
    r.add_argument("--target", default="sim", help="destination backend (default sim)")
    r.add_argument(
        "--qemu",
        metavar="QMP_SOCKET,ram=PATH",
        help="receive into a QEMU started with -incoming defer -S whose RAM is the shared "
        "memory-backend-file PATH (docs/migration-qemu.md)",
    )
    r.add_argument("--keep", action="store_true", help="keep the target's memory file")
    r.add_argument("--max-memory", type=parse_size, help="largest guest accepted")
    r.add_argument("--hash", action="store_true", help="report a SHA-256 of the memory")
    r.add_argument("--tls-cert", help="server certificate (enables TLS)")
    r.add_argument("--tls-key", help="key of --tls-cert")
    r.add_argument("--tls-client-ca", help="require a client certificate signed by this CA")
    r.add_argument("--json", metavar="REPORT", help="write the JSON report to this file")
    r.add_argument(
        "--once",
        action="store_true",
        help="end after the first connection, even one refused before its HELLO "
        "(default: log it and keep waiting for the migration)",
    )
    r.add_argument("--output", choices=("human", "json"), default="human")
    r.set_defaults(func=cmd_receive)


def _options(args: argparse.Namespace) -> MigrationOptions:
    from live_migrate.engine import MigrationOptions

    return MigrationOptions(
        max_downtime=args.max_downtime / 1000,
        max_bandwidth=args.max_bandwidth,
        max_rounds=args.max_rounds,
        max_time=args.max_time,
        auto_converge=args.auto_converge,
        zero_pages=not args.no_zero_pages,
        compress=None if args.compress == "none" else args.compress,
        delta=args.delta,
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from live_migrate import session
    from live_migrate.report import ProgressBar
    from live_migrate.transport import parse_address, tls_client_context

    if args.plan:
        return _cmd_plan(args)
    if not args.guest or not (args.to or args.via_ssh):
        raise ValueError("migrate needs --guest and --to (or --via-ssh), or --plan")
    options = _options(args)
    bar = ProgressBar(enabled=not args.no_progress and sys.stderr.isatty())
    try:
        if args.via_ssh:
            from p2v.migrate_ssh import migrate_via_ssh

            if args.channels != 1:
                raise ValueError("--via-ssh carries one channel: drop --channels")
            if args.guest.startswith("qemu:") and not args.remote_qemu:
                # else the remote receiver would build a sim guest, and the source QEMU
                # would stop for good with its guest running nowhere
                raise ValueError(
                    "--via-ssh with a QEMU guest needs --remote-qemu QMP_SOCKET,ram=PATH: "
                    "the destination QEMU, started with -incoming defer -S"
                )
            report = migrate_via_ssh(
                args.guest,
                args.via_ssh,
                options,
                port=args.port,
                key_files=args.identity,
                known_hosts=args.known_hosts,
                accept_new_host_key=args.accept_new_host_key,
                remote_command=args.remote_command,
                remote_qemu=args.remote_qemu,
                progress=bar,
            )
        else:
            address = parse_address(args.to, RECEIVE_PORT)
            tls = None
            if args.tls or args.tls_ca:
                tls = tls_client_context(args.tls_ca, args.tls_cert, args.tls_key)
            report = session.migrate_to(
                args.guest,
                address,
                options,
                channels=args.channels,
                tls=tls,
                server_hostname=args.tls_name,
                progress=bar,
            )
    finally:
        bar.close()
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json() + "\n")
    if args.output == "json":
        print(report.to_json())
    else:
        _print_migration(report)
    return 0 if report.completed else 1


def _print_migration(r) -> None:
    if r.completed:
        print(
            f"migrated {human_size(r.memory_size)} in {r.total_time:.2f} s "
            f"({len(r.rounds)} rounds), downtime {r.downtime * 1000:.1f} ms, "
            f"{human_size(r.bytes_sent)} sent"
        )
    else:
        where = "running on the source" if r.source_running else "paused on the source"
        print(f"migration {r.state.value}: {r.error} (guest {where})")
    p = r.pages
    print(f"pages: {p.full} full, {p.compressed} compressed, {p.delta} delta, {p.zero} zero")


def _cmd_plan(args: argparse.Namespace) -> int:
    from live_migrate import planner, session

    bandwidth = args.bandwidth or args.max_bandwidth
    if not bandwidth:
        raise ValueError("--plan needs --bandwidth (or --max-bandwidth)")
    model = dict(
        max_downtime=args.max_downtime / 1000,
        max_rounds=args.max_rounds,
        max_time=args.max_time,
        auto_converge=args.auto_converge,
        scan_rate=args.scan_rate,
    )
    measured = None
    if args.guest:
        result, measured = session.plan_for_guest(args.guest, bandwidth, args.measure, **model)
    else:
        if not args.memory or args.dirty_rate is None:
            raise ValueError("--plan needs --guest, or --memory and --dirty-rate")
        regions = planner.simple_regions(args.dirty_rate, args.working_set or args.memory)
        result = planner.plan(
            args.memory, bandwidth, regions, zero_fraction=args.zero_fraction, **model
        )
    if args.output == "json":
        out = {"plan": to_jsonable(result)}
        if measured is not None:
            out["measured"] = to_jsonable(measured)
        print_json(out)
        return 0
    if measured is not None:
        print(
            f"measured over {measured.seconds:.1f} s: dirty rate "
            f"{measured.dirty_rate / 1e6:.1f} MB/s, working set "
            f"{human_size(measured.working_set)}, {measured.zero_fraction:.0%} zero pages"
        )
    verdict = "converges" if result.converges else "does NOT converge"
    print(f"{verdict}: {result.reason}")
    print(
        f"rounds {result.rounds}, total {result.total_time:.2f} s, downtime "
        f"{result.downtime * 1000:.1f} ms (limit {result.max_downtime * 1000:.0f} ms), "
        f"{human_size(result.bytes_sent)} on the wire"
        + (f", throttle {result.throttle:.0%}" if result.throttle else "")
    )
    return 0 if result.converges else 1


def cmd_receive(args: argparse.Namespace) -> int:
    from live_migrate import session
    from live_migrate.receiver import ReceiverOptions
    from live_migrate.transport import parse_address, tls_server_context

    if args.qemu:
        args.target = f"qemu:{args.qemu}"
    options = ReceiverOptions(hash_memory=args.hash)
    if args.max_memory:
        options.max_memory = args.max_memory
    if args.stdio:
        report = session.receive_stdio(options, target=args.target, keep=args.keep)
        out = sys.stderr  # stdout is the migration stream
    else:
        tls = (
            tls_server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
            if args.tls_cert
            else None
        )

        def listening(addr: tuple[str, int]) -> None:
            print(f"listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

        report = session.receive_on(
            parse_address(args.listen, RECEIVE_PORT),
            options,
            tls=tls,
            target=args.target,
            keep=args.keep,
            on_listening=listening,
            once=args.once,
        )
        out = sys.stdout
    text = json.dumps(to_jsonable(report), indent=4)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.output == "json":
        print(text, file=out)
    elif report.completed:
        print(
            f"received {human_size(report.memory_size)} in {report.rounds} rounds "
            f"({report.pages_received} pages, {human_size(report.bytes_received)}); "
            f"guest resumed",
            file=out,
        )
        if report.memory_sha256:
            print(f"memory sha256 {report.memory_sha256}", file=out)
    else:
        print(f"migration failed: {report.error} (nothing kept here)", file=out)
    return 0 if report.completed else 1

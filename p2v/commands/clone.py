"""P2V commands: `p2v clone`, `p2v sync` and `p2v run` (job files). Thin: parse, call
p2v.clone / p2v.job, print."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from typing import TYPE_CHECKING

from formats.options import parse_option_string
from p2v.commands.fleet import fleet_arguments, rate_argument, run_fleet
from p2v.output import human_size, print_json

if TYPE_CHECKING:
    from p2v.ssh import ConnectOptions

# paramiko and the clone machinery load only when a clone command runs: `p2v` starts fast

TARGETS = ("kvm", "vmware", "virtualbox", "hyperv", "xen")


def _ssh_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--port", type=int, default=22, help="SSH port (default 22)")
    p.add_argument(
        "-i", dest="identity", action="append", default=[], help="private key file (repeatable)"
    )
    p.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    p.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key and record it (a changed key is always refused)",
    )
    p.add_argument("--sudo", action="store_true", help="run the agent through `sudo -n`")
    p.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the SSH password from environment variable VAR (never a command-line value)",
    )
    p.add_argument(
        "--ask-password", action="store_true", help="prompt for the SSH password if keys fail"
    )
    p.add_argument("--no-agent", action="store_true", help="do not use ssh-agent keys")
    p.add_argument("--python", default="python3", help="the server's Python (default python3)")
    p.add_argument(
        "--agent",
        choices=("auto", "python", "shell"),
        default="auto",
        help="the Python agent (Python >= 2.6 on the server), the shell mode (POSIX tools "
        "only), or auto: Python where the server has it (default)",
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--max-bandwidth",
        metavar="RATE",
        type=rate_argument,
        help="take at most RATE bytes/s off the link (40M, 1.5G, 512Ki; default: no cap)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "clone",
        allow_abbrev=False,  # `--password x` must never pass as --password-env
        help="clone a running server's disks over SSH",
        description=(
            "Clone every chosen disk of USER@HOST into images in OUTDIR, with machine.json "
            "describing the server. An imaging agent runs on the server for the copy and "
            "leaves nothing behind. The copy is verified against the server's hashes; a "
            "broken connection is resumed by running the same command again."
        ),
    )
    _ssh_arguments(p)
    p.add_argument("target", metavar="USER@HOST")
    p.add_argument(
        "--disk", action="append", dest="disks", help="disk to clone (repeatable; default: all)"
    )
    p.add_argument("-O", dest="out_fmt", default="qcow2", help="image format (default qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], help="k=v,... options")
    p.add_argument(
        "--skip-unused", action="store_true", help="copy only blocks the filesystems use"
    )
    p.add_argument(
        "--compress", choices=("zlib", "none"), default="zlib", help="compression on the wire"
    )
    p.add_argument("--target", dest="platform", choices=TARGETS, help="write a VM definition")
    p.add_argument("--no-convert-guest", action="store_true",
                   help="with --target: leave the guest as copied (no drivers, fstab, network changes)")  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="skip the hash check after copying")
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="copy LVM logical volumes from a temporary snapshot when the group has room",
    )
    p.add_argument(
        "-W", "--workers", type=int, help="requests and copy threads in flight (default: 6)"
    )
    p.add_argument("outdir", metavar="OUTDIR")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser(
        "sync",
        allow_abbrev=False,
        help="send what changed on a server since its clone",
        description=(
            "Hash the server's disks on the server and the images in OUTDIR here, and copy "
            "only the blocks that differ (a short final sync before cut-over)."
        ),
    )
    _ssh_arguments(p)
    p.add_argument("target", metavar="USER@HOST")
    p.add_argument("--disk", action="append", dest="disks", help="only this disk (repeatable)")
    p.add_argument("--compress", choices=("zlib", "none"), default="zlib")
    p.add_argument("outdir", metavar="OUTDIR")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser(
        "run",
        allow_abbrev=False,
        help="run a job file (several servers)",
        description="Clone (or --sync) the servers a YAML job file lists, a few at a time.",
    )
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--sync", action="store_true", help="sync the clones instead of cloning")
    p.add_argument("-j", "--concurrency", type=int, help="servers at a time (overrides the file)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--no-progress", action="store_true")
    fleet_arguments(p)
    p.set_defaults(func=cmd_run)


def _connect_options(args: argparse.Namespace) -> ConnectOptions:
    from p2v.ssh import ConnectOptions, parse_target

    user, host = parse_target(args.target)
    return ConnectOptions(
        host=host,
        user=user,
        port=args.port,
        key_files=args.identity,
        use_agent=not args.no_agent,
        password_env=args.password_env,
        ask_password=args.ask_password,
        known_hosts=args.known_hosts,
        accept_new_host_key=args.accept_new_host_key,
        sudo=args.sudo,
    )


def _bars(enabled: bool):
    """A progress factory drawing one tqdm bar per disk (with throughput)."""
    if not enabled:
        return None
    from tqdm import tqdm

    lock = threading.Lock()
    count = [0]

    @contextlib.contextmanager
    def factory(label: str, total: int):
        with lock:
            position = count[0]
            count[0] += 1
        bar = tqdm(
            desc=label,
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            position=position,
            leave=True,
        )

        def update(done: int, total_: int) -> None:
            bar.update(done - bar.n)

        try:
            yield update
        finally:
            bar.close()

    return factory


def cmd_clone(args: argparse.Namespace) -> int:
    from p2v import clone as cloning

    if args.workers is None:
        args.workers = cloning.DEFAULT_WORKERS
    options = {}
    for text in args.options:
        options.update(parse_option_string(text))
    opts = cloning.CloneOptions(
        out_format=args.out_fmt,
        options=options,
        disks=args.disks,
        skip_unused=args.skip_unused,
        compress=args.compress == "zlib",
        target=args.platform,
        convert_guest=not args.no_convert_guest,
        verify=not args.no_verify,
        snapshot=args.snapshot,
        workers=args.workers,
        python=args.python,
        max_bandwidth=args.max_bandwidth,
        agent=args.agent,
    )
    bars = _bars(not args.no_progress and sys.stderr.isatty())
    res = cloning.clone(_connect_options(args), args.outdir, opts, progress_factory=bars)
    if args.output == "json":
        print_json(res)
        return 0
    print(f"agent: {res.agent} ({res.agent_reason})")
    for d in res.disks:
        if d.skipped:
            print(f"{d.source}: already cloned to {d.image}")
            continue
        verified = {True: "verified", False: "VERIFY FAILED", None: "not verified"}[d.verified]
        resumed = f", resumed at {human_size(d.resumed_from)}" if d.resumed_from else ""
        print(
            f"{d.source} -> {d.image}: {human_size(d.size)} disk, read {human_size(d.bytes_read)}"
            f" ({human_size(d.bytes_zero)} zero), {human_size(d.bytes_wire)} over the wire, "
            f"{d.seconds:.1f}s{resumed}, {verified} ({d.verified_blocks} blocks)"
        )
    print(f"machine description: {res.machine}")
    if res.definition is not None:
        print(f"{args.platform} definition: {res.definition}")
    if res.conversion is not None:
        from p2v.commands.guest import print_conversion

        print_conversion(res.conversion)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from p2v import clone as cloning

    opts = cloning.SyncOptions(
        compress=args.compress == "zlib",
        python=args.python,
        disks=args.disks,
        max_bandwidth=args.max_bandwidth,
        agent=args.agent,
    )
    bars = _bars(not args.no_progress and sys.stderr.isatty())
    res = cloning.sync(_connect_options(args), args.outdir, opts, progress_factory=bars)
    if args.output == "json":
        print_json(res)
        return 0
    print(f"agent: {res.agent} ({res.agent_reason})")
    for d in res.disks:
        print(
            f"{d.source} -> {d.image}: {d.changed_blocks} of {d.blocks} blocks changed, "
            f"{human_size(d.bytes_wire)} over the wire, {d.seconds:.1f}s"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from p2v import job

    if args.broker or args.estimate:
        return run_fleet(args)
    res = job.run_job(
        args.job,
        action="sync" if args.sync else "clone",
        concurrency=args.concurrency,
        progress_factory=None,
    )
    if args.output == "json":
        print_json(res)
    else:
        for s in res.servers:
            status = "ok" if s.ok else f"FAILED: {s.error}"
            print(f"{s.name}: {status} ({s.seconds:.1f}s)")
        print(f"{len(res.servers) - res.failed} of {len(res.servers)} servers done")
    return 1 if res.failed else 0

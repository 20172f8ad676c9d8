"""Fleet commands: `p2v worker` (serve a broker's tasks) and `p2v status` (a plan's
progress, as text, JSON or a small web page). `p2v run PLAN --broker` lives with `run` in
commands/clone.py. Thin: parse, call p2v.fleet, print."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from p2v.output import human_size, print_json

if TYPE_CHECKING:  # Celery and the plan model load only when a fleet command runs
    from p2v.fleet.status import PlanStatus
    from p2v.job import Plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run fleet tasks from a Redis broker on this host",
        description=(
            "Serve clone and cut-over tasks of fleet plans submitted with "
            "`p2v run PLAN --broker URL`. Run one per worker host."
        ),
    )
    p.add_argument("--broker", required=True, metavar="URL", help="redis://HOST:PORT/N")
    p.add_argument("--concurrency", type=int, default=2, help="servers at a time (default 2)")
    p.add_argument("--spool", metavar="DIR", help="where worker-local outputs go")
    p.add_argument(
        "--lease-seconds", type=float, default=60.0, help="output lease lifetime (default 60)"
    )
    p.add_argument(
        "--visibility-timeout",
        type=float,
        help="seconds before a dead worker's task is handed to another (default 3600)",
    )
    p.add_argument(
        "--retry-delays",
        default="5,15,45",
        help="seconds between attempts to reach an unreachable source (default 5,15,45)",
    )
    p.add_argument(
        "--commit-seconds",
        type=float,
        help="journal a copy's progress this often: what a killed worker may lose (default 30)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "status",
        help="show a fleet plan's progress",
        description="Each server's step, bytes done, throughput, ETA and last error.",
    )
    p.add_argument("plan", nargs="?", metavar="PLAN.yaml")
    p.add_argument("--broker", metavar="URL", help="redis://HOST:PORT/N (default: the plan's)")
    p.add_argument("--serve", metavar="HOST:PORT", help="serve a status page instead")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(func=cmd_status)


def fleet_arguments(p: argparse.ArgumentParser) -> None:
    """`p2v run`'s fleet options (the command itself lives in commands/clone.py)."""
    p.add_argument(
        "--broker", metavar="URL", help="submit to `p2v worker`s on redis://HOST:PORT/N and follow"
    )
    p.add_argument("--wave", type=int, default=1, help="with --broker: start at wave N")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="predict each wave's duration instead of running (servers' used_bytes, or sizes"
        " from a quick inventory)",
    )
    p.add_argument("--workers", type=int, default=1, help="with --estimate: worker hosts")
    p.add_argument("--slots", type=int, default=2, help="with --estimate: servers per worker")
    p.add_argument(
        "--worker-nic",
        type=rate_argument,
        default=1.25e9,
        help="with --estimate: a worker's NIC (10G)",
    )
    p.add_argument(
        "--storage", type=rate_argument, default=4e9, help="with --estimate: output writes (4G)"
    )
    p.add_argument(
        "--link", type=rate_argument, default=125e6, help="with --estimate: a source's link (125M)"
    )


def rate_argument(text: str) -> float:
    """argparse's type for a rate (40M, 1.5G, 512Ki)."""
    from p2v.bandwidth import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_worker(args: argparse.Namespace) -> int:
    from p2v.fleet.worker import run_worker

    try:
        delays = tuple(float(d) for d in args.retry_delays.split(",") if d.strip())
    except ValueError as exc:
        raise ValueError(f"--retry-delays {args.retry_delays!r}: expected seconds,...") from exc
    return run_worker(
        args.broker,
        concurrency=args.concurrency,
        spool=args.spool,
        lease_seconds=args.lease_seconds,
        visibility_timeout=args.visibility_timeout,
        retry_delays=delays,
        commit_seconds=args.commit_seconds,
    )


def _broker(args: argparse.Namespace, plan_broker: str | None) -> str:
    broker = args.broker or plan_broker or os.environ.get("P2V_BROKER")
    if not broker:
        raise ValueError("no broker: pass --broker redis://HOST:PORT/N (or set P2V_BROKER)")
    return broker


def cmd_status(args: argparse.Namespace) -> int:
    from p2v.fleet.status import plan_status

    if args.serve:
        from p2v.fleet.page import serve

        return serve(args.serve, _broker(args, None))
    if not args.plan:
        raise ValueError("name a PLAN.yaml, or --serve HOST:PORT")
    from p2v.job import load_plan

    plan = load_plan(args.plan)
    status = plan_status(plan, _broker(args, plan.broker))
    if args.output == "json":
        print_json(status)
        return 0
    print_status(status)
    return 0


def print_status(status: PlanStatus) -> None:
    for w in status.waves:
        print(f"{w.name}: {w.done} done, {w.failed} failed, {w.running} running of {w.servers}")
        for s in (s for s in status.servers if s.wave == w.index):
            line = f"  {s.name}: {s.state} ({s.step})"
            if s.bytes_total:
                line += f" {human_size(s.bytes_done)} of {human_size(s.bytes_total)}"
            if s.throughput:
                line += f", {human_size(int(s.throughput))}/s"
            if s.eta_seconds is not None:
                line += f", ETA {s.eta_seconds:.0f}s"
            if s.error:
                line += f": {s.error}"
            print(line)


def run_fleet(args: argparse.Namespace) -> int:
    """`p2v run PLAN --broker URL`: the plan's waves submitted to the workers, followed
    until the last wave ends."""
    from p2v.fleet.controller import run_plan
    from p2v.job import load_plan

    plan = load_plan(args.job)  # a malformed plan stops here: nothing is submitted
    if args.estimate:
        return _estimate(args, plan)
    seen: dict[str, tuple[str, str]] = {}

    def on_update(status) -> None:
        if args.output == "json":
            return
        for s in status.servers:
            if seen.get(s.name) != (s.state, s.step):
                seen[s.name] = (s.state, s.step)
                print(
                    f"{s.name}: {s.state} ({s.step}){': ' + s.error if s.error else ''}", flush=True
                )

    status = run_plan(plan, args.broker, first_wave=args.wave - 1, on_update=on_update)
    if args.output == "json":
        print_json(status)
    else:
        print_status(status)
    return 1 if any(s.state == "failed" for s in status.servers) else 0


def _estimate(args: argparse.Namespace, plan: Plan) -> int:
    from p2v.fleet.estimate import Capacity, estimate_run

    cap = Capacity(
        workers=args.workers, slots=args.slots, worker_nic=args.worker_nic, storage=args.storage
    )
    est = estimate_run(plan, cap, default_link=args.link)
    if args.output == "json":
        print_json(est)
        return 0
    for w in est.waves:
        bound = ", ".join(f"{k} {v / w.seconds:.0%}" for k, v in w.bound_by.items() if w.seconds)
        print(
            f"{w.name}: {w.servers} servers, {human_size(w.bytes)} in {_hours(w.seconds)}"
            f" (bound by {bound or 'nothing'})"
        )
    print(f"total: {_hours(est.seconds)} on {est.workers} workers")
    return 0


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

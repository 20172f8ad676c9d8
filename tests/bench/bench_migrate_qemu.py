"""A real QEMU guest migrated by p2v and by QEMU's own `migrate`, in the same run.

The same test guest (tests/live_migrate/guest_image: Debian kernel, a program dirtying
memory at a set rate) with 512 MiB of RAM, of which the program fills 128 MiB with random
words; dirty rates 0, 20 and 100 MB/s. Both tools get the same bandwidth cap (QEMU's
`max-bandwidth`, p2v's `max_bandwidth`) and the same downtime limit (`downtime-limit`,
`max_downtime`), both go over loopback TCP, and each run boots a fresh guest.

Figures:
- total: QEMU's `total-time`; p2v's report total (setup included in both);
- downtime: source paused -> destination resumed, wall clock on this host (QEMU: the STOP
  event on the source to the RESUME event on the destination; p2v: the report's pause
  time to the receiver's resume time). QEMU's own `downtime` figure, which ends when the
  source has sent everything, is shown beside it;
- scan: the final full-memory scan p2v runs while the guest is paused (QEMU reads a dirty
  log instead), with the sending of the pages it finds overlapped; "scan alone" is the
  previous round's scan of the same memory (nothing overlapped, the guest running),
  against which "beyond the scan" is measured;
- bytes: on the wire (QEMU's `ram.transferred` plus its device state; p2v's bytes sent).

Usage: python tests/bench/bench_migrate_qemu.py [--ram MiB] [--mem MiB] [--rates 0,20,100]
       [--cap BYTES_PER_S] [--downtime MS] [--compress zstd|lz4|none] [--no-delta]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from live_migrate.engine import MigrationOptions  # noqa: E402
from live_migrate.guests.qemu import QemuSource  # noqa: E402
from live_migrate.qemu_launcher import QemuProcess  # noqa: E402
from tests.bench.results import record  # noqa: E402
from tests.live_migrate.guest_image.build_guest import build  # noqa: E402
from tests.live_migrate.guest_image.harness import (  # noqa: E402
    Hosts,
    SerialLog,
    Workdir,
    destination_spec,
    guest_spec,
)
from tests.live_migrate.guest_image.migration_run import (  # noqa: E402
    migrate,
    start_destination,
)


@dataclasses.dataclass
class Run:
    tool: str
    rate: int
    total: float  # seconds
    downtime: float  # seconds, paused -> resumed
    bytes: int
    own_downtime: float | None = None  # the tool's own downtime figure
    scan: float | None = None  # p2v: final scan while paused (sending overlapped)
    scan_alone: float | None = None  # p2v: the previous round's scan (nothing overlapped)
    rounds: int = 0
    ok: bool = True
    note: str = ""
    setup: float | None = None  # p2v: handshake, destination target ready
    steps: dict = dataclasses.field(default_factory=dict)  # p2v: the downtime's steps
    round_times: list = dataclasses.field(default_factory=list)  # p2v: (pages, s, scan s)
    final_pages: int = 0  # p2v: pages sent while paused
    final_bytes: int = 0
    load: float | None = None  # p2v: the destination QEMU's load of the device state


def _boot(source_spec, *, attach: bool):
    if attach:
        guest = QemuSource.launch(source_spec)
        alive = guest.process.is_alive
    else:
        with open(source_spec.ram_path, "wb") as f:
            f.truncate(source_spec.ram_size)
        guest = QemuProcess(source_spec)
        alive = guest.is_alive
    log = SerialLog(source_spec.serial_log)
    log.wait_tick(3, timeout=180, alive=alive)
    time.sleep(1.0)  # a steady dirtying pattern before the migration starts
    return guest, log


def run_p2v(image, args, rate: int, hosts: Hosts) -> Run:
    work = Workdir()
    spec = guest_spec(image, work, "src", ram_mib=args.ram, mem_mib=args.mem, rate_mb=rate)
    source, _ = _boot(spec, attach=True)
    # the destination QEMU runs before the migration starts, as QEMU's own does
    dest = start_destination(hosts, work, destination_spec(spec, work), attach=True)
    try:
        options = MigrationOptions(
            max_downtime=args.downtime / 1000,
            max_bandwidth=args.cap,
            compress=None if args.compress == "none" else args.compress,
            delta=args.delta,
            max_time=300,
        )
        report = migrate(source, hosts, dest, options)
        dest.process.wait(60)
        received = dest.report() or {}
        dest.read_qemu_pid(timeout=1)
        ok = report.completed and bool(received.get("completed"))
        resumed_at = received.get("resumed_at")
        paused_at = getattr(report, "paused_at", None)
        downtime = resumed_at - paused_at if resumed_at and paused_at else (report.downtime or 0.0)
        final = report.rounds[-1] if report.rounds else None
        return Run(
            "p2v",
            rate,
            report.total_time,
            downtime,
            report.bytes_sent,
            own_downtime=report.downtime,
            scan=final.scan_time if final is not None and final.final else None,
            scan_alone=report.rounds[-2].scan_time if len(report.rounds) > 1 else None,
            rounds=len(report.rounds),
            ok=ok,
            note=report.error or "",
            setup=report.setup_time,
            steps={k: round(v, 4) for k, v in report.switch_over.items()},
            round_times=[
                (r.pages_sent, round(r.duration, 3), round(r.scan_time, 3)) for r in report.rounds
            ],
            final_pages=final.pages_sent if final is not None and final.final else 0,
            final_bytes=final.bytes_sent if final is not None and final.final else 0,
            load=received.get("load_seconds"),
        )
    finally:
        dest.cleanup()
        source.close()
        if source.process is not None:
            source.process.kill()
        work.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _event_time(event: dict) -> float:
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def run_qemu(image, args, rate: int) -> Run:
    work = Workdir()
    spec = guest_spec(image, work, "src", ram_mib=args.ram, mem_mib=args.mem, rate_mb=rate)
    source, _ = _boot(spec, attach=False)
    # the destination resumes by itself (no -S) so that its RESUME event marks the end
    dst_spec = dataclasses.replace(destination_spec(spec, work), incoming=False)
    dst_spec.extra_args = ["-incoming", "defer"]
    with open(dst_spec.ram_path, "wb") as f:
        f.truncate(dst_spec.ram_size)
    dest = QemuProcess(dst_spec)
    try:
        port = _free_port()
        for q in (source.qmp, dest.qmp):
            q.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
        source.qmp.execute(
            "migrate-set-parameters",
            {"max-bandwidth": int(args.cap), "downtime-limit": int(args.downtime)},
        )
        dest.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        source.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + 300
        while True:
            info = source.qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                source.qmp.execute("migrate_cancel")
                raise SystemExit("QEMU's migration did not finish in 300 s")
            time.sleep(0.02)
        for _ in range(100):
            # QEMU says "completed" a moment before it fills in total-time and downtime
            if info.get("status") != "completed" or info.get("total-time"):
                break
            time.sleep(0.005)
            info = source.qmp.execute("query-migrate")
        stop = source.qmp.wait_event("STOP", timeout=10)
        resume = dest.qmp.wait_event("RESUME", timeout=30)
        ram = info.get("ram", {})
        return Run(
            "qemu",
            rate,
            info.get("total-time", 0) / 1000,
            _event_time(resume) - _event_time(stop),
            int(ram.get("transferred", 0)),
            own_downtime=info.get("downtime", 0) / 1000,
            rounds=int(ram.get("dirty-sync-count", 0)),
            ok=info.get("status") == "completed",
            note=info.get("error-desc", ""),
        )
    finally:
        source.kill()
        dest.kill()
        work.cleanup()


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", type=int, default=512, help="guest RAM, MiB")
    ap.add_argument("--mem", type=int, default=128, help="MiB the guest fills and dirties")
    ap.add_argument("--rates", default="0,20,100", help="dirty rates, MB/s")
    ap.add_argument("--cap", type=float, default=125e6, help="bandwidth cap, bytes/s")
    ap.add_argument("--downtime", type=float, default=300, help="downtime limit, ms")
    ap.add_argument("--compress", default="none", choices=("none", "zstd", "lz4"))
    ap.add_argument(
        "--no-delta",
        dest="delta",
        action="store_false",
        help="resend dirty pages whole (default: as word deltas against the copy the scan "
        "keeps anyway, XBZRLE's idea; QEMU's xbzrle stays off, its default)",
    )
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    image = build()
    hosts = Hosts()
    hosts.close()  # loopback for both tools: the same link
    rows: list[tuple[Run, Run]] = []
    try:
        for rate in (int(r) for r in args.rates.split(",")):
            print(f"dirty rate {rate} MB/s: QEMU migrate...", flush=True)
            q = run_qemu(image, args, rate)
            print(f"  {json.dumps(dataclasses.asdict(q))}", flush=True)
            print(f"dirty rate {rate} MB/s: p2v...", flush=True)
            p = run_p2v(image, args, rate, hosts)
            print(f"  {json.dumps(dataclasses.asdict(p))}", flush=True)
            rows.append((p, q))
    finally:
        hosts.close()

    lines = [
        f"Guest: {args.ram} MiB RAM ({image.accel.upper()}), {args.mem} MiB of random data "
        f"dirtied at the given rate; cap {args.cap / 1e6:.0f} MB/s, downtime limit "
        f"{args.downtime:.0f} ms, loopback TCP, p2v compression {args.compress}, p2v "
        f"deltas {'on' if args.delta else 'off'} (QEMU: its defaults, no xbzrle). "
        "Downtime = source paused -> destination resumed (wall clock); QEMU's own figure "
        "(end of sending) in brackets; final scan = p2v's scan while paused, the sending "
        "of the pages it finds overlapped; scan alone = the previous round's scan of the "
        "same memory with nothing overlapped; beyond the scan = downtime - scan alone.",
        "",
        "| dirty MB/s | tool | ok | total | downtime | final scan | scan alone "
        "| beyond the scan | bytes | total ratio | downtime ratio | bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for p, q in rows:
        lines.append(
            f"| {q.rate} | QEMU | {q.ok} | {q.total:.2f} s | {_ms(q.downtime)} "
            f"({_ms(q.own_downtime)}) | - | - | - | {q.bytes / 1e6:.1f} MB | | | |"
        )
        rest = p.downtime - (p.scan_alone or p.scan or 0.0)
        lines.append(
            f"| {p.rate} | p2v | {p.ok} | {p.total:.2f} s | {_ms(p.downtime)} "
            f"({_ms(p.own_downtime)}) | {_ms(p.scan)} | {_ms(p.scan_alone)} | {_ms(rest)} "
            f"| {p.bytes / 1e6:.1f} MB | {p.total / q.total:.2f} "
            f"| {p.downtime / q.downtime:.1f} | {p.bytes / q.bytes:.2f} |"
        )
        verdicts.append(
            f"- {p.rate} MB/s: downtime under the limit: {p.downtime * 1000 < args.downtime}; "
            f"within scan + 20 ms: {rest <= 0.020} ({rest * 1000:.0f} ms beyond the scan); "
            f"bytes <= QEMU's: {p.bytes <= q.bytes}; total within 1.5x: "
            f"{p.total <= 1.5 * q.total}"
            + (f"; p2v: {p.note}" if p.note else "")
            + (f"; QEMU: {q.note}" if q.note else "")
        )
    breakdown = [
        "p2v's downtime step by step (ms): pause = QMP stop; scan = the final scan, with "
        "the encoding and sending of the pages it finds; send = the rest of that sending; "
        "device state = "
        "waiting for QEMU's hand-off (it runs during the scan) and sending it; acknowledge "
        "= END -> ACK: the destination applies the last pages, checks the digest and loads "
        "the device state into its QEMU (load, in brackets); resume = GO -> cont -> "
        "RESUMED. Rounds: pages sent / round duration (s).",
        "",
        "| dirty MB/s | rounds | final pages (wire) | pause | scan | send | device state "
        "| acknowledge (load) | resume | beyond the scan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, _ in rows:
        st = p.steps
        rounds = ", ".join(f"{n}/{d:.2f}" for n, d, _ in p.round_times[:-1])
        breakdown.append(
            f"| {p.rate} | {rounds} | {p.final_pages} ({p.final_bytes / 1e3:.0f} kB) "
            f"| {_ms(st.get('pause'))} | {_ms(st.get('collect'))} | {_ms(st.get('send'))} "
            f"| {_ms(st.get('device_state'))} | {_ms(st.get('acknowledge'))} "
            f"({_ms(p.load)}) | {_ms(st.get('resume'))} "
            f"| {_ms(p.downtime - (p.scan_alone or p.scan or 0.0))} |"
        )
    body = "\n".join([*lines, "", *breakdown, "", "Targets:", *verdicts])
    print(body)
    if not args.no_record:
        record("bench_migrate_qemu", body, "python tests/bench/bench_migrate_qemu.py")
    return 0 if all(p.ok and q.ok for p, q in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

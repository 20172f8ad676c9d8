"""Live migration of synthetic guests over loopback, against the pre-copy model.

Guests of 1 GiB and 4 GiB (the sim guest's mixed fill: about a quarter zero pages, a
quarter text, half random), four workloads:

- idle;
- hot set: 64 MiB rewritten at 100 MB/s (every write in the hot set);
- uniform: 50 MB/s of writes anywhere;
- write-heavy: 250 MB/s anywhere, twice what a 1 Gbit/s link carries (auto-converge on);

on a link left uncapped (loopback TCP) and capped at 1 Gbit/s (125 MB/s, the engine's
bandwidth cap). Dirty pages come from the sim guest's dirty log; the 1 GiB uncapped
cases run again with the scan (the path a QEMU guest takes).

The destination's memory is allocated as pages arrive (zero pages never are), like a
QEMU started with -incoming; touching fresh memory costs about 1 s per GiB on the
development VMs, which then bounds round 0. So each size's idle guest runs once more
with the destination's memory preallocated (QEMU's -mem-prealloc; in the setup time):
that round 0 measures the engine and the link alone.

For each run: total time, downtime (measured: pause -> destination's RESUMED) and bytes
on the wire, beside the model's prediction for the same memory, workload, zero fraction
and bandwidth (live_migrate/planner.py; docs/migration.md), and the ratio bytes sent /
model bytes. Uncapped runs also give the rate at which round 0 moved pages (memory
bytes, zero pages included, per second).

Peer: QEMU's own migration of an idle guest of the same size (TCG, RAM never written by
the guest), same host, same run. Its memory is almost all zero pages, so it is compared
with a sim guest of zero fill; the ratio is p2v total time / QEMU total time.

Usage: python tests/bench/bench_migrate.py [--quick] [--no-4g] [--no-qemu]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from live_migrate import planner  # noqa: E402
from live_migrate.engine import Migration, MigrationOptions  # noqa: E402
from live_migrate.guests.sim import SimGuest, parse_spec  # noqa: E402
from live_migrate.planner import Region  # noqa: E402
from live_migrate.transport import open_channels  # noqa: E402
from tests.bench.results import record  # noqa: E402
from tests.live_migrate.receiver_process import start_receiver  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
LINK = 125e6  # 1 Gbit/s
MAX_DOWNTIME = 0.300

WORKLOADS = {
    # name: (sim options, model regions for a guest of `size`, auto-converge)
    "idle": ("workload=idle", lambda size: [], False),
    "hot 64M @100MB/s": (
        "workload=hotset,hot=64M,skew=1,rate=100000000",
        lambda size: [Region(64 * MiB, 100e6)],
        False,
    ),
    "uniform @50MB/s": (
        "workload=uniform,rate=50000000",
        lambda size: [Region(size, 50e6)],
        False,
    ),
    "write-heavy @250MB/s": (
        "workload=uniform,rate=250000000",
        lambda size: [Region(size, 250e6)],
        True,
    ),
}


def run(
    size: int,
    workload: str,
    cap: float | None,
    dirty: str = "log",
    fill: str = "mixed",
    prealloc: bool = False,
):
    sim, regions, auto = WORKLOADS[workload]
    spec = f"sim:{size},{sim},dirty={dirty},fill={fill}"
    # the previous run's guest (a GiB or more of shared memory) may wait in a reference
    # cycle: unmapping it costs 0.3 s of CPU per GiB, which must not fall in this run
    gc.collect()
    receiver = start_receiver("--no-hash", *(["--prealloc"] if prealloc else []))
    try:
        with SimGuest(parse_spec(spec)) as guest:
            mem = np.frombuffer(guest.memory(), dtype=np.uint64).reshape(-1, 512)
            zero = float((~mem.any(axis=1)).mean())
            options = MigrationOptions(
                max_downtime=MAX_DOWNTIME, max_bandwidth=cap, auto_converge=auto, max_rounds=60
            )
            report = Migration(guest, open_channels(receiver.address, 1), options).run()
            written = guest.pages_written
        result = receiver.result(timeout=600)
    finally:
        receiver.kill()
    if not report.completed or not result["completed"]:
        raise SystemExit(f"{spec}: {report.error} / {result['error']}")
    first = report.rounds[0]
    bandwidth = cap or first.bandwidth
    scan_rate = None
    if dirty == "scan":
        scan_rate = size / max(r.scan_time for r in report.rounds[:-1])
    model = planner.plan(
        size,
        bandwidth,
        regions(size),
        max_downtime=MAX_DOWNTIME,
        zero_fraction=zero,
        auto_converge=auto,
        max_rounds=60,
        scan_rate=scan_rate,
    )
    return {
        "size": size,
        "workload": workload,
        "cap": cap,
        "dirty": dirty,
        "prealloc": prealloc,
        "total": report.total_time,
        "setup": report.setup_time,
        "downtime": report.downtime,
        "expected": report.expected_downtime,
        "switch_over": report.switch_over,
        "bytes": report.bytes_sent,
        "rounds": len(report.rounds),
        "throttle": report.throttle,
        "page_rate": first.pages_sent * 4096 * first.bandwidth / first.bytes_sent,
        "bandwidth": first.bandwidth,
        "model_total": model.total_time,
        "model_downtime": model.downtime,
        "model_bytes": model.bytes_sent,
        "model_converges": model.converges,
        "written_pages": written,
    }


# -- QEMU's own migration, the peer --------------------------------------------------


def _qmp(path: str):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())

    def call(cmd: str, **args):
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    raise RuntimeError(f"{cmd}: {msg['error']}")
                return msg["return"]

    call("qmp_capabilities")
    return call


def qemu_migration(size: int) -> dict | None:
    """Migrate an idle TCG guest of `size` bytes with QEMU itself over loopback."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    work = tempfile.mkdtemp(prefix="p2v-bench-qemu-")
    port = _free_port()
    base = [
        qemu,
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "pc,accel=tcg",
        "-m",
        f"{size // MiB}M",
    ]
    src = subprocess.Popen(
        [*base, "-qmp", f"unix:{work}/src.sock,server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dst = subprocess.Popen(
        [
            *base,
            "-qmp",
            f"unix:{work}/dst.sock,server=on,wait=off",
            "-incoming",
            f"tcp:127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        qs = _qmp(f"{work}/src.sock")
        _qmp(f"{work}/dst.sock")
        time.sleep(1.0)  # firmware runs, then the guest idles
        qs("migrate-set-parameters", **{"max-bandwidth": 100 * GiB, "downtime-limit": 300})
        qs("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = qs("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if info["status"] != "completed":
            return None
        ram = info["ram"]
        return {
            "total": info["total-time"] / 1000,
            "downtime": info["downtime"] / 1000,
            "bytes": ram["transferred"],
            "zero_pages": ram["duplicate"],
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- report ---------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def table(rows: list[dict]) -> str:
    out = [
        "| guest | workload | link | dirty pages | total (model) | setup | downtime (model) "
        "[engine's prediction] | bytes sent (model) | bytes / model | rounds | "
        "round-0 page rate (capped: wire rate) | throttle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        link = "1 Gbit/s" if r["cap"] else "uncapped"
        # capped: the wire rate round 0 reached, against the cap the model assumes
        rate = (
            f"wire {r['bandwidth'] / 1e6:.0f} MB/s"
            if r["cap"]
            else f"{r['page_rate'] / 1e9:.2f} GB/s"
        )
        dirty = r["dirty"] + (", destination preallocated" if r["prealloc"] else "")
        out.append(
            f"| {_size(r['size'])} | {r['workload']} | {link} | {dirty} | "
            f"{r['total']:.2f} s ({r['model_total']:.2f}) | {r['setup']:.2f} s | "
            f"{r['downtime'] * 1000:.0f} ms ({r['model_downtime'] * 1000:.0f}) "
            f"[{r['expected'] * 1000:.0f}] | "
            f"{_size(r['bytes'])} ({_size(r['model_bytes'])}) | "
            f"{r['bytes'] / r['model_bytes']:.3f} | {r['rounds']} | {rate} | "
            f"{r['throttle']:.0%} |"
        )
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    notes = []
    idle = [r for r in rows if not r["cap"] and r["workload"] == "idle" and r["dirty"] == "log"]
    pre = [r for r in idle if r["prealloc"]]
    lazy = [r for r in idle if not r["prealloc"]]
    if pre:
        worst = min(r["page_rate"] for r in pre)
        notes.append(
            f"- uncapped loopback moves at least 1 GB/s of pages (idle guests, round 0, "
            f"destination memory allocated beforehand): slowest {worst / 1e9:.2f} GB/s: "
            f"{'met' if worst >= 1e9 else 'NOT met'}"
        )
    if lazy:
        worst = min(r["page_rate"] for r in lazy)
        notes.append(
            f"- the same into fresh destination memory (the default: pages faulted in as "
            f"they arrive): slowest {worst / 1e9:.2f} GB/s"
        )
    capped = [r for r in rows if r["cap"]]
    if capped:
        far = max(capped, key=lambda r: abs(r["bytes"] / r["model_bytes"] - 1))
        worst = abs(far["bytes"] / far["model_bytes"] - 1)
        notes.append(
            f"- under the cap, bytes sent within 10% of the model: worst {worst:.1%} "
            f"({_size(far['size'])} {far['workload']}, round 0 on the wire at "
            f"{far['bandwidth'] / 1e6:.0f} MB/s against the {LINK / 1e6:.0f} MB/s the model "
            f"assumes): {'met' if worst <= 0.10 else 'NOT met'}"
        )
    over = [r for r in rows if r["downtime"] > MAX_DOWNTIME]
    longest = max(rows, key=lambda r: r["downtime"])
    steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in longest["switch_over"].items())
    notes.append(
        f"- downtime under {MAX_DOWNTIME * 1000:.0f} ms in every converging case: "
        + ("met" if not over else f"NOT met in {len(over)} case(s)")
        + f"; longest {longest['downtime'] * 1000:.0f} ms ({_size(longest['size'])} "
        f"{longest['workload']}, {'capped' if longest['cap'] else 'uncapped'}: {steps})"
    )
    heavy = [r for r in rows if "write-heavy" in r["workload"]]
    if heavy:
        throttles = ", ".join(f"{r['throttle']:.0%}" for r in heavy)
        notes.append(
            f"- write-heavy cases finish with auto-converge: {len(heavy)} of {len(heavy)} "
            f"completed, highest throttle per case {throttles}"
        )
    return notes


def _parse_case(text: str) -> dict:
    size, workload, link, *flags = (p.strip() for p in text.split(","))
    names = [w for w in WORKLOADS if w.startswith(workload)]
    if len(names) != 1 or link not in ("uncapped", "capped") or set(flags) - {"scan", "prealloc"}:
        raise SystemExit(f"--case {text!r}: see --help")
    return dict(
        size=int(size.upper().removesuffix("G")) * GiB,
        workload=names[0],
        cap=LINK if link == "capped" else None,
        dirty="scan" if "scan" in flags else "log",
        prealloc="prealloc" in flags,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 GiB, two workloads")
    ap.add_argument("--no-4g", action="store_true")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument(
        "--case",
        action="append",
        metavar="SIZE,WORKLOAD,LINK[,scan][,prealloc]",
        help="run only this case and record nothing (repeatable), e.g. "
        "'1G,idle,uncapped,prealloc' or '4G,uniform,capped'; WORKLOAD is a prefix of "
        f"one of: {', '.join(WORKLOADS)}",
    )
    args = ap.parse_args()
    if args.case:
        for case in args.case:
            row = run(**_parse_case(case))
            print(table([row]))
        return 0
    sizes = [GiB] if args.quick or args.no_4g else [GiB, 4 * GiB]
    workloads = ["idle", "hot 64M @100MB/s"] if args.quick else list(WORKLOADS)
    load = [os.getloadavg()[0]]
    rows = []
    for size in sizes:
        for cap in (None, LINK):
            for workload in workloads:
                row = run(size, workload, cap)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        # the engine and the link alone: the destination's memory is touched before
        # the migration (about 1 s per GiB on these VMs when it is touched during it)
        row = run(size, "idle", None, prealloc=True)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        load.append(os.getloadavg()[0])
    if not args.quick:
        for workload in ("idle", "hot 64M @100MB/s"):
            row = run(GiB, workload, None, dirty="scan")
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    peer = []
    if not args.no_qemu:
        for size in sizes:
            q = qemu_migration(size)
            if q is None:
                continue
            ours = run(size, "idle", None, fill="zero")
            peer.append(
                f"| {_size(size)} idle | {ours['total']:.2f} s, {ours['downtime'] * 1000:.0f} ms, "
                f"{_size(ours['bytes'])} | {q['total']:.2f} s, {q['downtime'] * 1000:.0f} ms, "
                f"{_size(q['bytes'])} | **{ours['total'] / q['total']:.2f}** |"
            )
            print(peer[-1], flush=True)
    load.append(os.getloadavg()[0])
    body = [
        f"Synthetic guests (sim, mixed fill) migrated between two processes over 127.0.0.1, "
        f"max downtime {MAX_DOWNTIME * 1000:.0f} ms, one channel, no compression, dirty log "
        f"unless marked scan. The model: live_migrate/planner.py with the run's zero fraction, "
        f"the workload's regions and the bandwidth (the cap, or round 0's measured rate when "
        f"uncapped). Times include setup (handshake, buffers, the destination's memory "
        f"when preallocated) but not the guest's creation (filling its memory); "
        f"downtime is measured from the pause on the source to the destination's RESUMED; "
        f"in brackets the engine's last prediction before it paused. The machine is shared: "
        f"load average {', '.join(f'{x:.1f}' for x in load)} (1 min, sampled during the "
        f"run) on 2 cores.",
        "",
        table(rows),
        "",
        *targets(rows),
    ]
    if peer:
        body += [
            "",
            "Against QEMU's own migration (QEMU 7.2, TCG, idle guest: RAM never written, "
            "nearly all zero pages; p2v side: sim guest with zero fill). Ratio = p2v total "
            "time / QEMU total time.",
            "",
            "| guest | p2v: total, downtime, sent | QEMU: total, downtime, sent | ratio |",
            "|---|---|---|---|",
            *peer,
        ]
    record("bench_migrate", "\n".join(body), "python tests/bench/bench_migrate.py")
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())

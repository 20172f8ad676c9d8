"""VHD, VHDX and VDI conversion speed against qemu-img, side by side in one run.

Writes each format from the 4 GiB bench disk (raw, ~1.2 GiB of data) and reads each back
to raw from a copy qemu-img made, timing `p2v convert` and `qemu-img convert` alternately
(best of N), and records wall-time ratios and output sizes in RESULTS.md.
Usage: python tests/bench/bench_vhd_vhdx_vdi.py [--cases a,b] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from tests.bench.bench_convert import DISK, WORK, drop, ensure_inputs, timed  # noqa: E402
from tests.bench.results import filesystem, record  # noqa: E402

SRC = {fmt: os.path.join(WORK, f"disk4g.{fmt}") for fmt in ("vpc", "vhdx", "vdi")}

# name: (source, source format, output format, -o options)
CASES: dict[str, tuple[str, str, str, str]] = {
    # the engine and the raw writer alone: what the format cases are measured against
    "raw->raw (baseline)": (DISK, "raw", "raw", ""),
    "raw->vhd dynamic": (DISK, "raw", "vpc", ""),
    "raw->vhd fixed": (DISK, "raw", "vpc", "subformat=fixed"),
    "raw->vhdx dynamic": (DISK, "raw", "vhdx", ""),
    "raw->vhdx fixed": (DISK, "raw", "vhdx", "subformat=fixed"),
    "raw->vdi dynamic": (DISK, "raw", "vdi", ""),
    "raw->vdi static": (DISK, "raw", "vdi", "static=on"),
    "vhd->raw": (SRC["vpc"], "vpc", "raw", ""),
    "vhdx->raw": (SRC["vhdx"], "vhdx", "raw", ""),
    "vdi->raw": (SRC["vdi"], "vdi", "raw", ""),
}


def ensure_sources() -> None:
    ensure_inputs()
    for fmt, path in SRC.items():
        if not os.path.exists(path):
            subprocess.run(["qemu-img", "convert", "-O", fmt, DISK, path + ".tmp"], check=True)
            os.replace(path + ".tmp", path)


def used_mib(path: str) -> float:
    return os.stat(path).st_blocks * 512 / 2**20


def run_case(name: str, repeat: int) -> dict:
    src, src_fmt, fmt, opts = CASES[name]
    out = os.path.join(WORK, "out-vx.img")
    o = ["-o", opts] if opts else []
    p2v = [sys.executable, "-m", "p2v", "convert", "-f", src_fmt, "-O", fmt, *o, src, out]
    # p2v fsyncs what it writes; qemu-img does not, so its output is synced inside the
    # timing too: both runs end with the data on disk
    qemu_convert = ["qemu-img", "convert", "-f", src_fmt, "-O", fmt, *o, src, out]
    qemu = ["sh", "-c", f"{shlex.join(qemu_convert)} && sync {shlex.quote(out)}"]
    best: dict[str, float] = {}
    size: dict[str, float] = {}
    for i in range(repeat):
        order = [("p2v", p2v), ("qemu", qemu)]
        if i % 2:
            order.reverse()
        for label, cmd in order:
            drop(out)
            subprocess.run(["sync"])
            wall, _ = timed(cmd)
            best[label] = min(wall, best.get(label, wall))
            size[label] = used_mib(out)
            if label == "p2v" and i == 0:
                res = subprocess.run(
                    ["qemu-img", "compare", "-f", src_fmt, "-F", fmt, src, out],
                    capture_output=True,
                    text=True,
                )
                if res.returncode != 0:
                    raise SystemExit(f"{name}: p2v output differs from its source: {res.stdout}")
    drop(out)
    return {"best": best, "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ensure_sources()
    names = args.cases.split(",") if args.cases else list(CASES)
    storage = f"{filesystem(WORK)}, cache warm"
    rows = []
    for name in names:
        r = run_case(name, args.repeat)
        p, q = r["best"]["p2v"], r["best"]["qemu"]
        line = (
            f"| {name} | {storage} | {p:.2f} s, {r['size']['p2v']:.0f} MiB | {q:.2f} s, "
            f"{r['size']['qemu']:.0f} MiB | **{p / q:.2f}** |"
        )
        print(line, flush=True)
        rows.append(line)
    if args.cases:
        print("(a partial run: printed, not recorded; one table, one run)")
        return
    body = (
        "4 GiB bench disk (raw, ~1.2 GiB of data); the read cases start from qemu-img's "
        "conversion of it. Both sides end with the output on disk (p2v fsyncs; qemu-img is "
        "followed by `sync FILE` inside the timing); p2v's time includes starting Python. "
        f"Best of {args.repeat} alternating runs from this one run of one commit, page cache "
        "warm (the source is read in every run); sizes are blocks used. "
        "Ratio = p2v time / qemu-img time. VHD output is checked with qemu-img compare "
        "(qemu-img check has no vpc support).\n\n"
        "| case | filesystem, cache | p2v | qemu-img | ratio |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    record("bench_vhd_vhdx_vdi", body, "python tests/bench/bench_vhd_vhdx_vdi.py")


if __name__ == "__main__":
    main()

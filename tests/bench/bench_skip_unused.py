"""Copying only used blocks: `p2v convert --skip-unused` against plain `p2v convert` and
against `partclone.ext4 -c`, on the ext4 partition of the 4 GiB bench disk.

Two disks: the bench disk as built (free space never written: zeros, which a plain copy
skips anyway) and a "dirty" copy whose ext4 free space holds 2 GiB of a deleted file, as
a disk that has lived does. Each tool's output is synced inside the timing (partclone
does not fsync; p2v does). Best of N alternating runs, page cache warm. partclone reads
the partition through a read-only loop device (it needs root).

Usage: python tests/bench/bench_skip_unused.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from samples.disk import MiB, build_disk  # noqa: E402
from tests.bench.results import filesystem, record  # noqa: E402

WORK = os.environ.get("P2V_BENCH_DIR", "/var/tmp/p2v-bench")
DISK = os.path.join(WORK, "disk4g.raw")
DIRTY = os.path.join(WORK, "disk4g-dirty.raw")
EXT4_PARTITION = 2
JUNK = 2048 * MiB


def sh(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    return res.stdout


def ext4_partition(disk: str) -> tuple[int, int]:
    import formats
    from formats.partitions import read_table

    with formats.open(disk, "raw") as img:
        p = read_table(img).partition(EXT4_PARTITION)
    return p.start, p.size


def ensure_disks() -> None:
    os.makedirs(WORK, exist_ok=True)
    if not os.path.exists(DISK):  # the same disk (and path) bench_convert.py builds
        print("building the 4 GiB bench disk (once)...", flush=True)
        build_disk(
            DISK + ".tmp",
            4096 * MiB,
            fat_size=256 * MiB,
            libs=450 * MiB,
            text=450 * MiB,
            rand=300 * MiB,
        )
        os.replace(DISK + ".tmp", DISK)
    if os.path.exists(DIRTY):
        return
    print("making the dirty copy: 2 GiB written to the ext4 partition, then deleted...", flush=True)
    tmp = DIRTY + ".tmp"
    sh("cp", "--sparse=always", DISK, tmp)
    start, _ = ext4_partition(tmp)
    junk = os.path.join(WORK, "junk.bin")
    block = os.urandom(MiB)
    with open(junk, "wb") as f:
        for i in range(JUNK // MiB):
            f.write(block[i % 251 :] + block[: i % 251])
    fs = f"{tmp}?offset={start}"
    sh("debugfs", "-w", "-R", f"write {junk} junk", fs)
    sh("debugfs", "-w", "-R", "rm junk", fs)
    os.unlink(junk)
    sh("e2fsck", "-fn", fs)
    os.replace(tmp, DIRTY)


def timed(cmd: list[str], out: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    sh("sync", out)
    return time.perf_counter() - t0


def drop(*paths: str) -> None:
    for p in paths:
        for q in (p, p + ".partial"):
            if os.path.exists(q):
                os.unlink(q)


def written(path: str) -> int:
    return os.stat(path).st_blocks * 512


def run_disk(disk: str, repeat: int) -> dict[str, tuple[float, int]]:
    """{tool: (best seconds, bytes written)} on the ext4 partition of `disk`."""
    sh("dd", f"if={disk}", "of=/dev/null", "bs=8M", "status=none")  # warm the page cache
    start, size = ext4_partition(disk)
    out = os.path.join(WORK, "skip-out.img")
    loop = sh("losetup", "-f", "--show", "-r", "-o", str(start), "--sizelimit", str(size), disk)
    loop = loop.strip()
    p2v = [sys.executable, "-m", "p2v", "convert", "-f", "raw", "--partition", str(EXT4_PARTITION)]
    cmds = {
        "p2v --skip-unused": [*p2v, "--skip-unused", "-O", "raw", disk, out],
        "p2v plain": [*p2v, "-O", "raw", disk, out],
        "partclone.ext4 -c": [
            "partclone.ext4",
            "-q",
            "-c",
            "-s",
            loop,
            "-o",
            out,
            "-L",
            os.path.join(WORK, "pc.log"),
        ],
    }
    best: dict[str, tuple[float, int]] = {}
    try:
        for i in range(repeat):
            order = list(cmds.items())
            if i % 2:
                order.reverse()
            for name, cmd in order:
                drop(out)
                sh("sync")
                wall = timed(cmd, out)
                size_out = written(out)
                if name == "p2v --skip-unused" and i == 0:
                    sh("e2fsck", "-fn", out)  # the copy is a sound filesystem
                prev = best.get(name)
                best[name] = (min(wall, prev[0]) if prev else wall, size_out)
    finally:
        drop(out)
        sh("losetup", "-d", loop)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for tool in ("partclone.ext4", "debugfs", "losetup"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make deps`")
    if os.geteuid() != 0:
        raise SystemExit("partclone needs a loop device: run as root")
    ensure_disks()
    rows = []
    results = {}
    storage = f"{filesystem(WORK)}, cache warm"
    for label, disk in (("clean", DISK), ("dirty", DIRTY)):
        r = run_disk(disk, args.repeat)
        results[label] = r
        ours, plain, pc = r["p2v --skip-unused"], r["p2v plain"], r["partclone.ext4 -c"]
        line = (
            f"| {label} | {storage} | {ours[0]:.2f} s, {ours[1] / MiB:.0f} MiB | {plain[0]:.2f} s, "
            f"{plain[1] / MiB:.0f} MiB | {pc[0]:.2f} s, {pc[1] / MiB:.0f} MiB | "
            f"**{ours[0] / pc[0]:.2f}** | {ours[1] / pc[1]:.2f} | {ours[0] / plain[0]:.2f} | "
            f"{ours[1] / plain[1]:.2f} |"
        )
        print(line, flush=True)
        rows.append(line)
    print(json.dumps(results, indent=2))
    body = (
        "The ext4 partition (3.75 GiB, ~1.2 GiB of files) of the 4 GiB bench disk; `dirty`: "
        "the same disk after a 2 GiB file was written and deleted. Output raw (p2v) or "
        "partclone's image file, synced inside the timing; bytes are what the output "
        f"occupies on disk. Best of {args.repeat} alternating runs from this one run of one "
        "commit, page cache warm (each disk is read once before its runs).\n\n"
        "| disk | filesystem, cache | p2v --skip-unused | p2v plain | partclone.ext4 -c | time vs partclone | "
        "bytes vs partclone | time vs plain | bytes vs plain |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    record("bench_skip_unused", body, "python tests/bench/bench_skip_unused.py")


if __name__ == "__main__":
    main()

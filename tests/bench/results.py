"""Recording benchmark results in RESULTS.md: one section per benchmark, replaced whole on
rerun (one run of one commit per table), with the machine and the commit it ran on.
P2V_BENCH_RECORD=0 prints the section instead (a trial run on a small size)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = "# Benchmark results\n\nRatios are p2v / peer, measured in the same run (< 1.0: p2v is faster).\n"


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
    qemu_v = qemu.splitlines()[0] if qemu else "qemu-img absent"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {qemu_v}"
    )


def commit() -> str:
    """The commit the benchmark ran on, marked when the code differs from it."""
    git = ["git", "-C", os.path.dirname(os.path.dirname(os.path.dirname(RESULTS)))]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "unknown commit"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "formats", "p2v", "live_migrate"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def filesystem(path: str) -> str:
    """The filesystem `path` lies on, as a row names it: `ext4 on /dev/vda`."""
    res = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path], capture_output=True, text=True
    )
    parts = res.stdout.split()
    return f"{parts[0]} on {parts[1]}" if len(parts) == 2 else "unknown filesystem"


def record(name: str, body: str, command: str) -> None:
    """Replace (or add) the section for benchmark `name`."""
    if os.environ.get("P2V_BENCH_RECORD", "1") == "0":
        print(f"(P2V_BENCH_RECORD=0: not recorded)\n{body}")
        return
    text = HEADER
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            text = f.read()
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()} "
        f"on: {machine()}\n\n"
        f"Reproduce: `{command}`\n\n{body.rstrip()}\n<!-- {name}:end -->\n"
    )
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n?", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text)

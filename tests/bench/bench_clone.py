"""`p2v clone` over loopback SSH against the OpenSSH-client baseline, in the same run.

The "physical server" is a real sshd on 127.0.0.1 (tests/p2v/sshd.py) whose disk is the
4 GiB bench disk (tests/bench/bench_convert.py builds it). The baseline is what an
administrator types without p2v:

    ssh HOST dd if=DISK bs=4M | dd of=TMP bs=4M iflag=fullblock conv=sparse
    qemu-img convert -O FMT TMP OUT

(qemu-img cannot read its input from a pipe, so the stream lands in a sparse temporary
file first). That baseline streams the zeros and unused blocks p2v never reads; the
second skips them on the server side as Clonezilla does, each partition through partclone
and zstd on all cores:

    ssh HOST 'partclone.FS -c -s PARTITION -o - | zstd -T0' > PARTITION.pcl.zst

(PARTITION is a read-only loop device over the disk's partition; the partition table
travels with `dd` of the first MiB). It makes a Clonezilla image, not a disk image a
hypervisor boots: p2v's rows make the bootable image. Recorded: wall time and bytes over the wire for p2v with and without
--skip-unused and compression, and the raw SSH throughput of paramiko and of the OpenSSH
client on this machine, which bounds everything. Usage: python tests/bench/bench_clone.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from tests.bench.bench_convert import DISK, WORK, ensure_inputs  # noqa: E402
from tests.bench.results import filesystem, record  # noqa: E402
from tests.p2v.sshd import Sshd, start_sshd  # noqa: E402

MiB = 1 << 20
STREAM = 2 << 30  # bytes for the raw throughput probes

CASES = {
    "full disk, no compression": ["--compress", "none"],
    "full disk, zlib": ["--compress", "zlib"],
    "--skip-unused, no compression": ["--skip-unused", "--compress", "none"],
    "--skip-unused, zlib": ["--skip-unused", "--compress", "zlib"],
    # a server without Python: the POSIX tools do the agent's work (p2v/shell_agent.py)
    "full disk, no Python (--agent shell)": ["--agent", "shell", "--compress", "none"],
}
#: the shell mode against the Python agent on the same disk (issue 22: within 1.5x)
SHELL_CASE, SHELL_BASE, SHELL_TARGET = (
    "full disk, no Python (--agent shell)",
    "full disk, no compression",
    1.5,
)
#: the issue's targets: ratio = p2v time / baseline time
TARGETS = {"full disk, no compression": 1.2, "--skip-unused, zlib": 0.5}


def output_format() -> str:
    import formats

    try:
        mod = formats._module("qcow2")
    except Exception:
        return "raw"  # until the qcow2 module lands: both sides write raw
    return "qcow2" if hasattr(mod, "create") else "raw"


def openssh_throughput(server: Sshd) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["ssh", *server.ssh_args(), server.target, f"head -c {STREAM} /dev/zero"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return STREAM / (time.perf_counter() - t0)


def paramiko_throughput(server: Sshd) -> float:
    from p2v.ssh import ConnectOptions, connect

    opts = ConnectOptions(
        host=server.host,
        user=server.user,
        port=server.port,
        key_files=[server.user_key],
        known_hosts=server.known_hosts,
        use_agent=False,
    )
    with connect(opts) as session:
        chan = session.open_exec_channel(f"head -c {STREAM} /dev/zero")
        t0 = time.perf_counter()
        got = 0
        while True:
            data = chan.recv(1 << 20)
            if not data:
                break
            got += len(data)
        wall = time.perf_counter() - t0
        chan.close()
    if got != STREAM:
        raise SystemExit(f"paramiko probe received {got} of {STREAM} bytes")
    return got / wall


def baseline(server: Sshd, fmt: str, out: str) -> tuple[float, int]:
    tmp = os.path.join(WORK, "baseline-stream.raw")
    for p in (tmp, out):
        if os.path.exists(p):
            os.unlink(p)
    ssh = " ".join(["ssh", *server.ssh_args(), server.target])
    t0 = time.perf_counter()
    subprocess.run(
        f"{ssh} dd if={DISK} bs=4M status=none | "
        f"dd of={tmp} bs=4M iflag=fullblock conv=sparse status=none",
        shell=True,
        check=True,
    )
    subprocess.run(["qemu-img", "convert", "-O", fmt, tmp, out], check=True)
    wall = time.perf_counter() - t0
    os.unlink(tmp)
    return wall, os.path.getsize(DISK)


def partitions(disk: str) -> list[tuple[str, int, int]]:
    """(partclone tool, offset, size) of each partition, from sfdisk's view of the disk."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", disk], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    sector = table.get("sectorsize", 512)
    tools = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "partclone.fat"}  # EFI System: FAT
    return [
        (tools.get(p["type"].upper(), "partclone.ext4"), p["start"] * sector, p["size"] * sector)
        for p in table["partitions"]
    ]


def clonezilla_baseline(server: Sshd, parts: list[tuple[str, str]]) -> tuple[float, int]:
    """partclone | zstd on the server for each (tool, loop device), over the OpenSSH
    client, into files here; wall time and bytes over the wire."""
    ssh = ["ssh", *server.ssh_args(), server.target]
    out = os.path.join(WORK, "clonezilla")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.perf_counter()
    with open(os.path.join(out, "table.img"), "wb") as f:
        subprocess.run([*ssh, f"dd if={DISK} bs=1M count=1 status=none"], stdout=f, check=True)
    for i, (tool, dev) in enumerate(parts, 1):
        with open(os.path.join(out, f"part{i}.pcl.zst"), "wb") as f:
            subprocess.run(
                [*ssh, f"{tool} -q -c -s {dev} -o - 2>/dev/null | zstd -q -T0 -c"],
                stdout=f,
                check=True,
            )
    wall = time.perf_counter() - t0
    wire = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(out)
    return wall, wire


def loop_devices(disk: str) -> list[tuple[str, str]]:
    """A read-only loop device per partition of `disk` (the server's partitions), with
    the partclone tool for each."""
    devs = []
    try:
        for tool, offset, size in partitions(disk):
            dev = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                 "--sizelimit", str(size), disk],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            devs.append((tool, dev))
    except subprocess.CalledProcessError as exc:
        for _, dev in devs:
            subprocess.run(["losetup", "-d", dev])
        raise SystemExit(
            f"cannot make loop devices for the Clonezilla baseline: {exc.stderr}"
        ) from None
    return devs


def p2v_clone(server: Sshd, fmt: str, outdir: str, extra: list[str]) -> tuple[float, dict]:
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "p2v",
        "clone",
        "-p",
        str(server.port),
        "-i",
        server.user_key,
        "--known-hosts",
        server.known_hosts,
        "--no-agent",
        "--output",
        "json",
        server.target,
        "--disk",
        DISK,
        "-O",
        fmt,
        *extra,
        outdir,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"p2v clone failed: {res.stderr}")
    return wall, json.loads(res.stdout)["disks"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for tool in ("ssh", "qemu-img", "/usr/sbin/sshd", "partclone.ext4", "zstd", "losetup"):
        if shutil.which(tool) is None and not os.path.exists(tool):
            raise SystemExit(f"{tool} is missing: run `make deps`")
    ensure_inputs()
    fmt = output_format()
    root = tempfile.mkdtemp(prefix="sshd-", dir=WORK)
    server = start_sshd(root)
    loops = loop_devices(DISK)
    storage = f"{filesystem(WORK)}, cache warm"
    try:
        ssh_bw = max(openssh_throughput(server) for _ in range(args.repeat))
        pmk_bw = max(paramiko_throughput(server) for _ in range(args.repeat))
        print(f"raw SSH: OpenSSH {ssh_bw / 1e6:.0f} MB/s, paramiko {pmk_bw / 1e6:.0f} MB/s")
        base_out = os.path.join(WORK, f"baseline.{fmt}")
        outdir = os.path.join(WORK, "clone-out")
        best_base = None
        best_cz: tuple[float, int] | None = None
        best: dict[str, tuple[float, dict]] = {}
        for i in range(args.repeat):
            order = ["baseline", "clonezilla", *CASES]
            if i % 2:
                order.reverse()
            for name in order:
                subprocess.run(["sync"])
                if name == "baseline":
                    wall, _ = baseline(server, fmt, base_out)
                    best_base = min(best_base or wall, wall)
                    print(f"baseline: {wall:.2f} s", flush=True)
                    continue
                if name == "clonezilla":
                    cz = clonezilla_baseline(server, loops)
                    best_cz = min(best_cz or cz, cz)
                    print(f"partclone | zstd: {cz[0]:.2f} s, {cz[1] / MiB:.0f} MiB", flush=True)
                    continue
                wall, disk = p2v_clone(server, fmt, outdir, CASES[name])
                print(f"{name}: {wall:.2f} s, {disk['bytes-wire'] / MiB:.0f} MiB wire", flush=True)
                if name == "full disk, no compression" and i == 0:
                    same = subprocess.run(
                        ["qemu-img", "compare", "-f", "raw", DISK, disk["image"]],
                        capture_output=True,
                    )
                    if same.returncode:
                        raise SystemExit("the clone differs from the disk")
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, disk)
        assert best_base is not None and best_cz is not None
        rows = [
            f"| baseline: ssh dd + qemu-img convert | {storage} | {best_base:.2f} s | "
            f"{os.path.getsize(DISK) / MiB:.0f} MiB | 1.00 | |",
            f"| baseline: ssh partclone \\| zstd -T0 (Clonezilla image) | {storage} "
            f"| {best_cz[0]:.2f} s | {best_cz[1] / MiB:.0f} MiB | {best_cz[0] / best_base:.2f} "
            f"| p2v --skip-unused, zlib / this: "
            f"**{best['--skip-unused, zlib'][0] / best_cz[0]:.2f}** |",
        ]
        for name, (wall, disk) in best.items():
            ratio = wall / best_base
            target = TARGETS.get(name)
            verdict = ""
            if target is not None:
                verdict = f"target <= {target}: {'met' if ratio <= target else 'MISSED'}"
            rows.append(
                f"| p2v clone, {name} | {storage} | {wall:.2f} s | "
                f"{disk['bytes-wire'] / MiB:.0f} MiB "
                f"(read {disk['bytes-read'] / MiB:.0f} MiB) | **{ratio:.2f}** | {verdict} |"
            )
        shell_ratio = best[SHELL_CASE][0] / best[SHELL_BASE][0]
        verdict = "met" if shell_ratio <= SHELL_TARGET else "MISSED"
        shell_line = (
            f"No Python on the server (`--agent shell`) against the Python agent, full disk "
            f"without compression: {best[SHELL_CASE][0]:.2f} s against "
            f"{best[SHELL_BASE][0]:.2f} s = **{shell_ratio:.2f}** (target <= {SHELL_TARGET}: "
            f"{verdict}). The server's tools here are GNU coreutils and diffutils (cmp); "
            "busybox's cmp and sha256sum are slower."
        )
        for row in rows:
            print(row)
        print(shell_line)
        body = (
            f"4 GiB bench disk (GPT: FAT + ext4 holding ~1.2 GiB) served by sshd on "
            f"127.0.0.1; output {fmt}; page cache warm (the disk is read in every run); best "
            f"of {args.repeat} alternating runs, all from this one run of one commit. p2v times include the agent start, inventory, the copy and the hash "
            "verification. Wire bytes for p2v are the agent protocol's bytes (payload, "
            "digests, headers) inside SSH; for the baseline, the disk streamed by dd.\n\n"
            "With `--compress zlib` the agent compresses a block only when zlib is quicker "
            "than sending the bytes it saves (docs/p2v.md): over loopback it sends most "
            "blocks raw, which is why zlib saves little here; over a slow link it compresses "
            "everything compressible. Zero blocks never cross the wire in any mode.\n\n"
            f"Raw SSH throughput on this machine (`head -c 2G /dev/zero`): OpenSSH client "
            f"{ssh_bw / 1e6:.0f} MB/s, paramiko (p2v's transport) {pmk_bw / 1e6:.0f} MB/s.\n\n"
            "| run | filesystem, cache | wall | over the wire | ratio to dd | |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + shell_line
        )
        record("bench_clone", body, "python tests/bench/bench_clone.py")
    finally:
        for _, dev in loops:
            subprocess.run(["losetup", "-d", dev])
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        for p in (os.path.join(WORK, f"baseline.{fmt}"),):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(os.path.join(WORK, "clone-out"), ignore_errors=True)


if __name__ == "__main__":
    main()

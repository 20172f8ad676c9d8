"""Guest conversion against virt-v2v, on the same copy of test server (a), in one run.

Server (a) (tests/guests/servers.py): Debian 12, initramfs-tools with MODULES=list and no
virtio, fstab and GRUB by /dev/sda1, ifupdown on ens3, open-vm-tools. Each tool converts
its own copy of the disk for KVM:

- p2v: `p2v convert-guest --to kvm a.qcow2` (in place, on an overlay committed at the end);
- virt-v2v: `virt-v2v -i disk a.qcow2 -o local -os DIR -of qcow2` (Debian's 2.2).

Both run their libguestfs appliance with the same accelerator (TCG where a probe boot
under KVM fails). Each output then boots on the same virtio hardware, the definition
drivers/kvm.py writes for the server (q35, virtio disk and NIC, libvirt's PCI addresses),
and is recorded as booting when it answers SSH, or not when its console shows the
initramfs giving up on its root device or the boot timeout passes.
Usage: python tests/bench/bench_guest_convert.py [--repeat N]
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

from drivers import kvm  # noqa: E402
from drivers.machine import DiskSpec, MachineSpec, NicSpec  # noqa: E402
from tests.bench.results import record  # noqa: E402
from tests.guests import boot, servers  # noqa: E402

WORK = "/var/tmp/p2v-bench-guest"
BOOT_TIMEOUT = 900.0
STUCK = r"Gave up waiting for root|ALERT! .* does not exist|dracut-initqueue.*timeout"


def _copy(image: str, dest: str) -> None:
    # a full copy, not a reflink or overlay: both tools start from identical files
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", image, dest], check=True)


def _appliance_env(accel: str) -> dict[str, str]:
    env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
    if accel != "kvm":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def run_p2v(srv: servers.Server, accel: str, workdir: str) -> tuple[float, str, dict]:
    disk = os.path.join(workdir, "a.qcow2")
    _copy(srv.image, disk)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "p2v", "convert-guest", "--to", "kvm", "--output", "json", disk],
        cwd=ROOT, env=_appliance_env(accel), capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"p2v convert-guest failed: {res.stderr.strip()}")
    return seconds, disk, json.loads(res.stdout).get("seconds", {})


def run_virt_v2v(srv: servers.Server, accel: str, workdir: str) -> tuple[float, str]:
    src = os.path.join(workdir, "a.qcow2")
    _copy(srv.image, src)
    out = os.path.join(workdir, "out")
    os.makedirs(out)
    t0 = time.perf_counter()
    res = subprocess.run(
        ["virt-v2v", "-i", "disk", src, "-o", "local", "-os", out, "-of", "qcow2",
         "-on", "server-a"],
        env=_appliance_env(accel), capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"virt-v2v failed: {res.stderr.strip()[-2000:]}")
    return seconds, os.path.join(out, "server-a-sda")


def boots(srv: servers.Server, disk: str, accel: str, workdir: str) -> tuple[bool, float, str]:
    """(answers SSH, seconds from power-on, what the console said last)."""
    spec = MachineSpec(
        name="server-a",
        cpus=1,
        memory=1024 << 20,
        firmware="bios",
        disks=[DiskSpec(disk, "qcow2", "virtio")],
        nics=[NicSpec(srv.mac, "virtio")],
        os="linux",
    )
    xml = kvm.PLATFORM.write(spec, workdir)
    log = os.path.join(workdir, "serial.log")
    t0 = time.perf_counter()
    with boot.boot_definition(xml, log, accel=accel) as vm:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if vm.wait_for_serial(STUCK, 0) is not None:
                return False, time.perf_counter() - t0, _stuck_line(vm.serial())
            try:
                vm.wait_for_ssh(srv.identity, srv.host_key, 15).close()
                return True, time.perf_counter() - t0, "ssh"
            except boot.BootError:
                continue
        return False, time.perf_counter() - t0, "timeout"


def _stuck_line(serial: str) -> str:
    """The console's complaint, to its first full stop."""
    for line in serial.splitlines():
        if "Gave up" in line or "ALERT!" in line or "timeout" in line:
            return line.strip().split(".")[0]
    return "stuck"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    srv = servers.build("a")
    accel = servers.accelerator()
    rows = []
    results: dict[str, list[float]] = {"p2v": [], "virt-v2v": []}
    booted: dict[str, tuple[bool, float, str]] = {}
    steps: dict = {}
    for i in range(args.repeat):
        for tool in ("virt-v2v", "p2v"):
            workdir = os.path.join(WORK, f"{tool}-{i}")
            shutil.rmtree(workdir, ignore_errors=True)
            os.makedirs(workdir)
            if tool == "p2v":
                seconds, disk, steps = run_p2v(srv, accel, workdir)
            else:
                seconds, disk = run_virt_v2v(srv, accel, workdir)
            results[tool].append(seconds)
            print(f"{tool} run {i + 1}: {seconds:.1f} s", flush=True)
            if i == 0:
                booted[tool] = boots(srv, disk, accel, workdir)
                print(f"{tool} output boots: {booted[tool]}", flush=True)
    best = {tool: min(times) for tool, times in results.items()}
    ratio = best["p2v"] / best["virt-v2v"]
    for tool, command in (
        ("p2v", "`p2v convert-guest --to kvm a.qcow2`"),
        ("virt-v2v", "`virt-v2v -i disk a.qcow2 -o local -os DIR -of qcow2`"),
    ):
        ok, after, said = booted[tool]
        answer = f"yes, SSH {after:.0f} s after power-on" if ok else f"no ({said})"
        rows.append(f"| {tool} | {command} | {best[tool]:.1f} s | {answer} |")
    body = (
        f"Server (a) of tests/guests/servers.py (Debian 12, 3 GiB qcow2 disk, initramfs "
        f"without virtio, root and GRUB by /dev/sda1, ifupdown on ens3, open-vm-tools), "
        f"a fresh copy for every run; libguestfs appliance under {accel.upper()} for both "
        f"tools; best of {args.repeat}. Each output booted once on the same virtio "
        f"hardware (drivers/kvm.py's definition, q35). p2v's steps (s): "
        f"{json.dumps(steps)}. Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.\n\n"
        "| tool | command | conversion | boots on virtio |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nRatio p2v / virt-v2v: **{ratio:.2f}** (target <= 1.0, and p2v's output boots)\n"
    )
    record("bench_guest_convert", body, "python tests/bench/bench_guest_convert.py")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

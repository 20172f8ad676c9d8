"""`make demo`: build a sample physical disk and run the main job on it, showing each
command as a user would type it.

The sample is a 256 MiB GPT disk with a FAT (EFI) partition and an ext4 root holding
libraries, logs and random data, made with sgdisk/mkfs. The job converts it to qcow2 and
checks the result with qemu-img, then lists its partitions and makes a used-blocks-only
VMDK for VMware, as one would before shipping a physical server's disk to a hypervisor.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "demo-out")


def show(*cmd: str, check: bool = True) -> int:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=OUT).returncode
    if check and rc != 0:
        sys.exit(f"demo: the command above failed with status {rc}")
    return rc


def main() -> None:
    sys.path.insert(0, ROOT)
    from samples.disk import MiB, build_disk

    os.makedirs(OUT, exist_ok=True)
    disk = os.path.join(OUT, "server-disk.raw")
    if not os.path.exists(disk):
        print("building the sample disk (GPT, FAT + ext4 with 40 MiB of files)...", flush=True)
        build_disk(disk + ".tmp", 256 * MiB, libs=14 * MiB, text=14 * MiB, rand=12 * MiB)
        os.replace(disk + ".tmp", disk)
    for name in os.listdir(OUT):
        if name != "server-disk.raw":
            os.unlink(os.path.join(OUT, name))
    p2v = [sys.executable, "-m", "p2v"]
    show(*p2v, "info", "server-disk.raw")
    show(*p2v, "convert", "-p", "-O", "qcow2", "server-disk.raw", "server.qcow2")
    show(*p2v, "info", "server.qcow2")
    show(*p2v, "check", "server.qcow2")
    show("qemu-img", "check", "server.qcow2")
    show("qemu-img", "compare", "server-disk.raw", "server.qcow2")
    show(
        *p2v,
        "convert",
        "-p",
        "-c",
        "-o",
        "compression_type=zstd",
        "-O",
        "qcow2",
        "server-disk.raw",
        "server-zstd.qcow2",
    )
    show("qemu-img", "compare", "server-disk.raw", "server-zstd.qcow2")
    if show(*p2v, "partitions", "server.qcow2", check=False) == 0:
        show(
            *p2v,
            "convert",
            "-p",
            "--skip-unused",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "server.qcow2",
            "server.vmdk",
        )
        show("qemu-img", "info", "server.vmdk")
    print("\nsizes on disk:")
    for name in sorted(os.listdir(OUT)):
        st = os.stat(os.path.join(OUT, name))
        print(f"  {name:<22} {st.st_blocks * 512 / MiB:8.1f} MiB allocated")
    print("\ndemo finished: outputs are in demo-out/")


if __name__ == "__main__":
    main()

"""Build the QEMU test guest from Debian packages: a kernel and a tiny initramfs.

- Kernel: `apt-get download` of the package linux-image-amd64 depends on (for example
  linux-image-6.1.0-56-amd64), unpacked with `dpkg -x`. The bzImage's XZ payload is the
  ELF vmlinux, which QEMU boots through its PVH entry point: that skips the firmware's
  real-mode loader and the in-guest decompression, about 5 s under TCG.
- Initramfs (cpio, newc): busybox from busybox-static, an /init script, and `dirtier`
  (dirtier.c beside this file, compiled with `gcc -static`), the program that dirties
  memory at a set rate and prints a counter with a checksum every 100 ms.
- Accelerator: KVM only when a probe boot under it prints the guest's first line, TCG
  otherwise (a Debian 6.1 kernel hangs early under some nested KVM set-ups).

Everything lands in a cache directory (default /tmp/p2v-guest-cache, or $P2V_GUEST_CACHE)
keyed by a hash of the inputs, so a test session builds once. Nothing here is committed
as a binary. Run directly to build and print the paths:
`python tests/live_migrate/guest_image/build_guest.py`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
DIRTIER_SOURCE = os.path.join(HERE, "dirtier.c")
DEFAULT_CACHE = os.environ.get("P2V_GUEST_CACHE", "/tmp/p2v-guest-cache")
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"
#: the dirtier's first line: a probe boot that reaches it proves the accelerator works
FIRST_LINE = r"^p2v-dirtier start "
BASE_APPEND = "console=ttyS0 quiet panic=-1 mitigations=off i8042.noaux i8042.nokbd"

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
exec /dirtier </dev/console >/dev/console 2>&1
"""


class GuestBuildError(RuntimeError):
    """A tool or package the guest needs is missing, or a build step failed."""


@dataclass(frozen=True)
class GuestImage:
    """A built test guest: boot it with `-kernel`, `-initrd`, `-append append(...)`."""

    kernel: str
    initrd: str
    accel: str
    kernel_package: str

    def append(self, mem_mib: int = 32, rate_mb: int = 0, seed: int = 1) -> str:
        """Kernel command line: dirtier buffer `mem_mib` MiB, dirtied at `rate_mb` MB/s."""
        return f"{BASE_APPEND} p2v_mem={mem_mib} p2v_rate={rate_mb} p2v_seed={seed}"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, **kw)
    if res.returncode != 0:
        err = (
            res.stderr.decode(errors="replace").strip()
            if isinstance(res.stderr, bytes)
            else res.stderr
        )
        raise GuestBuildError(f"{' '.join(cmd)} failed ({res.returncode}): {err[-400:]}")
    return res


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise GuestBuildError(f"missing tools for the test guest: {', '.join(missing)}")


def kernel_package() -> str:
    """The versioned package linux-image-amd64 currently depends on."""
    _need("apt-cache")
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], text=True).stdout
    found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not found and os.geteuid() == 0:
        # a fresh machine may have empty package lists
        _run(["apt-get", "update", "-qq"])
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], text=True).stdout
        found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not found:
        raise GuestBuildError(f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE}")
    return found[0]


def _download_kernel(cache: str, package: str) -> str:
    """The kernel .deb in the cache, fetched with `apt-get download` when absent."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if found:
        return found[0]
    _need("apt-get")
    try:
        _run(["apt-get", "download", "-q", package], cwd=debs)
    except GuestBuildError:
        # a fresh machine may have empty package lists; refresh once as root
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "download", "-q", package], cwd=debs)
    found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if not found:
        raise GuestBuildError(f"apt-get download {package} left no .deb in {debs}")
    return found[0]


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage whose payload is XZ (Debian's choice), or None."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def build_kernel(cache: str, package: str) -> str:
    """Path of the bootable kernel (vmlinux for PVH boot, else the bzImage)."""
    target_dir = os.path.join(cache, f"kernel-{package}")
    for name in ("vmlinux", "vmlinuz"):
        done = os.path.join(target_dir, name)
        if os.path.exists(done):
            return done
    deb = _download_kernel(cache, package)
    _need("dpkg")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _run(["dpkg", "-x", deb, tmp])
        found = glob.glob(os.path.join(tmp, "boot", "vmlinuz-*"))
        if not found:
            raise GuestBuildError(f"{deb} holds no boot/vmlinuz-*")
        with open(found[0], "rb") as f:
            bzimage = f.read()
    os.makedirs(target_dir, exist_ok=True)
    vmlinux = extract_vmlinux(bzimage)
    name, data = ("vmlinux", vmlinux) if vmlinux is not None else ("vmlinuz", bzimage)
    path = os.path.join(target_dir, name)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


def _inputs_key(package: str) -> str:
    h = hashlib.sha256()
    for path in (DIRTIER_SOURCE, os.path.abspath(__file__), BUSYBOX):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    h.update(package.encode())
    return h.hexdigest()[:16]


def build_initrd(cache: str, key: str) -> str:
    """The initramfs (cpio newc, uncompressed: nothing to inflate under TCG)."""
    target_dir = os.path.join(cache, f"guest-{key}")
    initrd = os.path.join(target_dir, "initrd.cpio")
    if os.path.exists(initrd):
        return initrd
    _need("gcc", "cpio")
    if not os.path.exists(BUSYBOX):
        raise GuestBuildError(f"{BUSYBOX} missing (install busybox-static)")
    os.makedirs(target_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as root:
        for d in ("bin", "proc", "dev", "sys"):
            os.mkdir(os.path.join(root, d))
        _run(["gcc", "-static", "-O2", "-o", os.path.join(root, "dirtier"), DIRTIER_SOURCE])
        shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
        with open(os.path.join(root, "init"), "w") as f:
            f.write(INIT_SCRIPT)
        os.chmod(os.path.join(root, "init"), 0o755)
        names = sorted(
            os.path.relpath(os.path.join(dirpath, n), root)
            for dirpath, dirs, files in os.walk(root)
            for n in dirs + files
        )
        with open(initrd + ".tmp", "wb") as out:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                input="\n".join(names).encode(),
                cwd=root,
                stdout=out,
                check=True,
            )
    os.replace(initrd + ".tmp", initrd)
    return initrd


def _probe_kvm(cache: str, kernel: str, initrd: str) -> bool:
    from live_migrate.qemu_launcher import QemuSpec, probe_accel

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        ram = os.path.join(tmp, "ram")
        size = 128 << 20
        with open(ram, "wb") as f:
            f.truncate(size)
        spec = QemuSpec(
            ram_path=ram,
            ram_size=size,
            qmp_socket=os.path.join(tmp, "qmp"),
            kernel=kernel,
            initrd=initrd,
            append=f"{BASE_APPEND} p2v_mem=4",
            serial_log=os.path.join(tmp, "serial.log"),
            accel="kvm",
        )
        return probe_accel(spec, FIRST_LINE, timeout=15.0)


def choose_accel(cache: str, kernel: str, initrd: str, package: str) -> str:
    """'kvm' when a probe boot under KVM reaches the first line, else 'tcg'; remembered
    per inputs and host kernel, since a hanging probe costs its whole timeout."""
    forced = os.environ.get("P2V_GUEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    # the hang depends on the guest kernel, the host kernel and QEMU, not on the initrd
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    version = re.search(r"version (\S+)", qemu.stdout)
    record = os.path.join(
        cache, f"accel-{package}-{os.uname().release}-{version[1] if version else 'unknown'}.json"
    )
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)["accel"]
    accel = "kvm" if _probe_kvm(cache, kernel, initrd) else "tcg"
    with open(record, "w") as f:
        json.dump({"accel": accel}, f)
    return accel


def build(cache: str = DEFAULT_CACHE) -> GuestImage:
    """Build (or find in `cache`) the test guest; safe to call from parallel workers."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = kernel_package()
        kernel = build_kernel(cache, package)
        key = _inputs_key(package)
        initrd = build_initrd(cache, key)
        accel = choose_accel(cache, kernel, initrd, package)
    return GuestImage(kernel=kernel, initrd=initrd, accel=accel, kernel_package=package)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
    image = build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE)
    json.dump(dataclasses.asdict(image), sys.stdout, indent=2)
    sys.stdout.write("\n")

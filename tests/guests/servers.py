"""Build real Debian 12 servers that break a naive P2V, from Debian packages.

- (a) initramfs-tools with MODULES=list naming only the AHCI, e1000 and ext4 drivers (no
  virtio), /etc/fstab and GRUB by /dev/sda1 (GRUB_DISABLE_LINUX_UUID=true), ifupdown with
  DHCP on the e1000's name on the physical machine (ens3), open-vm-tools installed.
- (b) dracut host-only, root on LVM, systemd-networkd matched by the NIC's MAC. The
  host-only initramfs is built inside the server booted as the physical machine (a first
  boot unit runs `dracut -f -H` and powers off): built in the libguestfs appliance it
  would hold the appliance's drivers instead.

The root tree comes from `mmdebstrap` against the host's Debian mirror; the disk is made
without host mounts by libguestfs (partition, LVM, mkfs, tar-in, then grub-install and
update-grub run inside the guest's root). The appliance never has a network.

Images are cached in $P2V_GUEST_CACHE (default /var/tmp/p2v-guest-cache) under a hash of
the recipe; an fcntl lock makes parallel test workers build once, and a finished server
appears by an atomic rename of its directory. Each server has its own root SSH key and
host key, kept beside its disk. Run `python -m tests.guests.servers build a` to build one
and print its disk's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CACHE = os.environ.get("P2V_GUEST_CACHE", "/var/tmp/p2v-guest-cache")
SUITE = "bookworm"
#: bump when the build steps change in a way the recipes do not show
BUILD_VERSION = 1
DISK_SIZE = 3 << 30
#: the serial console for GRUB and the kernel; the tests read the boot from it
CONSOLE = "console=ttyS0,115200n8"

COMMON_PACKAGES = (
    "linux-image-amd64",
    "grub-pc",
    "openssh-server",
    "python3",
    "sudo",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "e2fsprogs",
)

SSHD_CONF = "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n"

GRUB_DEFAULT = f"""GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{CONSOLE}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
"""

# initramfs-tools resolves each module's dependencies (libahci, libata, jbd2, ...)
INITRAMFS_MODULES_A = "ahci\nsd_mod\next4\ncrc32c_generic\ne1000\n"

# dracut's qemu modules add every virtio driver to a host-only image when the host is a
# QEMU guest: the build omits them, as dracut would on the physical server this stands for
HOSTONLY_UNIT = """[Unit]
Description=p2v test server: host-only initramfs for this machine, then power off
After=local-fs.target

[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/bin/sh -c 'dracut -f -H --omit "qemu qemu-net" --regenerate-all && \
rm -f /etc/systemd/system/p2v-hostonly.service \
/etc/systemd/system/multi-user.target.wants/p2v-hostonly.service && \
sync && echo P2V-HOSTONLY-OK >/dev/console && systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
"""


class ServerBuildError(RuntimeError):
    """A tool is missing or a build step failed."""


@dataclass(frozen=True)
class Recipe:
    """What makes a server: packages, files written over the root tree, commands run in
    its chroot, and the root's layout ("ext4" on sda1, or "lvm": vg0/root on sda1)."""

    name: str
    packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    commands: tuple[str, ...]
    layout: str
    #: the physical machine's NIC: its pinned MAC and the name Linux gives it there
    mac: str
    interface: str
    #: the first boot as the physical machine finishes the build (and powers off)
    first_boot: bool = False


RECIPES = {
    "a": Recipe(
        name="a",
        packages=(*COMMON_PACKAGES, "initramfs-tools", "ifupdown", "isc-dhcp-client",
                  "open-vm-tools"),
        files=(
            ("etc/hostname", "p2v-server-a\n"),
            ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 p2v-server-a\n"),
            ("etc/fstab", "/dev/sda1 / ext4 errors=remount-ro 0 1\n"),
            ("etc/default/grub", GRUB_DEFAULT + "GRUB_DISABLE_LINUX_UUID=true\n"),
            ("etc/initramfs-tools/modules", INITRAMFS_MODULES_A),
            ("etc/network/interfaces",
             "auto lo\niface lo inet loopback\n\nauto ens3\niface ens3 inet dhcp\n"),
        ),
        commands=(
            "sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf",
            "update-initramfs -u -k all",
        ),
        layout="ext4",
        mac="52:54:00:50:32:0a",
        interface="ens3",
    ),
    "b": Recipe(
        name="b",
        packages=(*COMMON_PACKAGES, "dracut", "lvm2"),
        files=(
            ("etc/hostname", "p2v-server-b\n"),
            ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 p2v-server-b\n"),
            ("etc/fstab", "/dev/mapper/vg0-root / ext4 errors=remount-ro 0 1\n"),
            ("etc/default/grub", GRUB_DEFAULT),
            ("etc/dracut.conf.d/90-hostonly.conf", 'hostonly="yes"\n'),
            ("etc/systemd/network/10-lan.network",
             "[Match]\nMACAddress=52:54:00:50:32:0b\n\n[Network]\nDHCP=ipv4\n"),
            ("etc/systemd/system/p2v-hostonly.service", HOSTONLY_UNIT),
        ),
        commands=(
            "systemctl enable systemd-networkd p2v-hostonly.service",
            # generic until the first boot: the chroot is not the machine
            "for k in /lib/modules/*; do dracut -f -N --kver ${k##*/}; done",
        ),
        layout="lvm",
        mac="52:54:00:50:32:0b",
        interface="ens3",
        first_boot=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Server:
    """A built server: its disk (qcow2, never to be written: boot it on an overlay) and
    how to reach it as root."""

    name: str
    image: str
    identity: str
    host_key: str
    mac: str
    interface: str
    layout: str

    def known_hosts(self, port: int, host: str = "127.0.0.1") -> str:
        """A known_hosts line for the server behind a port forward."""
        return f"[{host}]:{port} {self.host_key}\n"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise ServerBuildError(
            f"{' '.join(cmd)[:200]} failed ({res.returncode}): {res.stderr.strip()[-1500:]}"
        )
    return res


def missing_tools() -> list[str]:
    """Tools (and the guestfs module) a build needs that this machine lacks."""
    out = [t for t in ("mmdebstrap", "ssh-keygen", "qemu-img", "qemu-system-x86_64")
           if shutil.which(t) is None]  # fmt: skip
    try:
        import guestfs  # noqa: F401
    except ImportError:
        out.append("python3-guestfs")
    return out


def recipe_key(recipe: Recipe) -> str:
    text = json.dumps([BUILD_VERSION, SUITE, DISK_SIZE, dataclasses.asdict(recipe)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mirrors() -> list[str]:
    """One-line apt sources for SUITE (and its -updates, -security) from the host's
    configuration, deb.debian.org when the host names none."""
    suites = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    lines: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            stanzas = f.read().split("\n\n")
        for stanza in stanzas:
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite in suites:
                        lines.append(f"deb {uri} {suite} main")
    for path in ("/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] in suites:
                    lines.append(f"deb {words[1]} {words[2]} main")
    return lines or [f"deb http://deb.debian.org/debian {SUITE} main"]


def _write_files(root: str, files: tuple[tuple[str, str], ...]) -> None:
    for rel, text in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _keys(workdir: str, overlay: str) -> str:
    """The root login key (kept beside the disk, its public half authorized in the overlay)
    and the server's host key (written into the overlay); returns the host key's public
    line."""
    identity = os.path.join(workdir, "id_ed25519")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2v-test", "-f", identity])
    host = os.path.join(workdir, "ssh_host_ed25519_key")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@p2v-server", "-f", host])
    ssh_dir = os.path.join(overlay, "etc", "ssh")
    os.makedirs(os.path.join(ssh_dir, "sshd_config.d"))
    shutil.copy(host, ssh_dir)
    shutil.copy(host + ".pub", ssh_dir)
    os.chmod(os.path.join(ssh_dir, "ssh_host_ed25519_key"), 0o600)
    os.unlink(host)
    with open(os.path.join(ssh_dir, "sshd_config.d", "p2v.conf"), "w") as f:
        f.write(SSHD_CONF)
    root_ssh = os.path.join(overlay, "root", ".ssh")
    os.makedirs(root_ssh, mode=0o700)
    shutil.copy(identity + ".pub", os.path.join(root_ssh, "authorized_keys"))
    with open(host + ".pub") as f:
        host_key = " ".join(f.read().split()[:2])
    return host_key


def build_rootfs(recipe: Recipe, overlay: str, tarball: str) -> None:
    """The server's root tree as a tarball, from Debian packages."""
    commands = [
        # the overlay's host key is the only one: every boot of the server shows it
        "rm -f /etc/ssh/ssh_host_rsa_key* /etc/ssh/ssh_host_ecdsa_key*",
        "chmod 700 /root/.ssh && chmod 600 /root/.ssh/authorized_keys",
        *recipe.commands,
    ]
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=tar",
        "--aptopt=APT::Install-Recommends false",
        f"--include={','.join(recipe.packages)}",
        f"--customize-hook=sync-in {overlay} /",
    ]
    cmd += [f'--customize-hook=chroot "$1" sh -ec {_quote(c)}' for c in commands]
    cmd += [SUITE, tarball, *mirrors()]
    _run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def make_disk(recipe: Recipe, tarball: str, disk: str, accel: str) -> None:
    """Partition, format, fill and make bootable, all inside the libguestfs appliance."""
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.set_network(False)
        if accel != "kvm":
            g.set_backend_settings(["force_tcg"])
        g.disk_create(disk, "qcow2", DISK_SIZE)
        g.add_drive_opts(disk, format="qcow2")
        g.launch()
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", 2048, -1)
        g.part_set_bootable("/dev/sda", 1, True)
        if recipe.layout == "lvm":
            g.pvcreate("/dev/sda1")
            g.vgcreate("vg0", ["/dev/sda1"])
            g.lvcreate_free("root", "vg0", 100)
            root = "/dev/vg0/root"
        else:
            root = "/dev/sda1"
        g.mkfs("ext4", root)
        g.mount(root, "/")
        g.tar_in(tarball, "/", xattrs=True, acls=True)
        g.command(["grub-install", "--target=i386-pc", "/dev/sda"])
        g.command(["update-grub"])
        g.umount_all()
        g.shutdown()
    except RuntimeError as exc:
        raise ServerBuildError(f"libguestfs: {exc}") from exc
    finally:
        g.close()


def _first_boot(recipe: Recipe, disk: str, workdir: str, accel: str) -> None:
    from tests.guests.boot import boot_physical

    log = os.path.join(workdir, "first-boot.log")
    with boot_physical(disk, recipe.mac, log, accel=accel, snapshot=False) as vm:
        if not vm.wait_exit(timeout=1800):
            raise ServerBuildError(f"server {recipe.name}: first boot did not power off: {log}")
    with open(log, errors="replace") as f:
        if "P2V-HOSTONLY-OK" not in f.read():
            raise ServerBuildError(f"server {recipe.name}: first boot failed, see {log}")


def accelerator() -> str:
    """'kvm' when a probe boot of the Debian kernel works under it, else 'tcg'."""
    from tests.live_migrate.guest_image import build_guest

    return build_guest.build().accel


def _load(directory: str) -> Server:
    with open(os.path.join(directory, "server.json")) as f:
        return Server(**json.load(f))


def build(name: str, cache: str = CACHE) -> Server:
    """Server `name` ("a" or "b"), built unless the cache holds it; safe from parallel
    workers."""
    recipe = RECIPES[name]
    missing = missing_tools()
    if missing:
        raise ServerBuildError(f"missing for the test servers: {', '.join(missing)}")
    os.makedirs(cache, exist_ok=True)
    final = os.path.join(cache, f"server-{name}-{recipe_key(recipe)}")
    with open(os.path.join(cache, f"server-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):
            return _load(final)
        # what a killed build left behind (the lock is ours: nobody else builds it)
        for stale in glob.glob(os.path.join(cache, f".build-{name}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        accel = accelerator()
        workdir = tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache)
        try:
            overlay = os.path.join(workdir, "overlay")
            _write_files(overlay, recipe.files)
            host_key = _keys(workdir, overlay)
            tarball = os.path.join(workdir, "rootfs.tar")
            build_rootfs(recipe, overlay, tarball)
            disk = os.path.join(workdir, "disk.qcow2")
            make_disk(recipe, tarball, disk, accel)
            os.unlink(tarball)
            if recipe.first_boot:
                _first_boot(recipe, disk, workdir, accel)
            server = Server(
                name=name,
                image=os.path.join(final, "disk.qcow2"),
                identity=os.path.join(final, "id_ed25519"),
                host_key=host_key,
                mac=recipe.mac,
                interface=recipe.interface,
                layout=recipe.layout,
            )
            with open(os.path.join(workdir, "server.json"), "w") as f:
                json.dump(dataclasses.asdict(server), f, indent=2)
            shutil.rmtree(overlay)
            os.replace(workdir, final)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    return server


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build" or argv[1] not in RECIPES:
        print(f"usage: python -m tests.guests.servers build {'|'.join(RECIPES)}", file=sys.stderr)
        return 2
    try:
        server = build(argv[1])
    except ServerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(server.image)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

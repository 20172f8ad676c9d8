"""The domain XML drivers/kvm.py writes, under a real libvirt daemon the test starts.

The daemon is `libvirtd` in session mode (qemu:///session) running as the unprivileged
user `nobody`, with HOME and the XDG directories in a private temporary directory:

- a privileged (qemu:///system) daemon reads /etc/libvirt/qemu.conf and runs QEMU as
  `libvirt-qemu`; both come with libvirt-daemon-system, which on Debian 12 pulls in
  systemd. The session daemon needs neither, touches nothing outside its directory, and
  two test runs at once do not meet.
- `nobody` cannot open /dev/kvm (0600 root), so every domain is defined as type `qemu`
  (TCG): the one attribute the test changes in what we wrote for the round trips.

The boot test builds a BIOS disk (MBR, FAT16, SYSLINUX; mtools writes the file system,
so no loop device or mount is needed) holding the Debian kernel of the QEMU migration
tests' guest and a busybox initramfs that prints a marker to ttyS0 and powers off,
converts it with `p2v v2v --to kvm`, and starts the domain we wrote with its serial port
logged to a file.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import pytest

from drivers import kvm
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.external import need_file, need_root, need_tool, p2v, qemu_img, run, unavailable
from tests.live_migrate.guest_image import build_guest

MiB = 1 << 20
LIBVIRT_USER = "nobody"
MARKER = "p2v-boot-ok"
BOOT_TIMEOUT = 120.0
SYSLINUX_MBR = "/usr/lib/SYSLINUX/mbr.bin"

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for w in $(/bin/busybox cat /proc/cmdline); do
  case $w in p2v_marker=*) m=${w#p2v_marker=} ;; esac
done
echo "MARKER $m" >/dev/ttyS0
/bin/busybox poweroff -f
""".replace("MARKER", MARKER)

SYSLINUX_CFG = """DEFAULT linux
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd
  APPEND console=ttyS0 quiet panic=-1 mitigations=off p2v_marker=%s
"""


def chown_tree(path: str, uid: int, gid: int) -> None:
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)


@dataclass
class Libvirtd:
    root: str
    uri: str
    proc: subprocess.Popen
    uid: int
    gid: int

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = run(["virsh", "-q", "-c", self.uri, *args], timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}\n"
                f"libvirtd log:\n{self.log_tail()}"
            )
        return res

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "cache", "libvirt", "libvirtd.log")) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return "(no log)"

    def workdir(self, name: str) -> str:
        """A directory QEMU, running as the daemon's user, can reach."""
        path = os.path.join(self.root, "images", name)
        os.makedirs(path)
        return path

    def give(self, path: str) -> None:
        """Hand `path` (and what is under it) to the daemon's user."""
        chown_tree(path, self.uid, self.gid)


@pytest.fixture(scope="module")
def libvirtd():
    need_root()
    need_tool("libvirtd", "virsh", "qemu-system-x86_64")
    user = pwd.getpwnam(LIBVIRT_USER)
    # short: the daemon's sockets live under it (sun_path holds 108 bytes)
    root = tempfile.mkdtemp(prefix="p2v-lv-", dir="/tmp")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.path.join(root, "home"),
        "XDG_RUNTIME_DIR": os.path.join(root, "run"),
        "XDG_CONFIG_HOME": os.path.join(root, "config"),
        "XDG_CACHE_HOME": os.path.join(root, "cache"),
    }
    for d in (*[v for k, v in env.items() if k != "PATH"], os.path.join(root, "images")):
        os.makedirs(d, mode=0o700)
    os.makedirs(os.path.join(env["XDG_CONFIG_HOME"], "libvirt"))
    log_dir = os.path.join(env["XDG_CACHE_HOME"], "libvirt")
    os.makedirs(log_dir)
    with open(os.path.join(env["XDG_CONFIG_HOME"], "libvirt", "qemu.conf"), "w") as f:
        # QEMU's output straight to a file: no virtlogd left running after the daemon
        f.write('stdio_handler = "file"\n')
    with open(os.path.join(env["XDG_CONFIG_HOME"], "libvirt", "libvirtd.conf"), "w") as f:
        f.write(f'log_outputs = "3:file:{log_dir}/libvirtd.log"\n')
    daemon_log = os.path.join(log_dir, "libvirtd.log")
    open(daemon_log, "ab").close()
    os.chmod(root, 0o755)
    chown_tree(root, user.pw_uid, user.pw_gid)
    sock = os.path.join(env["XDG_RUNTIME_DIR"], "libvirt", "libvirt-sock")
    with open(daemon_log, "ab") as early_log:
        proc = subprocess.Popen(
            ["libvirtd"],
            env=env,
            cwd=root,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=early_log,
            stderr=early_log,
        )
    lv = Libvirtd(root, f"qemu:///session?socket={sock}", proc, user.pw_uid, user.pw_gid)
    try:
        deadline = time.monotonic() + 60
        while True:
            if lv.proc.poll() is not None:
                pytest.fail(f"libvirtd exited ({lv.proc.returncode}):\n{lv.log_tail()}")
            # the first connection probes QEMU's capabilities (a few seconds)
            if os.path.exists(sock) and lv.virsh("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd did not answer on {sock} in 60 s:\n{lv.log_tail()}")
            time.sleep(0.2)
        yield lv
    finally:
        if lv.proc.poll() is None:
            for name in lv.virsh("list", "--all", "--name", check=False).stdout.split():
                lv.virsh("destroy", name, check=False)
                lv.virsh("undefine", "--nvram", name, check=False)
            lv.proc.send_signal(signal.SIGTERM)
            try:
                lv.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                lv.proc.kill()
                lv.proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def tcg(xml: bytes) -> bytes:
    """What we wrote, as a TCG domain: the daemon's user has no /dev/kvm."""
    out, n = re.subn(rb'(<domain\b[^>]*\btype=)"kvm"', rb'\1"qemu"', xml, count=1)
    assert n == 1, xml[:200]
    return out


def startable(xml: bytes, serial_log: str | None = None) -> bytes:
    """What we wrote, changed only where this session daemon differs from a KVM host:
    TCG; NICs on QEMU's user-mode network (a session daemon has no `default` network);
    VNC without a listening port (two daemons at once would both take 5900); with
    `serial_log`, the serial port written to that file instead of a pty (the console
    element, which mirrors the first serial port, goes with it)."""
    root = ET.fromstring(tcg(xml))
    devices = root.find("devices")
    for iface in devices.findall("interface"):
        assert iface.get("type") == "network"
        iface.set("type", "user")
        iface.remove(iface.find("source"))
    for graphics in devices.findall("graphics"):
        for attr in ("port", "autoport"):
            graphics.attrib.pop(attr, None)
        ET.SubElement(graphics, "listen", type="none")
    if serial_log is not None:
        serials = devices.findall("serial")
        assert [s.get("type") for s in serials] == ["pty"], "no serial console in our XML"
        assert devices.find("console") is not None
        devices.remove(devices.find("console"))
        serials[0].set("type", "file")
        ET.SubElement(serials[0], "source", path=serial_log)
        ET.SubElement(serials[0], "target", port="0")
    return ET.tostring(root)


def machine(name: str, **kw) -> MachineSpec:
    base = dict(
        name=name,
        cpus=2,
        memory=512 * MiB,
        firmware="bios",
        secure_boot=False,
        disks=[DiskSpec(f"{name}-disk1.qcow2", "qcow2", "virtio")],
        nics=[NicSpec("52:54:00:12:34:56", "virtio")],
        os="linux",
    )
    base.update(kw)
    return MachineSpec(**base)


VARIANTS = {
    "bios-q35-virtio": machine("bios-q35"),
    "bios-pc-ide": machine(
        "bios-pc", cpus=1, disks=[DiskSpec("old.img", "raw", "ide")], nics=[NicSpec("52:54:00:00:00:01", "e1000")],
    ),
    "uefi-q35-windows-sata": machine(
        "uefi-win", firmware="uefi", os="windows", memory=4096 * MiB,
        disks=[DiskSpec("w.qcow2", "qcow2", "sata")], nics=[NicSpec("52:54:00:00:00:09", "e1000e", "lan")],
    ),
    "uefi-secure-virtio-scsi": machine(
        "uefi-sb", firmware="uefi", secure_boot=True, cpus=4,
        disks=[DiskSpec("a.qcow2", "qcow2", "virtio"), DiskSpec("b.qcow2", "qcow2", "scsi")],
        nics=[NicSpec("52:54:00:00:00:0a", "virtio"), NicSpec("52:54:00:00:00:0b", "rtl8139", "dmz")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_define_dumpxml_round_trip_on_a_real_daemon(libvirtd, variant):
    spec = VARIANTS[variant]
    out = libvirtd.workdir(f"rt-{variant}")
    path = kvm.PLATFORM.write(spec, out)
    with open(path, "rb") as f:
        xml = tcg(f.read())
    with open(path, "wb") as f:
        f.write(xml)
    libvirtd.virsh("define", path)
    try:
        dumped = libvirtd.virsh("dumpxml", "--inactive", spec.name).stdout
        back = kvm.parse_domain(dumped.encode(), out, where="dumpxml")
    finally:
        libvirtd.virsh("undefine", "--nvram", spec.name)
    want = spec.replace(
        disks=[DiskSpec(os.path.join(out, d.path), d.format, d.bus) for d in spec.disks]
    )
    want.nics = [NicSpec(n.mac, n.model, n.network or "default") for n in spec.nics]
    assert back == want
    # the QEMU driver fills in a CPU model for TCG (qemu64); nothing else is left over
    assert set(back.warnings) <= {"settings not carried over: cpu"}, back.warnings
    # the machine type libvirt expanded is the one we asked for
    machine_type = ET.fromstring(dumped).find("os/type").get("machine")
    assert machine_type.startswith("pc-i440fx" if variant == "bios-pc-ide" else "pc-q35"), (
        machine_type
    )


@pytest.mark.parametrize("secure", [False, True], ids=["uefi", "uefi-secure-boot"])
def test_uefi_domain_starts_with_the_firmware_libvirt_selects(libvirtd, secure):
    """`<os firmware='efi'>` has no loader path: starting the domain proves libvirt finds
    an OVMF build (from the firmware descriptors of the ovmf package) matching the
    features we ask for."""
    need_tool("qemu-img")
    name = "efi-sb" if secure else "efi"
    out = libvirtd.workdir(f"start-{name}")
    spec = machine(name, firmware="uefi", secure_boot=secure, cpus=1, memory=128 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(out, spec.disks[0].path), "16M")
    path = kvm.PLATFORM.write(spec, out)
    with open(path, "rb") as f:
        xml = startable(f.read())
    with open(path, "wb") as f:
        f.write(xml)
    libvirtd.give(out)
    libvirtd.virsh("define", path)
    try:
        libvirtd.virsh("start", name)
        live = ET.fromstring(libvirtd.virsh("dumpxml", name).stdout)
        libvirtd.virsh("destroy", name)
    finally:
        libvirtd.virsh("undefine", "--nvram", name)
    os_el = ET.tostring(live.find("os"), encoding="unicode")
    loader = live.find("os/loader")
    assert loader is not None and loader.text, os_el
    assert loader.get("secure", "no") == ("yes" if secure else "no"), os_el
    # the descriptor libvirt picked offers exactly what the definition asks for
    features = firmware_features().get(loader.text.strip())
    assert features is not None, f"{loader.text} is in no firmware descriptor"
    assert ("secure-boot" in features, "enrolled-keys" in features) == (secure, secure), features
    assert live.find("os/nvram") is not None, os_el


def firmware_features() -> dict[str, set[str]]:
    """Executable path -> features, from the QEMU firmware descriptors libvirt reads."""
    out: dict[str, set[str]] = {}
    for path in glob.glob("/usr/share/qemu/firmware/*.json"):
        with open(path) as f:
            desc = json.load(f)
        executable = desc.get("mapping", {}).get("executable", {}).get("filename")
        if executable:
            out[executable] = set(desc.get("features", []))
    return out


# -- the boot test ----------------------------------------------------------------------


def debian_bzimage() -> str:
    """The bootable kernel (bzImage) of the QEMU tests' guest kernel package, cached beside
    that guest: a boot loader needs the bzImage, not the vmlinux those tests boot."""
    cache = build_guest.DEFAULT_CACHE
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = build_guest.kernel_package()
        target = os.path.join(cache, f"bzimage-{package}", "vmlinuz")
        if os.path.exists(target):
            return target
        deb = build_guest._download_kernel(cache, package)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            # only boot/ out of the package: its modules are a few hundred MB
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
            res = run(["tar", "-x", "-C", tmp, "--wildcards", "./boot/vmlinuz-*"], stdin=tar.stdout)
            tar.stdout.close()  # type: ignore[union-attr]
            assert tar.wait() == 0 and res.returncode == 0, res.stderr
            found = glob.glob(os.path.join(tmp, "boot", "vmlinuz-*"))
            assert found, f"{deb} holds no boot/vmlinuz-*"
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(found[0], target + ".tmp")
            os.replace(target + ".tmp", target)
        return target


def busybox_initrd(path: str) -> None:
    need_file(build_guest.BUSYBOX, "busybox-static")
    with tempfile.TemporaryDirectory() as root:
        for d in ("bin", "proc", "dev"):
            os.mkdir(os.path.join(root, d))
        shutil.copy(build_guest.BUSYBOX, os.path.join(root, "bin", "busybox"))
        with open(os.path.join(root, "init"), "w") as f:
            f.write(INIT_SCRIPT)
        os.chmod(os.path.join(root, "init"), 0o755)
        with open(path, "wb") as out:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                input=b"init\nbin\nbin/busybox\nproc\ndev\n",
                cwd=root,
                stdout=out,
                check=True,
            )


def bootable_disk(path: str, kernel: str, initrd: str, marker: str) -> None:
    """A 48 MiB raw disk: MBR (SYSLINUX's boot code), one FAT16 partition from 1 MiB with
    SYSLINUX, the kernel, the initramfs and a console=ttyS0 command line."""
    size, start = 48 * MiB, 1 * MiB
    with open(path, "wb") as f:
        f.truncate(size)

    def ok(cmd: list[str], **kw) -> None:
        res = run(cmd, **kw)
        assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"

    ok(["sfdisk", "-q", path], input=f"start={start // 512}, type=6, bootable\n")
    ok(["mkfs.fat", "-F", "16", "-n", "P2VBOOT", "--offset", str(start // 512), path,
        str((size - start) // 1024)])  # fmt: skip
    ok(["syslinux", "--install", "--offset", str(start), path])
    cfg = os.path.join(os.path.dirname(path), "syslinux.cfg")
    with open(cfg, "w") as f:
        f.write(SYSLINUX_CFG % marker)
    image = f"{path}@@{start}"
    for src, dst in ((kernel, "::/vmlinuz"), (initrd, "::/initrd"), (cfg, "::/syslinux.cfg")):
        ok(["mcopy", "-i", image, src, dst])
    with open(SYSLINUX_MBR, "rb") as f:
        mbr = f.read(440)
    with open(path, "r+b") as f:
        f.write(mbr)


def test_converted_disk_boots_to_its_serial_console(libvirtd, tmp_path):
    need_tool("sfdisk", "mkfs.fat", "syslinux", "mcopy", "cpio", "apt-get", "dpkg-deb", "qemu-img")
    need_file(SYSLINUX_MBR, "syslinux")
    try:
        kernel = debian_bzimage()
    except build_guest.GuestBuildError as exc:
        # as the QEMU migration tests: no package lists or no mirror is a skip locally
        unavailable(f"cannot get the guest kernel: {exc}")
    initrd = str(tmp_path / "initrd.cpio")
    busybox_initrd(initrd)
    marker = secrets.token_hex(8)
    source = str(tmp_path / "server.img")
    bootable_disk(source, kernel, initrd, marker)

    out = libvirtd.workdir("boot")
    name = f"p2v-boot-{marker[:6]}"
    res = p2v("v2v", "--to", "kvm", "--name", name, "--cpus", "1", "--memory", "256M",
              "--output", "json", source, out, check=True)  # fmt: skip
    [xml_path] = glob.glob(os.path.join(out, "*.xml"))
    spec = kvm.read_domain(xml_path)
    assert (spec.cpus, spec.memory, spec.firmware) == (1, 256 * MiB, "bios"), res.stdout
    [disk] = spec.disks
    assert disk.format == "qcow2" and disk.path.startswith(out), disk
    assert qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", source, disk.path).returncode == 0

    log = os.path.join(out, "serial.log")
    with open(xml_path, "rb") as f:
        xml = startable(f.read(), log)
    boot_xml = os.path.join(out, "boot.xml")
    with open(boot_xml, "wb") as f:
        f.write(xml)
    libvirtd.give(out)
    libvirtd.virsh("define", boot_xml)
    try:
        started = time.monotonic()
        libvirtd.virsh("start", name)
        found, state, text = None, "", "(no serial log)"
        while time.monotonic() - started < BOOT_TIMEOUT:
            if os.path.exists(log):
                with open(log, "rb") as f:
                    text = f.read().decode(errors="replace")
                # SYSLINUX's screen escapes may share the line with the marker
                found = re.search(rf"{MARKER} (\w*)\r?\n", text)
                if found:
                    break
            time.sleep(0.25)
        boot_s = time.monotonic() - started
        assert found, f"no {MARKER} line in {BOOT_TIMEOUT:.0f} s; serial log:\n{text[-2000:]}"
        # the command line came from the converted disk's syslinux.cfg
        assert found[1] == marker
        # poweroff ends the domain (on_poweroff destroy): the guest ran to its end
        while time.monotonic() - started < BOOT_TIMEOUT:
            state = libvirtd.virsh("domstate", name).stdout.strip()
            if state == "shut off":
                break
            time.sleep(0.25)
        assert state == "shut off"
        print(f"boot to marker under TCG: {boot_s:.1f} s")
    finally:
        libvirtd.virsh("destroy", name, check=False)
        libvirtd.virsh("undefine", name)

"""Boot a test server's disk under QEMU, as its physical machine or as a VM definition
describes, and log in over SSH.

- `boot_physical`: the "physical" server: i440fx (`pc`), its disk on an ICH9 AHCI
  controller, an e1000 NIC in slot 3 with the server's pinned MAC.
- `boot_definition`: the hardware a libvirt domain XML (drivers/kvm.py) describes. The
  XML is first defined in an embedded libvirt driver (`qemu:///embed`, run as `nobody`,
  nothing started) so that libvirt itself fills in the machine type and the PCI addresses
  a real host would give each device: they decide the guest's predictable interface
  names (enp1s0). That expanded definition becomes the QEMU command line, device by
  device, with only the network backend swapped.

Either way the network is QEMU's user mode with `restrict=on` (the guest reaches nothing
but the host's forwarded port) and one forward, 127.0.0.1:PORT to the guest's port 22.
The serial console goes to a file the tests read. Disks are never written: QEMU runs on
a throwaway qcow2 overlay unless the builder asks for the image itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import paramiko

#: the unprivileged user the embedded libvirt driver runs as (root needs libvirt-qemu)
LIBVIRT_USER = "nobody"
_NIC_DEVICE = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
               "rtl8139": "rtl8139"}  # fmt: skip


class BootError(RuntimeError):
    """QEMU could not start, or a definition asks for hardware this harness cannot give."""


@dataclass
class Completed:
    status: int
    stdout: str
    stderr: str


class Shell:
    """A root SSH session on a booted server."""

    def __init__(self, client: paramiko.SSHClient):
        self._client = client

    def run(self, command: str, timeout: float = 300) -> Completed:
        _stdin, stdout, stderr = self._client.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return Completed(stdout.channel.recv_exit_status(), out, err)

    def close(self) -> None:
        self._client.close()


@dataclass
class Machine:
    """A running QEMU: its serial log and the host port forwarded to its SSH port."""

    proc: subprocess.Popen
    serial_log: str
    port: int
    command: list[str]

    def serial(self) -> str:
        try:
            with open(self.serial_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait_for_serial(self, pattern: str, timeout: float) -> re.Match | None:
        """The first match of `pattern` in the serial log within `timeout`, or None."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.serial())
            if found or time.monotonic() > deadline or not self.is_alive():
                return found or regex.search(self.serial())
            time.sleep(1)

    def wait_for_ssh(self, identity: str, host_key: str, timeout: float) -> Shell:
        """Log in as root with `identity`, trusting only `host_key` ("type base64"); retry
        until `timeout` (a TCG boot on a loaded machine takes minutes)."""
        key_type, key_data = host_key.split()[:2]
        known = paramiko.PKey.from_type_string(key_type, _b64(key_data))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise BootError(f"QEMU exited ({self.proc.returncode}); serial: {self.tail()}")
            if not self._banner():
                time.sleep(3)
                continue
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{self.port}", key_type, known)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    "127.0.0.1",
                    self.port,
                    username="root",
                    key_filename=identity,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=20,
                    banner_timeout=60,
                    auth_timeout=60,
                )
                return Shell(client)
            except (OSError, paramiko.SSHException) as exc:
                last = exc
                client.close()
                time.sleep(3)
        raise BootError(f"no SSH login in {timeout:.0f} s ({last}); serial: {self.tail()}")

    def _banner(self) -> bool:
        """Whether sshd answers: QEMU's user network accepts a forwarded connection even
        when nothing listens in the guest, then closes it."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.settimeout(30)
                return s.recv(4) == b"SSH-"
        except OSError:
            return False

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.serial().splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _netdev(port: int, ident: str = "net0") -> str:
    return f"user,id={ident},restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"


def _overlay(image: str, fmt: str, workdir: str, name: str) -> str:
    path = os.path.join(workdir, f"{name}.overlay.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(image), "-F", fmt,
         path],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return path


def _base(accel: str, machine: str, memory_mib: int, cpus: int, serial_log: str) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-no-user-config",
        "-nodefaults",
        "-display", "none",
        "-machine", f"{machine},accel={accel}",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        "-serial", f"file:{serial_log}",
    ]  # fmt: skip


@contextlib.contextmanager
def _running(command: list[str], serial_log: str, port: int) -> Iterator[Machine]:
    if os.path.exists(serial_log):
        os.unlink(serial_log)
    errors = serial_log + ".qemu-stderr"
    with open(errors, "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    vm = Machine(proc, serial_log, port, command)
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            with open(errors, errors="replace") as f:
                raise BootError(f"QEMU exited ({proc.returncode}): {f.read().strip()[-500:]}")
        yield vm
    finally:
        vm.kill()


@contextlib.contextmanager
def boot_physical(
    image: str,
    mac: str,
    serial_log: str,
    *,
    accel: str = "tcg",
    snapshot: bool = True,
    memory_mib: int = 1024,
) -> Iterator[Machine]:
    """Boot `image` (qcow2) as the physical server: pc, AHCI disk, e1000 in slot 3."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="p2v-boot-") as workdir:
        disk = _overlay(image, "qcow2", workdir, "physical") if snapshot else image
        command = [
            *_base(accel, "pc", memory_mib, 1, serial_log),
            "-device", "ich9-ahci,id=ahci,addr=0x4",
            "-drive", f"if=none,id=disk0,file={disk},format=qcow2",
            "-device", "ide-hd,drive=disk0,bus=ahci.0,bootindex=1",
            "-netdev", _netdev(port),
            "-device", f"e1000,netdev=net0,mac={mac},addr=0x3",
        ]  # fmt: skip
        with _running(command, serial_log, port) as vm:
            yield vm


# -- a libvirt definition's hardware ----------------------------------------------------


def expand_definition(xml: bytes) -> ET.Element:
    """The domain as libvirt defines it: machine type and PCI addresses filled in by an
    embedded libvirt driver (nothing is started)."""
    root = ET.fromstring(xml)
    # the unprivileged driver cannot use KVM; the type changes no address
    root.set("type", "qemu")
    user = pwd.getpwnam(LIBVIRT_USER)
    workdir = tempfile.mkdtemp(prefix="p2v-embed-")
    try:
        name = root.findtext("name") or "guest"
        path = os.path.join(workdir, "domain.xml")
        with open(path, "wb") as f:
            f.write(ET.tostring(root))
        for dirpath, _dirs, files in os.walk(workdir):
            os.chown(dirpath, user.pw_uid, user.pw_gid)
            for n in files:
                os.chown(os.path.join(dirpath, n), user.pw_uid, user.pw_gid)
        res = subprocess.run(
            ["virsh", "-q", "-c", f"qemu:///embed?root={workdir}/root",
             f"define {path}; dumpxml --inactive {name}"],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": workdir},
            user=user.pw_uid, group=user.pw_gid, extra_groups=[],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            raise BootError(f"libvirt refused the definition: {res.stderr.strip()}")
        out = res.stdout[res.stdout.index("<domain") :]
        return ET.fromstring(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _pci(el: ET.Element, root_bus: str) -> str:
    """`bus=...,addr=...` for a device's libvirt <address type='pci'>."""
    addr = el.find("address")
    if addr is None or addr.get("type") != "pci":
        raise BootError(f"no PCI address for {ET.tostring(el)[:120]!r}")
    bus = int(addr.get("bus", "0"), 16)
    slot = int(addr.get("slot", "0"), 16)
    function = int(addr.get("function", "0"), 16)
    out = f"bus={root_bus if bus == 0 else f'pci.{bus}'},addr={slot:#x}.{function:x}"
    if addr.get("multifunction") == "on":
        out += ",multifunction=on"
    return out


def definition_command(
    dom: ET.Element, serial_log: str, port: int, accel: str, workdir: str
) -> list[str]:
    """The QEMU command line for an expanded libvirt domain; every disk on an overlay."""
    if dom.find("os").get("firmware") == "efi" or dom.find("os/loader") is not None:
        raise BootError("UEFI definitions are not booted by this harness")
    machine = dom.find("os/type").get("machine")
    root_bus = "pcie.0" if "q35" in machine else "pci.0"
    memory_mib = int(dom.findtext("memory")) // 1024
    cpus = min(int(dom.findtext("vcpu")), 2)
    cmd = _base(accel, machine, memory_mib, cpus, serial_log)
    devices = dom.find("devices")
    # root ports first, in bus order: libvirt lists a definition's own ports before the
    # controllers it adds (qemu-xhci behind pci.2), and QEMU needs a bus before its devices
    ports_first = sorted(
        devices.findall("controller"),
        key=lambda c: (c.get("model") != "pcie-root-port", int(c.get("index", "0"))),
    )
    for ctl in ports_first:
        model = ctl.get("model")
        if ctl.get("type") == "pci" and model == "pcie-root-port":
            target = ctl.find("target")
            cmd += ["-device", f"pcie-root-port,id=pci.{ctl.get('index')},"
                    f"chassis={target.get('chassis')},port={target.get('port')},"
                    f"{_pci(ctl, root_bus)}"]  # fmt: skip
        elif ctl.get("type") == "usb" and model == "qemu-xhci":
            cmd += ["-device", f"qemu-xhci,id=usb,{_pci(ctl, root_bus)}"]
        elif ctl.get("type") == "scsi" and model == "virtio-scsi":
            cmd += ["-device", f"virtio-scsi-pci,id=scsi{ctl.get('index')},{_pci(ctl, root_bus)}"]
    for i, disk in enumerate(devices.findall("disk")):
        fmt = disk.find("driver").get("type", "raw")
        overlay = _overlay(disk.find("source").get("file"), fmt, workdir, f"disk{i}")
        cmd += ["-drive", f"if=none,id=drive{i},file={overlay},format=qcow2"]
        bus = disk.find("target").get("bus")
        boot = ",bootindex=1" if i == 0 else ""
        if bus == "virtio":
            cmd += ["-device", f"virtio-blk-pci,drive=drive{i},{_pci(disk, root_bus)}{boot}"]
        elif bus == "sata" and "q35" in machine:
            unit = int(disk.find("address").get("unit", "0"))
            cmd += ["-device", f"ide-hd,drive=drive{i},bus=ide.{unit}{boot}"]
        elif bus == "scsi":
            cmd += ["-device", f"scsi-hd,drive=drive{i},bus=scsi0.0{boot}"]
        else:
            raise BootError(f"disk bus {bus} on {machine} is not booted by this harness")
    for i, nic in enumerate(devices.findall("interface")):
        model = nic.find("model").get("type")
        if model not in _NIC_DEVICE:
            raise BootError(f"NIC model {model} is not booted by this harness")
        mac = nic.find("mac").get("address")
        # only the first NIC gets the SSH forward; the others a restricted network
        net = _netdev(port, f"net{i}") if i == 0 else f"user,id=net{i},restrict=on"
        cmd += ["-netdev", net,
                "-device", f"{_NIC_DEVICE[model]},netdev=net{i},mac={mac},"
                f"{_pci(nic, root_bus)}"]  # fmt: skip
    balloon = devices.find("memballoon")
    if balloon is not None and balloon.get("model") == "virtio":
        cmd += ["-device", f"virtio-balloon-pci,{_pci(balloon, root_bus)}"]
    video = devices.find("video/model")
    if video is not None and video.get("type") == "vga":
        cmd += ["-device", f"VGA,{_pci(devices.find('video'), root_bus)}"]
    return cmd


@contextlib.contextmanager
def boot_definition(xml_path: str, serial_log: str, *, accel: str = "tcg") -> Iterator[Machine]:
    """Boot the machine the libvirt domain XML at `xml_path` describes."""
    with open(xml_path, "rb") as f:
        dom = expand_definition(f.read())
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="p2v-boot-") as workdir:
        command = definition_command(dom, serial_log, port, accel, workdir)
        with _running(command, serial_log, port) as vm:
            yield vm

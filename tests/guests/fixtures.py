"""What the boot tests share: a built server or a skip with the reason (a failure under
CI, where `make test` installs everything), the accelerator, and the timeouts."""

from __future__ import annotations

import glob
import json
import os

from tests.external import need_root, need_tool, unavailable
from tests.guests import boot, servers

#: a full Debian boot under TCG on a loaded 2-core machine takes minutes, never 15
BOOT_TIMEOUT = 900.0


def server(name: str) -> servers.Server:
    """Server `name`, built (once, cached) for this test session."""
    need_root()
    need_tool("mmdebstrap", "qemu-system-x86_64", "qemu-img", "virsh")
    missing = servers.missing_tools()
    if missing:
        unavailable(f"missing for the test servers: {', '.join(missing)} (make test installs them)")
    if not os.path.exists("/boot") or not any(n.startswith("vmlinuz") for n in os.listdir("/boot")):
        # supermin builds the libguestfs appliance from the host's kernel
        unavailable(
            "no kernel in /boot for the libguestfs appliance (Debian package linux-image-amd64)"
        )
    return servers.build(name)


def accel() -> str:
    return servers.accelerator()


def definition(out: str) -> str:
    found = glob.glob(os.path.join(out, "*.xml"))
    assert len(found) == 1, os.listdir(out)
    return found[0]


def expected_interface(xml: str) -> str:
    """The name Linux gives the definition's first NIC, from libvirt's PCI address."""
    with open(xml, "rb") as f:
        dom = boot.expand_definition(f.read())
    addr = dom.find("devices/interface/address")
    bus, slot = int(addr.get("bus"), 16), int(addr.get("slot"), 16)
    return f"enp{bus}s{slot}" if bus else f"ens{slot}"


def assert_boots_converted(srv: servers.Server, xml: str, workdir: str) -> None:
    """Boot the definition's hardware and check the server from the inside."""
    interface = expected_interface(xml)
    log = os.path.join(workdir, "vm.log")
    with boot.boot_definition(xml, log, accel=accel()) as vm:
        shell = vm.wait_for_ssh(srv.identity, srv.host_key, BOOT_TIMEOUT)
        try:
            root = shell.run("findmnt -no SOURCE,FSTYPE,OPTIONS /")
            links = shell.run("ip -j -4 addr show scope global")
            tools = shell.run("dpkg-query -W -f '${Status}' open-vm-tools")
            disks = shell.run("lsblk -dno NAME")
        finally:
            shell.close()
    source, fstype, options = root.stdout.split()
    assert "rw" in options.split(","), root.stdout
    assert fstype == "ext4"
    # the root is on the virtio disk (vda), not on a disk the VM does not have
    assert disks.stdout.split() == ["vda"], disks.stdout
    if srv.layout == "lvm":
        assert source == "/dev/mapper/vg0-root", source
    else:
        assert source == "/dev/vda1", source
    addresses = [
        (link["ifname"], a["local"])
        for link in json.loads(links.stdout)
        for a in link.get("addr_info", [])
    ]
    # the address is on the NIC the definition describes, under the name its PCI address
    # gives it (systemd's predictable names: enp<bus>s<slot>)
    assert (interface, True) in [(name, addr.startswith("10.0.2.")) for name, addr in addresses], (
        links.stdout
    )
    assert "install ok installed" not in tools.stdout, tools.stdout


def _sh(shell: boot.Shell, command: str) -> str:
    res = shell.run(command)
    assert res.status == 0, f"{command}: {res.status} {res.stderr}"
    return res.stdout


def assert_traps_in_place(srv: servers.Server, shell: boot.Shell) -> None:
    """Server `srv`, booted as its physical machine, is what issue 18 describes: the NIC
    named and addressed as expected, root and GRUB by /dev/sda1 or on LVM, no virtio in
    the initramfs (a host-only dracut image for b), VMware's tools on a."""
    # the NIC has the pinned MAC, the name the issue expects and a DHCP address
    link = _sh(shell, f"ip -o addr show dev {srv.interface}")
    assert " inet 10.0.2." in link, link
    assert srv.mac in _sh(shell, f"cat /sys/class/net/{srv.interface}/address")
    root = _sh(shell, "findmnt -no SOURCE,OPTIONS /")
    kernel = _sh(shell, "uname -r").strip()
    cmdline = _sh(shell, "cat /proc/cmdline")
    if srv.name == "a":
        assert root.split()[0] == "/dev/sda1", root
        assert "root=/dev/sda1" in cmdline, cmdline
        assert "iface ens3 inet dhcp" in _sh(shell, "cat /etc/network/interfaces")
        assert _sh(shell, "cat /etc/fstab").startswith("/dev/sda1 ")
        assert "MODULES=list" in _sh(shell, "cat /etc/initramfs-tools/initramfs.conf")
        _sh(shell, "dpkg -s open-vm-tools")
        files = _sh(shell, f"lsinitramfs /boot/initrd.img-{kernel}")
    else:
        assert root.split()[0] == "/dev/mapper/vg0-root", root
        assert "vg0" in _sh(shell, "vgs --noheadings -o vg_name")
        assert "MACAddress=" + srv.mac in _sh(shell, "cat /etc/systemd/network/10-lan.network")
        assert _sh(shell, "systemctl is-active systemd-networkd").strip() == "active"
        files = _sh(shell, f"lsinitrd /boot/initrd.img-{kernel}")
        # built host-only on this machine by the first boot ("Arguments: -f -H ...")
        arguments = next(line for line in files.splitlines() if line.startswith("Arguments:"))
        assert " -H " in f"{arguments} ", arguments
        assert "/dm-mod.ko" in files or "/dm_mod.ko" in files
    assert "rw" in root.split()[1].split(","), root
    assert "/ahci.ko" in files
    assert "/e1000.ko" in files or srv.name == "b"
    for driver in ("virtio_blk", "virtio_net", "virtio_scsi"):
        assert f"/{driver}.ko" not in files, f"{driver} in the initramfs of server {srv.name}"

"""Each platform's GuestHardware: the drivers and interface names the conversion uses
agree with the definition the platform writes."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest

import drivers
from drivers import kvm
from drivers.guest.initramfs import add_modules, contains
from drivers.machine import DiskSpec, MachineSpec, NicSpec


def spec(bus=None, nic=None, nics=1):
    return MachineSpec(
        name="s", cpus=1, memory=1 << 30, disks=[DiskSpec("a.img", "qcow2", bus)],
        nics=[NicSpec(f"52:54:00:00:00:0{i + 1}", nic) for i in range(nics)], os="linux",
    )  # fmt: skip


@pytest.mark.parametrize(
    "platform, disk, nic, name",
    [
        ("kvm", "virtio_blk", "virtio_net", "enp1s0"),
        ("vmware", "vmw_pvscsi", "vmxnet3", "ens192"),
        ("hyperv", "hv_storvsc", "hv_netvsc", "eth0"),
        ("azure", "hv_storvsc", "hv_netvsc", "eth0"),
        ("xen", "xen_blkfront", "xen_netfront", "eth0"),
        ("aws", "nvme", "ena", "ens5"),
        ("virtualbox", "ahci", "e1000", "enp0s3"),
    ],
)
def test_platform_drivers_and_names(platform, disk, nic, name):
    p = drivers.get_platform(platform)
    hw = p.guest_hardware(spec())
    assert disk in hw.disk_drivers and nic in hw.nic_drivers
    assert hw.interface_names == (name,)


def test_kvm_definition_places_nics_where_the_names_say(tmp_path):
    s = kvm.PLATFORM.complete(spec(nics=3))
    root = ET.fromstring(kvm.domain_xml(s, str(tmp_path)))
    buses = [int(a.get("bus"), 16) for a in root.findall("devices/interface/address")]
    ports = {
        int(c.get("index")) for c in root.findall("devices/controller[@model='pcie-root-port']")
    }
    names = kvm.PLATFORM.guest_hardware(s).interface_names
    assert names == ("enp1s0", "enp2s0", "enp3s0")
    assert [f"enp{b}s0" for b in buses] == list(names) and set(buses) <= ports
    ide = kvm.PLATFORM.complete(spec(bus="ide", nics=2))
    root = ET.fromstring(kvm.domain_xml(ide, str(tmp_path)))
    slots = [int(a.get("slot"), 16) for a in root.findall("devices/interface/address")]
    assert root.find("os/type").get("machine") == "pc"
    assert [f"ens{s}" for s in slots] == list(kvm.PLATFORM.guest_hardware(ide).interface_names)


def test_initramfs_modules_file_and_listing():
    text, changes = add_modules(
        "# comment\nahci\nvirtio-blk\n", ("virtio_blk", "virtio_net"), "kvm"
    )
    assert text.endswith("virtio_net\n") and text.count("virtio") == 2 and changes
    assert add_modules(text, ("virtio_net",), "kvm") == (text, [])
    listing = "usr/lib/modules/6.1.0-18-amd64/kernel/drivers/block/virtio_blk.ko\nusr/lib/modules/6.1.0/kernel/drivers/block/xen-blkfront.ko.xz\n"
    assert contains(listing, "virtio_blk") and contains(listing, "xen_blkfront")
    assert not contains(listing, "virtio_net")

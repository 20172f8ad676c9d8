"""Fitting a machine to a platform: which buses and NIC models survive, what is reported."""

from __future__ import annotations

import pytest

import drivers
from drivers import DriverError, MachineSpec
from drivers.machine import DiskSpec, NicSpec

MiB = 1 << 20


def vm(bus="scsi", model="vmxnet3", os=None, firmware="bios", **kw):
    return MachineSpec(
        name="vm",
        cpus=2,
        memory=kw.pop("memory", 1000 * MiB),
        firmware=firmware,
        disks=[DiskSpec("a.vmdk", "vmdk", bus), DiskSpec("b.vmdk", "vmdk", bus)],
        nics=[NicSpec("00:50:56:01:02:03", model, "VM Network")],
        os=os,
        **kw,
    )


def test_platform_names_known_before_loading_match_the_drivers():
    assert tuple(drivers.PLATFORMS) == drivers.NAMES
    assert all(drivers.PLATFORMS[n].name == n for n in drivers.NAMES)
    with pytest.raises(DriverError, match="one of: kvm, vmware"):
        drivers.get_platform("bochs")


def test_kvm_turns_vendor_scsi_into_virtio_and_reports_it():
    out = drivers.get_platform("kvm").adapt(vm())
    assert [d.bus for d in out.spec.disks] == ["virtio", "virtio"]
    assert out.spec.nics[0].model == "virtio"
    assert out.spec.nics[0].mac == "00:50:56:01:02:03"
    assert "disk 1 bus: scsi -> virtio" in out.changes
    assert "NIC 1 (00:50:56:01:02:03) model: vmxnet3 -> virtio" in out.changes
    assert "NIC 1 network: VM Network -> default" in out.changes
    assert "firmware: bios (kept)" in out.changes


def test_windows_gets_inbox_drivers_on_kvm():
    out = drivers.get_platform("kvm").adapt(vm(os="windows"))
    assert [d.bus for d in out.spec.disks] == ["sata", "sata"]
    assert out.spec.nics[0].model == "e1000e"


def test_portable_buses_and_nics_are_kept():
    out = drivers.get_platform("kvm").adapt(vm(bus="sata", model="e1000"))
    assert [d.bus for d in out.spec.disks] == ["sata", "sata"]
    assert out.spec.nics[0].model == "e1000"
    assert not any("bus" in c or "model" in c for c in out.changes)


def test_overrides_and_refusals():
    kvm = drivers.get_platform("kvm")
    out = kvm.adapt(vm(), bus="scsi", nic_model="e1000e", network="lan")
    assert {d.bus for d in out.spec.disks} == {"scsi"}
    assert out.spec.nics[0].network == "lan"
    with pytest.raises(DriverError, match="not offered"):
        kvm.adapt(vm(), bus="nvme")
    with pytest.raises(DriverError, match="not usable"):
        drivers.get_platform("vmware").disk_target("qcow2")


def test_memory_is_rounded_to_the_platform_granularity():
    out = drivers.get_platform("vmware").adapt(vm(memory=1001 * MiB))
    assert out.spec.memory == 1004 * MiB
    assert any(c.startswith("memory:") for c in out.changes)


def test_xen_drops_secure_boot_and_says_so():
    out = drivers.get_platform("xen").adapt(vm(firmware="uefi", secure_boot=True))
    assert out.spec.secure_boot is False
    assert "Secure Boot: on -> off (not offered)" in out.changes


def test_hyperv_generation_rules():
    hv = drivers.get_platform("hyperv")
    gen1 = hv.adapt(vm(bus="sata")).spec
    assert [d.bus for d in gen1.disks] == ["ide", "ide"]
    gen2 = hv.adapt(vm(bus="ide", firmware="uefi")).spec
    assert [d.bus for d in gen2.disks] == ["scsi", "scsi"]
    assert gen2.nics[0].model == "netvsc"


@pytest.mark.parametrize(
    "name, fmt, options",
    [
        ("kvm", "qcow2", {}),
        ("vmware", "vmdk", {"subformat": "monolithicSparse"}),
        ("vsphere", "vmdk", {"subformat": "streamOptimized"}),
        ("virtualbox", "vdi", {}),
        ("hyperv", "vhdx", {}),
        ("xen", "raw", {}),
        ("azure", "vpc", {"subformat": "fixed", "force_size": "on"}),
        ("aws", "vmdk", {"subformat": "streamOptimized"}),
    ],
)
def test_each_platform_names_its_preferred_disk(name, fmt, options):
    p = drivers.get_platform(name)
    assert p.disk.format == fmt
    assert dict(p.disk.options) == options


def test_azure_rounds_sizes_to_whole_mib():
    az = drivers.get_platform("azure").disk
    assert az.size_for(20 * MiB + 1) == 21 * MiB
    assert az.size_for(21 * MiB) == 21 * MiB
    with pytest.raises(DriverError, match="fixed VHD"):
        drivers.get_platform("azure").disk_target("vhdx")


def test_unknown_platform():
    with pytest.raises(DriverError, match="unknown platform"):
        drivers.get_platform("bochs")
    assert drivers.get_platform("libvirt").name == "kvm"


def test_write_definition_completes_an_inventory_spec(tmp_path):
    # what p2v clone hands over: relative disk paths, no bus, NICs with MACs only
    spec = MachineSpec.from_dict(
        {
            "name": "server1",
            "cpus": 4,
            "memory": 8 << 30,
            "firmware": "uefi",
            "os": "linux",
            "disks": [{"path": "sda.qcow2", "format": "qcow2", "size": 10 << 30}],
            "nics": [{"mac": "0c:c4:7a:01:02:03"}],
        }
    )
    path = drivers.write_definition(spec, "kvm", str(tmp_path))
    back = drivers.read_definition(path)
    assert back.disks == [DiskSpec(str(tmp_path / "sda.qcow2"), "qcow2", "virtio")]
    assert back.nics[0].mac == "0c:c4:7a:01:02:03" and back.nics[0].model == "virtio"

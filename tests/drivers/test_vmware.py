"""The .vmx writer against the keys VMware documents, and the .vmx reader on what
Workstation writes; the vsphere platform's OVF package."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings

from drivers import DriverError, vmware
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.drivers.strategies import machines

MiB = 1 << 20

# keys VMware's documentation (VMX configuration reference, KB articles on pvscsi,
# vmxnet3, EFI and Secure Boot, static MAC addresses) describes, N = controller/slot
DOCUMENTED = [
    r"\.encoding", r"config\.version", r"virtualHW\.version", r"displayName", r"guestOS",
    r"numvcpus", r"memSize", r"firmware", r"uefi\.secureBoot\.enabled",
    r"pciBridge\d+\.(present|virtualDev|functions)",
    r"(scsi|sata|nvme|ide)\d+\.present", r"scsi\d+\.virtualDev",
    r"(scsi|sata|nvme|ide)\d+:\d+\.(present|fileName|deviceType)",
    r"ethernet\d+\.(present|virtualDev|networkName|connectionType|addressType|address|checkMACAddress)",
    r"tools\.syncTime",
]  # fmt: skip
GUEST_OS = {"otherlinux-64", "windows9srv-64", "other-64"}
SCSI_DEVS = {"pvscsi", "lsilogic", "lsisas1068", "buslogic"}
NIC_DEVS = {"vmxnet3", "e1000", "e1000e", "vlance"}


def machine(**kw):
    base = dict(
        name='db "primary"',
        cpus=4,
        memory=4096 * MiB,
        firmware="uefi",
        secure_boot=True,
        disks=[
            DiskSpec("db-disk1.vmdk", "vmdk", "scsi"),
            DiskSpec("db-disk2.vmdk", "vmdk", "sata"),
        ],
        nics=[
            NicSpec("00:50:56:01:02:03", "vmxnet3"),
            NicSpec("52:54:00:01:02:03", "e1000e", "lan"),
        ],
        os="linux",
    )
    base.update(kw)
    return MachineSpec(**base)


def test_vmx_uses_only_documented_keys_and_values(tmp_path):
    text = vmware.vmx_text(machine(), str(tmp_path))
    keys = vmware.parse_vmx_text(text, "t")
    raw_keys = [line.split(" = ")[0] for line in text.splitlines()]
    for key in raw_keys:
        assert any(re.fullmatch(p, key) for p in DOCUMENTED), key
    assert keys["guestos"] in GUEST_OS
    assert keys["scsi0.virtualdev"] in SCSI_DEVS
    assert {keys["ethernet0.virtualdev"], keys["ethernet1.virtualdev"]} <= NIC_DEVS
    assert int(keys["memsize"]) % 4 == 0
    assert keys["virtualhw.version"] == "14"  # Secure Boot needs hardware version 14
    assert keys["firmware"] == "efi" and keys["uefi.secureboot.enabled"] == "TRUE"
    # a MAC outside VMware's static range is kept, with the check that would refuse it off
    assert keys["ethernet1.address"] == "52:54:00:01:02:03"
    assert keys["ethernet1.checkmacaddress"] == "FALSE"
    assert "ethernet0.checkmacaddress" not in keys
    assert 'displayName = "db |22primary|22"' in text


def test_many_scsi_disks_skip_unit_seven(tmp_path):
    disks = [DiskSpec(f"d{i}.vmdk", "vmdk", "scsi") for i in range(17)]
    keys = vmware.parse_vmx_text(vmware.vmx_text(machine(disks=disks), str(tmp_path)), "t")
    assert "scsi0:7.filename" not in keys
    assert keys["scsi0:8.filename"] == "d7.vmdk"
    assert keys["scsi1:0.filename"] == "d15.vmdk" and keys["scsi1.present"] == "TRUE"


@settings(max_examples=40, deadline=None)
@given(
    machines(
        buses=("scsi", "sata", "nvme", "ide"),
        nic_models=("vmxnet3", "e1000e", "e1000", "pcnet"),
        extensions=("vmdk",),
        max_disks=2,
    )
)
def test_written_vmx_reads_back_the_same(tmp_path_factory, m):
    out = tmp_path_factory.mktemp("vmx")
    m = m.replace(memory=-(-m.memory // (4 * MiB)) * 4 * MiB)
    back = vmware.read_vmx(vmware.PLATFORM.write(m, str(out)))
    want = m.replace(disks=[DiskSpec(str(out / d.path), "vmdk", d.bus) for d in m.disks])
    want.nics = [NicSpec(n.mac, n.model, "VM Network") for n in m.nics]
    want.os = m.os or "other"  # a .vmx always names a guestOS: unknown is written as other
    assert back == want
    assert back.warnings == []


WORKSTATION_VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "Ubuntu |2264-bit|22"
guestOS = "ubuntu-64"
memsize = "4096"
numvcpus = "2"
firmware = "efi"
scsi0.virtualDev = "lsilogic"
scsi0.present = "TRUE"
scsi0:0.fileName = "Ubuntu 64-bit.vmdk"
scsi0:0.present = "TRUE"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "/isos/ubuntu.iso"
sata0:1.present = "TRUE"
ethernet0.connectionType = "nat"
ethernet0.addressType = "generated"
ethernet0.virtualDev = "e1000"
ethernet0.present = "TRUE"
ethernet0.generatedAddress = "00:0C:29:4D:5E:6F"
sound.present = "TRUE"
usb.present = "TRUE"
floppy0.present = "FALSE"
uuid.bios = "56 4d 2a 1b 3c 4d 5e 6f-70 81 92 a3 b4 c5 d6 e7"
sharedFolder0.present = "TRUE"
vhv.enable = "TRUE"
"""


def test_reads_what_workstation_writes(tmp_path):
    vmx = tmp_path / "Ubuntu 64-bit.vmx"
    vmx.write_text(WORKSTATION_VMX)
    spec = vmware.read_vmx(str(vmx))
    assert spec.name == 'Ubuntu "64-bit"'
    assert (spec.cpus, spec.memory, spec.firmware, spec.os) == (2, 4096 * MiB, "uefi", "linux")
    assert spec.disks == [DiskSpec(str(tmp_path / "Ubuntu 64-bit.vmdk"), "vmdk", "scsi")]
    assert spec.nics == [NicSpec("00:0c:29:4d:5e:6f", "e1000", None)]
    assert "devices not carried over: CD drive sata0:1" in spec.warnings
    assert "settings not carried over: sharedfolder0, vhv" in spec.warnings


@pytest.mark.parametrize(
    "extra, match",
    [
        ('scsi0:0.fileName = "/etc/shadow"', "absolute"),
        ('scsi0:0.fileName = "../other/disk.vmdk"', "escapes the source directory"),
        ('memsize = "99999999999"', "absurd"),
        ('numvcpus = "0"', "absurd"),
        ("this is not a vmx line", "is not 'key"),
        ('ethernet0.generatedAddress = "01:00:5e:00:00:01"', "multicast"),
    ],
)
def test_bad_vmx_gives_one_line_errors(tmp_path, extra, match):
    vmx = tmp_path / "bad.vmx"
    vmx.write_text(WORKSTATION_VMX + extra + "\n")
    with pytest.raises(DriverError, match=match) as info:
        vmware.read_vmx(str(vmx))
    assert "\n" not in str(info.value)


def test_symlinked_disk_leading_outside_is_refused(tmp_path):
    (tmp_path / "outside.vmdk").write_bytes(b"x")
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    (vmdir / "disk.vmdk").symlink_to(tmp_path / "outside.vmdk")
    (vmdir / "vm.vmx").write_text(
        'memsize = "512"\nscsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "disk.vmdk"\n'
    )
    with pytest.raises(DriverError, match="outside the source directory"):
        vmware.read_vmx(str(vmdir / "vm.vmx"))


def test_vsphere_writes_an_ovf_package(tmp_path):
    from formats.ovf import describe

    for d in ("a.vmdk", "b.vmdk"):
        (tmp_path / d).write_bytes(b"x" * 100)
    spec = machine(
        disks=[
            DiskSpec("a.vmdk", "vmdk", "scsi", 10 * MiB),
            DiskSpec("b.vmdk", "vmdk", "scsi", 20 * MiB),
        ]
    )
    path = vmware.VSPHERE.write(spec, str(tmp_path))
    assert path.endswith(".ovf")
    info = describe(path)
    assert info["manifest"] == "sha256"
    assert info["machine"]["secure_boot"] is True
    assert [d["controller"] for d in info["machine"]["disks"]] == ["VirtualSCSI", "VirtualSCSI"]
    assert [n["mac"] for n in info["machine"]["nics"]] == ["00:50:56:01:02:03", "52:54:00:01:02:03"]

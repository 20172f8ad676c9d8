"""read_definition: one entry point for every kind of definition."""

from __future__ import annotations

from pathlib import Path

import pytest

import drivers
from drivers import DriverError
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from formats.errors import FormatError

MiB = 1 << 20

SPEC = MachineSpec(
    name="box",
    cpus=2,
    memory=1024 * MiB,
    firmware="uefi",
    disks=[DiskSpec("box-disk1.vmdk", "vmdk", "scsi", 64 * MiB)],
    nics=[NicSpec("52:54:00:aa:bb:cc", "e1000")],
    os="linux",
)


@pytest.mark.parametrize("platform", ["kvm", "vmware", "vsphere", "virtualbox", "hyperv", "xen"])
def test_every_written_definition_reads_back(tmp_path, platform):
    target = drivers.get_platform(platform)
    # VirtualBox's OVF (what its reader reads) is written for VMDK disks; VDI gets a script
    disk = target.disk_target("vmdk") if platform == "virtualbox" else target.disk
    name = f"box-disk1.{disk.extension}"
    (tmp_path / name).write_bytes(b"x" * 512)
    spec = target.adapt(SPEC).spec
    spec.disks = [DiskSpec(name, disk.format, d.bus, d.size) for d in spec.disks]
    path = drivers.write_definition(spec, platform, str(tmp_path))
    back = drivers.read_definition(path)
    assert (back.name, back.cpus, back.memory, back.firmware) == (
        spec.name, spec.cpus, spec.memory, spec.firmware,
    )  # fmt: skip
    assert [n.mac for n in back.nics] == [n.mac for n in spec.nics]
    assert [d.path for d in back.disks] == [str(tmp_path / name)]
    assert back.os == "linux"


def test_ovf_reader_keeps_disk_paths_inside_the_package(tmp_path):
    (tmp_path / "box-disk1.vmdk").write_bytes(b"x" * 512)
    path = drivers.write_definition(SPEC, "vsphere", str(tmp_path))
    text = (
        Path(path).read_text().replace('ovf:href="box-disk1.vmdk"', 'ovf:href="../box-disk1.vmdk"')
    )
    (tmp_path / "evil.ovf").write_text(text)
    with pytest.raises(FormatError, match="plain file name"):
        drivers.read_definition(str(tmp_path / "evil.ovf"))


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(DriverError, match="no such file"):
        drivers.read_definition(str(tmp_path / "nope.vmx"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DriverError, match="not a VM definition"):
        drivers.read_definition(str(tmp_path / "notes.txt"))


def test_platforms_refuse_disks_they_cannot_attach(tmp_path):
    with pytest.raises(DriverError, match=r"hyperv: disk box-disk1\.vmdk is vmdk"):
        drivers.write_definition(SPEC, "hyperv", str(tmp_path))
    assert list(tmp_path.iterdir()) == []

"""libvirt domain XML: validated by virt-xml-validate (libvirt's RelaxNG schema), defined
and dumped by virsh's in-process test driver, and read back into the same machine."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

from drivers import DriverError, kvm
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.drivers.strategies import machines
from tests.external import need_tool, run

MiB = 1 << 20


def machine(**kw):
    base = dict(
        name="web-1",
        cpus=2,
        memory=2048 * MiB,
        firmware="uefi",
        secure_boot=True,
        disks=[
            DiskSpec("web-1-disk1.qcow2", "qcow2", "virtio"),
            DiskSpec("d2.qcow2", "qcow2", "scsi"),
        ],
        nics=[
            NicSpec("52:54:00:12:34:56", "virtio"),
            NicSpec("52:54:00:12:34:57", "e1000e", "lan"),
        ],
        os="linux",
    )
    base.update(kw)
    return MachineSpec(**base)


VARIANTS = {
    "uefi-secure": machine(),
    "bios-windows-sata": machine(
        firmware="bios", secure_boot=False, os="windows",
        disks=[DiskSpec("w.qcow2", "qcow2", "sata")], nics=[NicSpec("52:54:00:00:00:09", "e1000e")],
    ),
    "ide-needs-pc": machine(firmware="bios", secure_boot=False, disks=[DiskSpec("old.img", "raw", "ide")], nics=[]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_domain_xml_validates_against_libvirt_schema(tmp_path, name):
    need_tool("virt-xml-validate", "xmllint")
    path = kvm.PLATFORM.write(VARIANTS[name], str(tmp_path))
    res = run(["virt-xml-validate", path, "domain"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_ide_disks_get_the_pc_machine(tmp_path):
    text = kvm.domain_xml(VARIANTS["ide-needs-pc"], str(tmp_path)).decode()
    assert 'machine="pc"' in text and "q35" not in text
    assert 'machine="q35"' in kvm.domain_xml(machine(), str(tmp_path)).decode()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_virsh_define_dumpxml_round_trip(tmp_path, name):
    need_tool("virsh")
    spec = VARIANTS[name]
    path = kvm.PLATFORM.write(spec, str(tmp_path))
    res = run(["virsh", "-c", "test:///default", f"define {path}; dumpxml {spec.name}"])
    assert res.returncode == 0, res.stderr
    dumped = res.stdout[res.stdout.index("<domain") :]
    back = kvm.parse_domain(dumped.encode(), str(tmp_path), where="dumpxml")
    want = spec.replace(
        disks=[DiskSpec(str(tmp_path / d.path), d.format, d.bus) for d in spec.disks]
    )
    want.nics = [NicSpec(n.mac, n.model, n.network or "default") for n in spec.nics]
    assert back == want


@settings(max_examples=40, deadline=None)
@given(
    machines(
        buses=("virtio", "sata", "scsi", "ide"),
        nic_models=("virtio", "e1000e", "e1000", "rtl8139"),
        extensions=("qcow2", "img"),
    )
)
def test_written_domains_read_back_the_same(tmp_path_factory, m):
    out = tmp_path_factory.mktemp("kvm")
    back = kvm.read_domain(kvm.PLATFORM.write(m, str(out)))
    want = m.replace(disks=[DiskSpec(str(out / d.path), d.format, d.bus) for d in m.disks])
    want.nics = [NicSpec(n.mac, n.model, "default") for n in m.nics]
    assert back == want
    assert back.warnings == []


FOREIGN = """<domain type='kvm'>
  <name>fedora</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://fedoraproject.org/fedora/39"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='GiB'>4</memory>
  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/fedora_VARS.fd</nvram>
  </os>
  <cpu mode='host-passthrough'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/fedora.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/fedora.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:6c:3c:01'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <hostdev mode='subsystem' type='pci'/>
    <tpm model='tpm-crb'/>
  </devices>
</domain>
"""


def test_foreign_domain_reads_with_warnings(tmp_path):
    spec = kvm.parse_domain(FOREIGN.encode(), str(tmp_path))
    assert (spec.name, spec.cpus, spec.memory, spec.firmware, spec.secure_boot, spec.os) == (
        "fedora", 4, 4 << 30, "uefi", True, "linux",
    )  # fmt: skip
    assert spec.disks == [DiskSpec("/var/lib/libvirt/images/fedora.qcow2", "qcow2", "virtio")]
    assert spec.nics == [NicSpec("52:54:00:6c:3c:01", "virtio", "br0")]
    assert "devices not carried over: cdrom drive, hostdev, tpm" in spec.warnings
    assert "settings not carried over: cpu" in spec.warnings


@pytest.mark.parametrize(
    "text, match",
    [
        ("<domain><name>x</name>", "malformed XML"),
        ("<network><name>x</name></network>", "not <domain>"),
        (
            '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            "<domain><name>&b;</name></domain>",
            "XML refused",
        ),
        ("<domain><name>x</name><memory unit='KiB'>1</memory></domain>", "absurd"),
        ("<domain><name>x</name><memory unit='furlong'>1</memory></domain>", "unknown memory unit"),
        (
            "<domain><name>x</name><memory>1048576</memory><os><type>linux</type></os></domain>",
            "hvm",
        ),
        (
            "<domain><name>x</name><memory>1048576</memory><devices><disk type='file' device='disk'>"
            "<source file='../../etc/shadow'/></disk></devices></domain>",
            "escapes the source directory",
        ),
    ],
)
def test_bad_domains_give_one_line_errors(tmp_path, text, match):
    with pytest.raises(DriverError, match=match) as info:
        kvm.parse_domain(text.encode(), str(tmp_path))
    assert "\n" not in str(info.value)


def test_read_domain_relative_path_resolves_beside_the_file(tmp_path):
    (tmp_path / "vm.xml").write_text(
        "<domain><name>x</name><memory unit='MiB'>512</memory><devices>"
        "<disk type='file' device='disk'><source file='sub/d.img'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    assert kvm.read_domain(str(tmp_path / "vm.xml")).disks[0].path == os.path.join(
        tmp_path, "sub/d.img"
    )

"""VirtualBox: an OVF its importer accepts when the disks are VMDK/VHD, a VBoxManage
script when they are VDI (its importer knows no VDI URI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from drivers import virtualbox
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from formats.ovf import describe
from formats.ovf.descriptor import parse_xml

MiB = 1 << 20

# the disk format URIs VirtualBox's OVF importer maps to a backend (ApplianceImpl)
VBOX_URIS = {
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    "http://www.vmware.com/specifications/vmdk.html#sparse",
    "http://www.vmware.com/specifications/vmdk.html#compressed",
    "http://www.vmware.com/interfaces/specifications/vmdk.html#compressed",
    "http://go.microsoft.com/fwlink/?LinkId=137171",
}
# VBoxManage subcommands and the options we may pass (VirtualBox manual, chapter 8)
VBOXMANAGE = {
    "createvm": {"--name", "--ostype", "--register"},
    "modifyvm": {"--cpus", "--memory", "--ioapic", "--firmware"} | {f"--{k}{i}" for k in ("nic", "nictype", "macaddress") for i in range(1, 9)},
    "modifynvram": set(),
    "storagectl": {"--name", "--add", "--controller", "--portcount", "--bootable"},
    "storageattach": {"--storagectl", "--port", "--device", "--type", "--medium"},
}  # fmt: skip


def machine(fmt, ext, **kw):
    base = dict(
        name="desk",
        cpus=2,
        memory=2048 * MiB,
        firmware="uefi",
        disks=[
            DiskSpec(f"d1.{ext}", fmt, "sata", 64 * MiB),
            DiskSpec(f"d2.{ext}", fmt, "sata", 32 * MiB),
        ],
        nics=[NicSpec("08:00:27:01:02:03", "e1000")],
        os="linux",
    )
    base.update(kw)
    return MachineSpec(**base)


def test_vmdk_disks_get_an_ovf_virtualbox_accepts(tmp_path):
    for name in ("d1.vmdk", "d2.vmdk"):
        (tmp_path / name).write_bytes(b"x" * 1000)
    path = virtualbox.PLATFORM.write(machine("vmdk", "vmdk"), str(tmp_path))
    assert path.endswith("desk.ovf")
    root = parse_xml(Path(path).read_bytes())
    uris = {v for el in root.iter() for k, v in el.attrib.items() if k.endswith("}format")}
    assert uris and uris <= VBOX_URIS
    subtypes = [el.text for el in root.iter() if el.tag.endswith("}ResourceSubType")]
    assert "AHCI" in subtypes  # the SATA controller name VirtualBox looks for
    assert [el.text for el in root.iter() if el.tag.endswith("}VirtualSystemType")] == ["vmx-11"]
    info = describe(path)
    assert info["machine"]["disks"][0]["bus"] == "sata"
    assert info["machine"]["nics"][0]["network"] == "NAT"


def test_vdi_disks_get_a_vboxmanage_script(tmp_path):
    spec = machine("vdi", "vdi", secure_boot=True)
    path = virtualbox.PLATFORM.write(spec, str(tmp_path))
    assert path.endswith("desk.vbox.sh")
    text = Path(path).read_text()
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("VBoxManage")]
    assert commands
    for words in commands:
        sub = words[1]
        assert sub in VBOXMANAGE, sub
        opts = {w for w in words[3:] if w.startswith("--")}
        if sub != "modifynvram":
            assert opts <= VBOXMANAGE[sub], opts - VBOXMANAGE[sub]
    assert "--firmware efi" in text and "--macaddress1 080027010203" in text
    assert re.search(r"--port 1 --device 0 --type hdd --medium \"\$HERE\"/'d2.vdi'", text)
    assert "secureboot --enable" in text

"""`p2v v2v --to kvm` of a VMware VM (a .vmx naming server (a)'s disk as a VMDK on VMware's
paravirtual SCSI, with a vmxnet3 NIC: VMware's usual Linux VM, whose devices KVM lacks and
so replaces with virtio) converts the guest by default, and the output boots on the virtio
hardware of its definition: root read-write, the NIC up with an address, open-vm-tools
gone."""

from __future__ import annotations

import os

from tests.external import p2v, qemu_img
from tests.guests import fixtures

VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "server-a"
guestOS = "debian11-64"
numvcpus = "1"
memSize = "1024"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "server-a.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:12:34:0a"
"""


def test_v2v_of_server_a_from_vmware_boots_on_its_kvm_definition(tmp_path):
    srv = fixtures.server("a")
    src = tmp_path / "vmware"
    src.mkdir()
    qemu_img("convert", "-f", "qcow2", "-O", "vmdk", srv.image, str(src / "server-a.vmdk"))
    (src / "server-a.vmx").write_text(VMX)
    out = str(tmp_path / "out")
    res = p2v("v2v", "--to", "kvm", str(src / "server-a.vmx"), out, timeout=1800)
    assert res.returncode == 0, f"p2v v2v failed ({res.returncode}): {res.stderr[-3000:]}"
    assert os.path.exists(os.path.join(out, "conversion.json")), os.listdir(out)
    fixtures.assert_boots_converted(srv, fixtures.definition(out), str(tmp_path))

"""`p2v v2v` as a user runs it: definitions that validate, disks that compare equal under
qemu-img, round trips between hypervisors, and one-line errors for bad definitions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import drivers
from tests.external import need_tool, p2v, qemu_img, run

MiB = 1 << 20


def one_line_error(res) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("p2v: error: ") and "Traceback" not in res.stderr
    return lines[0]


def _fill(path: Path, size: int, at=(0, 3 * MiB)) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in at:
            f.seek(offset)
            f.write(os.urandom(256 * 1024))


@pytest.fixture
def gpt_disk(tmp_path):
    need_tool("sgdisk")
    path = tmp_path / "server.img"
    _fill(path, 32 * MiB, at=(2 * MiB, 20 * MiB))
    res = run(["sgdisk", "-n1:1M:+8M", "-t1:ef00", "-n2:0:0", "-t2:8300", str(path)])
    assert res.returncode == 0, res.stderr
    return path


def test_bare_disk_to_kvm(tmp_path, gpt_disk):
    need_tool("virt-xml-validate", "xmllint")
    out = tmp_path / "kvm"
    res = p2v(
        "v2v",
        "--to",
        "kvm",
        "-O",
        "raw",
        "--cpus",
        "2",
        "--memory",
        "1536M",
        str(gpt_disk),
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "disk 1 bus: unknown -> virtio" in res.stdout
    assert "firmware: uefi (kept)" in res.stdout  # the EFI system partition said so
    assert "virtio_blk" in res.stdout  # the checklist names the initramfs drivers
    xml = out / "server.xml"
    assert run(["virt-xml-validate", str(xml), "domain"]).returncode == 0
    spec = drivers.read_definition(str(xml))
    assert (spec.cpus, spec.memory, spec.firmware, spec.os) == (2, 1536 * MiB, "uefi", "linux")
    qemu_img("compare", "-f", "raw", "-F", "raw", str(gpt_disk), spec.disks[0].path)
    assert sorted(os.listdir(out)) == ["server-disk1.img", "server.xml"]


def test_windows_disk_gets_sata_and_e1000e_on_kvm(tmp_path, gpt_disk):
    out = tmp_path / "kvm"
    res = p2v("v2v", "-O", "raw", "--os", "windows", "--output", "json", str(gpt_disk), str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["machine"]["disks"][0]["bus"] == "sata"
    assert result["machine"]["nics"][0]["model"] == "e1000e"
    assert any("INACCESSIBLE_BOOT_DEVICE" in line for line in result["checklist"])
    assert result["disks"][0]["format"] == "raw" and result["source-kind"] == "disk"


VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "legacy app"
guestOS = "ubuntu-64"
numvcpus = "3"
memSize = "1536"
firmware = "efi"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "app.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:12:34:56"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000"
ethernet1.addressType = "generated"
ethernet1.generatedAddress = "00:0c:29:ab:cd:ef"
"""


@pytest.fixture
def vmware_vm(tmp_path):
    src = tmp_path / "vmware"
    src.mkdir()
    raws = []
    for name, size in (("app", 24 * MiB), ("data", 8 * MiB)):
        raw = tmp_path / f"{name}.raw"
        _fill(raw, size)
        qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(src / f"{name}.vmdk"))
        raws.append(raw)
    (src / "app.vmx").write_text(VMX)
    return src / "app.vmx", raws


def test_round_trip_vmx_kvm_ovf_vmx(tmp_path, vmware_vm):
    vmx, raws = vmware_vm
    kvm_dir, ovf_dir, back_dir = tmp_path / "kvm", tmp_path / "vsphere", tmp_path / "back"
    res = p2v("v2v", "--to", "kvm", str(vmx), str(kvm_dir))  # qcow2, KVM's preferred
    assert res.returncode == 0, res.stderr
    for q in kvm_dir.glob("*.qcow2"):
        assert qemu_img("check", str(q)).returncode == 0
    assert "disk 1 bus: scsi -> virtio" in res.stdout
    assert "NIC 1 (00:50:56:12:34:56) model: vmxnet3 -> virtio" in res.stdout
    res = p2v("v2v", "--to", "vsphere", str(kvm_dir / "legacy-app.xml"), str(ovf_dir))
    assert res.returncode == 0, res.stderr
    res = p2v("v2v", "--to", "vmware", str(ovf_dir / "legacy-app.ovf"), str(back_dir))
    assert res.returncode == 0, res.stderr
    original = drivers.read_definition(str(vmx))
    back = drivers.read_definition(str(back_dir / "legacy-app.vmx"))
    assert (back.name, back.cpus, back.memory, back.firmware, back.os) == (
        original.name, original.cpus, original.memory, original.firmware, original.os,
    )  # fmt: skip
    assert [n.mac for n in back.nics] == [n.mac for n in original.nics]
    assert len(back.disks) == 2
    for raw, disk in zip(raws, back.disks):
        qemu_img("compare", "-f", "raw", "-F", "vmdk", str(raw), disk.path)
        assert "monolithicSparse" in qemu_img("info", disk.path).stdout
    for d in Path(ovf_dir).glob("*.vmdk"):
        assert "streamOptimized" in qemu_img("info", str(d)).stdout


def test_ova_to_xen(tmp_path):
    disk = tmp_path / "d.raw"
    _fill(disk, 16 * MiB)
    ova = tmp_path / "app.ova"
    res = p2v(
        "ovf", "pack", "--cpus", "2", "--memory", "2G", "--os", "linux", "-o", str(ova), str(disk)
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "xen"
    res = p2v("v2v", "--to", "xen", str(ova), str(out))
    assert res.returncode == 0, res.stderr
    spec = drivers.read_definition(str(out / "app.cfg"))
    assert (spec.cpus, spec.memory) == (2, 2 << 30)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(disk), spec.disks[0].path)
    assert sorted(os.listdir(out)) == ["app-disk1.img", "app.cfg"]  # the staging copy is gone


def test_azure_disk_is_fixed_and_mib_aligned(tmp_path):
    disk = tmp_path / "odd.raw"
    _fill(disk, 20 * MiB + 512 * 1024, at=(0, 20 * MiB))
    out = tmp_path / "azure"
    res = p2v("v2v", "--to", "azure", str(disk), str(out))
    assert res.returncode == 0, res.stderr
    vhd = out / "odd-disk1.vhd"
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(vhd)).stdout)
    assert info["virtual-size"] == 21 * MiB
    assert os.path.getsize(vhd) == 21 * MiB + 512
    assert "fixed" in qemu_img("info", "-f", "vpc", str(vhd)).stdout or info["actual-size"] >= 0
    qemu_img("compare", "-f", "raw", "-F", "vpc", str(disk), str(vhd))
    script = (out / "odd.azure.sh").read_text()
    assert f"--upload-size-bytes {21 * MiB + 512}" in script


BOMB = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<domain><name>&d;</name></domain>
"""


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("missing.vmx", VMX.replace("data.vmdk", "gone.vmdk"), "disk file .* is missing"),
        (
            "escape.vmx",
            VMX.replace('"data.vmdk"', '"../secret.vmdk"'),
            "escapes the source directory",
        ),
        ("absolute.vmx", VMX.replace('"data.vmdk"', '"/etc/shadow"'), "absolute"),
        ("absurd.vmx", VMX.replace('memSize = "1536"', 'memSize = "99999999999"'), "absurd"),
        ("malformed.xml", "<domain><name>x</name><memory>1", "malformed XML"),
        ("bomb.xml", BOMB, "XML refused"),
    ],
)
def test_bad_definitions_give_one_line_errors(tmp_path, vmware_vm, name, text, match):
    vmx, _ = vmware_vm
    bad = vmx.parent / name
    bad.write_text(text)
    (tmp_path / "secret.vmdk").write_bytes(b"secret")
    out = tmp_path / "out"
    line = one_line_error(p2v("v2v", "--to", "kvm", "-O", "raw", str(bad), str(out)))
    assert re.search(match, line), line
    assert not out.exists() or os.listdir(out) == []


def test_unknown_platform_and_unusable_format(tmp_path, gpt_disk):
    line = one_line_error(p2v("v2v", "--to", "bochs", str(gpt_disk), str(tmp_path / "o")))
    assert "unknown platform" in line
    line = one_line_error(
        p2v("v2v", "--to", "vmware", "-O", "qcow2", str(gpt_disk), str(tmp_path / "o"))
    )
    assert "not usable" in line


def test_tampered_ovf_package_is_refused(tmp_path):
    disk = tmp_path / "d.raw"
    _fill(disk, 8 * MiB)
    pkg = tmp_path / "pkg"
    assert p2v("v2v", "--to", "vsphere", str(disk), str(pkg)).returncode == 0
    vmdk = pkg / "d-disk1.vmdk"
    data = bytearray(vmdk.read_bytes())
    data[-1024] ^= 0x55
    vmdk.write_bytes(bytes(data))
    out = tmp_path / "out"
    line = one_line_error(p2v("v2v", "--to", "kvm", "-O", "raw", str(pkg / "d.ovf"), str(out)))
    assert "digest does not match the manifest" in line
    assert os.listdir(out) == []


def _reshape(x: Path, shape: str) -> list[str]:
    """Turn the package p2v packed (app.ovf, app.mf, app-disk1.vmdk in X) into one of the
    shapes other tools write, with real tools; returns the paths to archive, from X."""
    members = ["app.ovf", "app.mf", "app-disk1.vmdk"]
    ovf_path, mf_path, disk = x / "app.ovf", x / "app.mf", x / "app-disk1.vmdk"

    def sha256(name):
        return run(["sha256sum", str(x / name)]).stdout.split()[0]

    if shape == "gzip-disk":
        assert run(["gzip", "-n", str(disk)]).returncode == 0
        (x / "app-disk1.vmdk.gz").rename(disk)
        text = ovf_path.read_text()
        size = re.search(r'ovf:href="app-disk1.vmdk"[^>]*ovf:size="(\d+)"', text).group(1)
        text = text.replace(
            f'ovf:href="app-disk1.vmdk" ovf:id="file1" ovf:size="{size}"',
            f'ovf:href="app-disk1.vmdk" ovf:id="file1" ovf:size="{disk.stat().st_size}" '
            'ovf:compression="gzip"',
        )
        assert "gzip" in text
        ovf_path.write_text(text)
        mf_path.write_text("".join(f"SHA256({n})= {sha256(n)}\n" for n in members[::2]))
    elif shape == "snapshots":
        disk.rename(x / "app-disk1.vmdk.000000002")
        for i in (0, 1):
            (x / f"app-disk1.vmdk.00000000{i}").write_bytes(os.urandom(1024))
        members = ["app.ovf", "app.mf"] + [f"app-disk1.vmdk.00000000{i}" for i in range(3)]
        mf_path.write_text(
            f"SHA256(app.ovf)= {sha256('app.ovf')}\n"
            + "".join(f"SHA256({n})= {sha256(n)}\n" for n in members[2:])
        )
    elif shape == "lenient-manifest":
        # the descriptor unlisted and a line nobody can parse: virt-v2v warns and reads on
        mf_path.write_text(f"SHA256(app-disk1.vmdk)= {sha256('app-disk1.vmdk')}\ngarbage line\n")
    elif shape == "subfolder":
        (x / "sub").mkdir()
        for n in members:
            (x / n).rename(x / "sub" / n)
        members = ["sub"]
    return members


FIELD_SHAPES = {
    "zip": "zip",
    "tar.gz": "tar.gz",
    "tar.xz": "tar.xz",
    "subfolder": "tar",
    "gzip-disk": "tar",
    "snapshots": "tar",
    "lenient-manifest": "tar",
}


@pytest.mark.parametrize("shape", sorted(FIELD_SHAPES))
def test_v2v_reads_ovas_as_the_field_writes_them(tmp_path, shape):
    need_tool("tar", "gzip", "xz", "zip", "sha256sum")
    disk = tmp_path / "d.raw"
    _fill(disk, 16 * MiB)
    packed = tmp_path / "app.ova"
    res = p2v("ovf", "pack", "--cpus", "2", "--memory", "1G", "-o", str(packed), str(disk))
    assert res.returncode == 0, res.stderr
    x = tmp_path / "x"
    x.mkdir()
    assert run(["tar", "xf", str(packed), "-C", str(x)]).returncode == 0
    members = _reshape(x, shape)
    ova = tmp_path / "field.ova"
    cmd = {
        "zip": ["zip", "-q", "-r", str(ova)],
        "tar.gz": ["tar", "-czf", str(ova)],
        "tar.xz": ["tar", "-cJf", str(ova)],
        "tar": ["tar", "-cf", str(ova)],
    }[FIELD_SHAPES[shape]]
    assert run(cmd + members, cwd=x).returncode == 0
    out = tmp_path / "kvm"
    res = p2v("v2v", "--to", "kvm", "--output", "json", str(ova), str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    spec = drivers.read_definition(result["definition"])
    assert (spec.cpus, spec.memory) == (2, 1 << 30)
    qemu_img("compare", "-f", "raw", str(disk), spec.disks[0].path)
    if shape == "lenient-manifest":
        warnings = "\n".join(result["warnings"])
        assert "does not list the descriptor" in warnings and "garbage line" in warnings
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # the staging copy is gone


def test_v2v_hostile_zip_ova_is_one_line_and_writes_nothing(tmp_path):
    import zipfile

    ova = tmp_path / "evil.ova"
    with zipfile.ZipFile(ova, "w") as z:
        z.writestr("a.ovf", "<Envelope/>")
        z.writestr("../../escape.vmdk", b"x")
    out = tmp_path / "out"
    line = one_line_error(p2v("v2v", "--to", "kvm", str(ova), str(out)))
    assert "'..'" in line
    assert sorted(os.listdir(tmp_path)) in (["evil.ova"], ["evil.ova", "out"])
    assert not out.exists() or os.listdir(out) == []

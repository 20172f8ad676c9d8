"""Inspection and conversion of a real Debian 12 server (tests/guests/servers.py, server
(a): initramfs-tools MODULES=list without virtio, fstab and GRUB by /dev/sda1, ifupdown
on ens3, open-vm-tools) through the libguestfs appliance, checked afterwards inside the
guest with the guest's own tools (lsinitramfs) and files; and every bad input.

The "copied image" each test converts is a qcow2 overlay over the cached server, so the
server itself is never written (its mtime and size are checked)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest

from drivers.guest import appliance
from tests.external import p2v, qemu_img
from tests.guests import fixtures

#: (platform, the drivers its initramfs must hold, the interface name it implies)
PLATFORMS = {
    "kvm": (("virtio_blk", "virtio_net"), "enp1s0"),
    "hyperv": (("hv_storvsc", "hv_netvsc"), "eth0"),
    "vmware": (("vmw_pvscsi", "vmxnet3"), "ens192"),
    "xen": (("xen_blkfront", "xen_netfront"), "eth0"),
    "azure": (("hv_storvsc", "hv_netvsc"), "eth0"),
    "aws": (("nvme", "ena"), "ens5"),
}


def copy_of(server_image: str, path: str) -> str:
    """A 'copied image' that writes nowhere near the cached server: an overlay on it."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", server_image, "-F", "qcow2", path)
    return path


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def server_a():
    srv = fixtures.server("a")
    st = os.stat(srv.image)
    yield srv
    after = os.stat(srv.image)
    assert (after.st_mtime_ns, after.st_size) == (st.st_mtime_ns, st.st_size), "server written"


def guest_view(image: str, paths: list[str], commands: list[list[str]]) -> dict[str, str]:
    """Files and command outputs from inside the guest on `image` (read-only)."""
    out = {}
    with appliance.Appliance([(image, "qcow2")], readonly=True) as app:
        app.mount(app.inspect())
        for p in paths:
            out[p] = app.read_text(p, 16 << 20) if app.exists(p) else ""
        for argv in commands:
            out[" ".join(argv)] = app.run(argv, step="test")
    return out


def test_inspect_server_a_names_what_breaks_a_naive_p2v(server_a):
    res = p2v("inspect", "--output", "json", server_a.image)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert (found["os-family"], found["distribution"], found["architecture"]) == (
        "linux", "debian", "x86_64",
    )  # fmt: skip
    assert found["version"].startswith("12.")
    assert found["bootloader"] == "grub2-bios" and found["firmware"] == "bios"
    assert found["initramfs-tool"] == "initramfs-tools"
    assert found["default-kernel"] in [k["version"] for k in found["kernels"]]
    # Debian's kernel ships every platform's drivers: what is missing is in the initramfs
    assert {"virtio_blk", "virtio_net", "hv_storvsc", "ena"} <= set(found["kernels"][0]["drivers"])
    [net] = found["network"]
    assert (net["system"], net["interfaces"]) == ("ifupdown", [server_a.interface])
    assert found["hypervisor-tools"] == ["open-vm-tools"]
    assert [m["mountpoint"] for m in found["mounts"]] == ["/"]


@pytest.mark.parametrize("platform", sorted(PLATFORMS, key=lambda p: p != "kvm"))
def test_convert_guest_server_a_for(platform, server_a, tmp_path):
    drivers, name = PLATFORMS[platform]
    image = copy_of(server_a.image, str(tmp_path / "disk.qcow2"))
    res = p2v("convert-guest", "--to", platform, "--output", "json", image)
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    assert done["interface-names"] == [name]
    report = json.loads((tmp_path / "conversion.json").read_text())
    assert report["platform"] == platform and report["changes"]
    kver = done["inspection"]["default-kernel"]
    initrd = f"/boot/initrd.img-{kver}"
    seen = guest_view(
        image,
        ["/etc/fstab", "/boot/grub/grub.cfg", "/etc/network/interfaces", "/etc/default/grub"],
        [["lsinitramfs", initrd], ["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\\n"]],
    )
    listing = seen[f"lsinitramfs {initrd}"]
    for driver in drivers:
        assert re.search(rf"/{driver.replace('_', '[-_]')}\.ko", listing), f"{driver} not in initrd"
    fstab = [line for line in seen["/etc/fstab"].splitlines() if line and line[0] != "#"]
    assert fstab[0].startswith("UUID=") and "/dev/sd" not in seen["/etc/fstab"]
    cfg = seen["/boot/grub/grub.cfg"]
    assert re.search(r"root=UUID=[0-9a-f-]+", cfg) and "root=/dev/sd" not in cfg
    interfaces = seen["/etc/network/interfaces"]
    assert f"iface {name} inet dhcp" in interfaces and server_a.interface not in interfaces
    packages = seen["dpkg-query -W -f ${db:Status-Abbrev} ${Package}\\n"]
    # VMware's own tools stay on VMware; every other platform loses them
    assert ("ii  open-vm-tools" in packages) == (platform == "vmware")
    assert "openssh-server" in packages


def test_convert_guest_refuses_disks_without_an_os_in_one_line(tmp_path):
    empty = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(empty), "64M")
    before = digest(str(empty))
    line = one_line_error(p2v("convert-guest", "--to", "kvm", str(empty)))
    assert "inspect: no operating system found" in line
    assert digest(str(empty)) == before and not (tmp_path / "conversion.json").exists()
    line = one_line_error(p2v("inspect", str(tmp_path / "absent.qcow2")))
    assert "no such image file" in line


def test_encrypted_root_without_a_key_is_named(tmp_path):
    disk = str(tmp_path / "luks.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "64M")
    with appliance.Appliance([(disk, "qcow2")], readonly=False) as app:
        app.g.part_disk("/dev/sda", "mbr")
        app.g.luks_format("/dev/sda1", "secret-key", 0)
    line = one_line_error(p2v("inspect", disk))
    assert "inspect:" in line and "encrypted" in line and "/dev/sda1" in line
    assert "secret-key" not in line


def _plant(image: str, edits: list[tuple[str, str, bytes | str]]) -> None:
    """Change files in the guest on `image` (ops: write, symlink, hook)."""
    with appliance.Appliance([(image, "qcow2")], readonly=False) as app:
        app.mount(app.inspect())
        g = app.g
        for op, path, data in edits:
            if op == "symlink":
                g.rm_f(path)
                g.ln_s(data, path)
            else:
                g.write(path, data if isinstance(data, bytes) else data.encode())
                if op == "hook":
                    g.chmod(0o755, path)


HOSTILE = {
    "fstab-symlink": ([("symlink", "/etc/fstab", "/tmp/p2v-host-marker")], "fstab: /etc/fstab"),
    "huge-interfaces": (
        [("write", "/etc/network/interfaces.d/big", b"# x\n" * (600 << 10))],
        "network: /etc/network/interfaces.d/big in the guest is 2457600 bytes",
    ),
    "binary-interfaces": (
        [("write", "/etc/network/interfaces.d/bin", b"auto ens3\n\0\x7fELF\0\0")],
        "network: /etc/network/interfaces.d/bin in the guest is binary",
    ),
    "initramfs-tool-fails": (
        [
            (
                "hook",
                "/etc/initramfs-tools/hooks/zz-fail",
                "#!/bin/sh\necho hook broke >&2\nexit 3\n",
            )
        ],
        "initramfs: update-initramfs -u -k",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_guest_ends_in_one_line_and_leaves_the_image_unchanged(case, server_a, tmp_path):
    edits, expected = HOSTILE[case]
    marker = "/tmp/p2v-host-marker"
    with open(marker, "w") as f:
        f.write("host file\n")
    image = copy_of(server_a.image, str(tmp_path / "disk.qcow2"))
    _plant(image, edits)
    before = digest(image)
    line = one_line_error(p2v("convert-guest", "--to", "kvm", image))
    assert expected in line, line
    assert digest(image) == before
    assert not (tmp_path / "conversion.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".p2v-guest-")]
    with open(marker) as f:
        assert f.read() == "host file\n"


def test_uefi_fallback_loader_is_shim_copied_beside_its_grub(tmp_path):
    """NVRAM entries do not travel: the ESP gets \\EFI\\BOOT\\BOOTX64.EFI (shim, with the
    GRUB and fallback it loads from its own directory) when the guest has no EFI GRUB
    modules for grub-install --removable."""
    from drivers.guest import bootloader
    from drivers.guest.report import Report

    disk = str(tmp_path / "uefi.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "128M")
    with appliance.Appliance([(disk, "qcow2")], readonly=False) as app:
        g = app.g
        g.part_init("/dev/sda", "gpt")
        g.part_add("/dev/sda", "p", 2048, 100000)
        g.part_add("/dev/sda", "p", 100001, -34)
        g.mkfs("vfat", "/dev/sda1")
        g.mkfs("ext4", "/dev/sda2")
        g.mount("/dev/sda2", "/")
        g.mkdir_p("/boot/efi")
        g.mount("/dev/sda1", "/boot/efi")
        g.mkdir_p("/boot/efi/EFI/debian")
        for name in ("shimx64.efi", "grubx64.efi", "fbx64.efi", "mmx64.efi"):
            g.write(f"/boot/efi/EFI/debian/{name}", name.encode())
        report = Report("kvm")
        bootloader.ensure_fallback_loader(app, report)
        assert g.read_file("/boot/efi/EFI/BOOT/BOOTX64.EFI") == b"shimx64.efi"
        assert g.read_file("/boot/efi/EFI/BOOT/grubx64.efi") == b"grubx64.efi"
        assert g.read_file("/boot/efi/EFI/BOOT/fbx64.efi") == b"fbx64.efi"
        assert report.changes[0].target == "/boot/efi/EFI/BOOT/BOOTX64.EFI"
        # present already: nothing to do
        again = Report("kvm")
        bootloader.ensure_fallback_loader(app, again)
        assert again.changes == [] and again.warnings == []

"""VirtualBox: an OVF for `VBoxManage import` when the disks are VMDK or VHD, and a
`VBoxManage` script that registers the VM when they are VDI.

VirtualBox's OVF importer knows disk formats only by the URIs VMware and Microsoft
publish (VMDK sparse/streamOptimized/compressed, VHD, ISO); an OVF naming a VDI is
refused. VDI is VirtualBox's own and fastest format, so it stays the preferred one, and
for it the definition is a script of `VBoxManage createvm/modifyvm/storagectl/
storageattach` calls, which attach the VDIs where they are.
"""

from __future__ import annotations

import os

from . import checklist
from .errors import DriverError
from .machine import DiskSpec, MachineSpec
from .platform import DiskTarget, Platform, disk_location

OS_TYPES = {"linux": "Linux_64", "windows": "Windows2019_64", "other": "Other_64"}
NIC_TYPES = {"e1000": "82540EM", "virtio": "virtio", "pcnet": "Am79C973"}
CONTROLLERS = {
    "sata": ("SATA", "sata", "IntelAhci"),
    "scsi": ("SCSI", "scsi", "LsiLogic"),
    "ide": ("IDE", "ide", "PIIX4"),
    "nvme": ("NVMe", "pcie", "NVMe"),
}
OVF_DISK_FORMATS = ("vmdk", "vpc")


def _sh(value: str) -> str:
    """A POSIX shell single-quoted word."""
    return "'" + value.replace("'", "'\\''") + "'"


class Virtualbox(Platform):
    name = "virtualbox"
    title = "VirtualBox"
    disk = DiskTarget("vdi")
    formats = ("vdi", "vmdk", "vpc")
    buses = ("sata", "scsi", "ide", "nvme")
    nic_models = ("e1000", "virtio", "pcnet")
    default_network = "NAT"

    def disk_target(self, fmt: str | None = None) -> DiskTarget:
        if fmt == "vmdk":
            # the sparse URI is the one VirtualBox's importer maps to its VMDK backend
            return DiskTarget("vmdk", (("subformat", "monolithicSparse"),))
        return super().disk_target(fmt)

    def uses_ovf(self, spec: MachineSpec) -> bool:
        return bool(spec.disks) and all(d.format in OVF_DISK_FORMATS for d in spec.disks)

    disk_drivers = {"scsi": ("mptspi",)}
    # VirtualBox puts NIC 1 at PCI 00:03.0 and the next ones from 00:08.0
    _SLOTS = (3, 8, 9, 10, 16, 17, 18, 19)

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(
            f"enp0s{self._SLOTS[i]}" if i < len(self._SLOTS) else "" for i in range(len(spec.nics))
        )

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        ext = "ovf" if self.uses_ovf(spec) else "vbox.sh"
        return os.path.join(outdir, f"{self.stem(spec)}.{ext}")

    def write(self, spec: MachineSpec, outdir: str) -> str:
        if not self.uses_ovf(spec):
            path = super().write(spec, outdir)
            os.chmod(path, 0o755)
            return path
        from formats.ovf import write_package

        self.check(spec)
        machine = spec.to_dict()
        for d, src in zip(machine["disks"], spec.disks):
            if os.path.dirname(disk_location(src.path, outdir)) != os.path.abspath(outdir):
                raise DriverError(f"virtualbox: disk {src.path} must be inside {outdir} for an OVF")
            if src.size is None:
                raise DriverError(f"virtualbox: disk {src.path} has no known size")
            d["path"] = os.path.basename(src.path or "")
            d["subformat"] = "monolithicSparse" if src.format == "vmdk" else None
        return write_package(outdir, self.stem(spec), machine, flavor="virtualbox")

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        return script(spec, outdir).encode("utf-8")

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        if self.uses_ovf(target):
            out.append(f"import with: VBoxManage import {self.stem(target)}.ovf")
        else:
            out.append(f"register with: sh {self.stem(target)}.vbox.sh (disks stay where they are)")
        out.append("the NICs are attached to NAT: change them to bridged or host-only as needed")
        out.append("install the VirtualBox Guest Additions after the first boot")
        return out


def _attach_lines(disks: list[DiskSpec], outdir: str) -> list[str]:
    lines: list[str] = []
    ports: dict[str, int] = {}
    for d in disks:
        bus = d.bus or "sata"
        if bus not in CONTROLLERS:
            raise DriverError(f"virtualbox: no {bus} controller (sata, scsi, ide, nvme)")
        ctl_name, kind, chipset = CONTROLLERS[bus]
        if bus not in ports:
            ports[bus] = 0
            count = sum(1 for x in disks if (x.bus or "sata") == bus)
            extra = f" --portcount {max(count, 1)}" if bus in ("sata", "nvme") else ""
            lines.append(
                f'VBoxManage storagectl "$VM" --name {ctl_name} --add {kind} '
                f"--controller {chipset}{extra} --bootable on"
            )
        n = ports[bus]
        ports[bus] = n + 1
        port, device = (n // 2, n % 2) if bus == "ide" else (n, 0)
        rel = os.path.relpath(disk_location(d.path, outdir), os.path.abspath(outdir))
        medium = (
            f'"$HERE"/{_sh(rel)}'
            if not rel.startswith("..")
            else _sh(disk_location(d.path, outdir))
        )
        lines.append(
            f'VBoxManage storageattach "$VM" --storagectl {ctl_name} --port {port} '
            f"--device {device} --type hdd --medium {medium}"
        )
    return lines


def script(spec: MachineSpec, outdir: str) -> str:
    family = spec.os or "other"
    lines = [
        "#!/bin/sh",
        f"# Made by p2v: registers the VirtualBox VM {spec.name!r} with its converted disks.",
        "set -eu",
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        f"VM={_sh(spec.name)}",
        f'VBoxManage createvm --name "$VM" --ostype {OS_TYPES[family]} --register',
        f'VBoxManage modifyvm "$VM" --cpus {spec.cpus} --memory {spec.memory_mib} --ioapic on '
        f"--firmware {'efi' if spec.firmware == 'uefi' else 'bios'}",
    ]
    if spec.secure_boot:
        lines += [
            "# Secure Boot with Microsoft's keys (VirtualBox 7.0 and newer)",
            'VBoxManage modifynvram "$VM" inituefivarstore',
            'VBoxManage modifynvram "$VM" enrollmssignatures',
            'VBoxManage modifynvram "$VM" enrollorclpk',
            'VBoxManage modifynvram "$VM" secureboot --enable',
        ]
    for i, n in enumerate(spec.nics, 1):
        mac = f" --macaddress{i} {n.mac.replace(':', '').upper()}" if n.mac else ""
        nictype = NIC_TYPES.get(n.model or "e1000", "82540EM")
        lines.append(f'VBoxManage modifyvm "$VM" --nic{i} nat --nictype{i} {nictype}{mac}')
    lines += _attach_lines(spec.disks, outdir)
    return "\n".join(lines) + "\n"


PLATFORM = Virtualbox()

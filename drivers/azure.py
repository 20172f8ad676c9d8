"""Azure: fixed VHDs whose virtual size is a whole number of MiB, uploaded as managed
disks, and a shell script of Azure CLI calls that does the upload and creates the VM.

Azure takes fixed VHD only, 20 MiB to 32 TiB, with file size = virtual size + 512 (the
footer) and the virtual size a MiB multiple (INTEROP.md): the disk target is qemu's
`vpc` with subformat=fixed and force_size=on, the size rounded up to 1 MiB. BIOS guests
become generation 1 VMs, UEFI guests generation 2 (hyper-v-generation V2).
"""

from __future__ import annotations

import os

from . import checklist
from .errors import DriverError
from .machine import MachineSpec
from .platform import DiskTarget, Platform, disk_location

MIN_DISK = 20 << 20
MAX_DISK = 32 << 40
FOOTER = 512


def _sh(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


class Azure(Platform):
    name = "azure"
    title = "Microsoft Azure (managed disks)"
    disk = DiskTarget("vpc", (("subformat", "fixed"), ("force_size", "on")), align=1 << 20)
    formats = ("vpc",)
    buses = ("scsi",)
    nic_models = ("netvsc",)
    secure_boot = False  # Trusted Launch is chosen when the VM is created, not in the image
    default_network = "default"

    def disk_target(self, fmt: str | None = None) -> DiskTarget:
        if fmt not in (None, "vpc"):
            raise DriverError(
                "azure: disks must be fixed VHD (-O vpc); Azure takes no other format"
            )
        return self.disk

    # Hyper-V underneath: VMBus disks and NICs (eth0...); Azure assigns the MACs
    disk_drivers = {"scsi": ("hv_vmbus", "hv_storvsc")}
    keeps_macs = False

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(f"eth{i}" for i in range(len(spec.nics)))

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.azure.sh")

    def write(self, spec: MachineSpec, outdir: str) -> str:
        path = super().write(spec, outdir)
        os.chmod(path, 0o755)
        return path

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        return script(spec, outdir).encode("utf-8")

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        out = [line for line in out if "NVRAM" not in line]
        if target.os in (None, "linux"):
            out += [
                "Linux guests: hv_vmbus, hv_storvsc and hv_netvsc in the initramfs; the Azure "
                "Linux agent (waagent) or cloud-init installed; console=ttyS0 on the kernel "
                "command line for the serial console; DHCP on the first NIC; no swap on the OS disk",
            ]
        if target.os in (None, "windows"):
            out.append("Windows guests: RDP enabled, DHCP on the NIC, the Azure VM agent installed")
        out.append(
            "Azure assigns its own MAC addresses and IPs: the source's network identity does not travel"
        )
        out.append(
            f"set RG and LOCATION (and optionally SIZE) and run sh {self.stem(target)}.azure.sh; "
            "it needs az and azcopy, logged in"
        )
        return out


def script(spec: MachineSpec, outdir: str) -> str:
    if not spec.disks:
        raise DriverError("azure: a VM needs at least its OS disk")
    gen = "V2" if spec.firmware == "uefi" else "V1"
    os_type = "windows" if spec.os == "windows" else "linux"
    lines = [
        "#!/bin/sh",
        f"# Made by p2v: uploads the fixed VHDs of {spec.name!r} as managed disks and creates the VM.",
        "set -eu",
        ': "${RG:?set RG to the resource group}" "${LOCATION:?set LOCATION, e.g. westeurope}"',
        'SIZE="${SIZE:-Standard_D2s_v3}"',
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        f"VM={_sh(spec.name)}",
    ]
    names = []
    for i, d in enumerate(spec.disks, 1):
        if d.size is None:
            raise DriverError(f"azure: disk {d.path} has no known size")
        if d.size % (1 << 20) or not MIN_DISK <= d.size <= MAX_DISK:
            raise DriverError(
                f"azure: disk {d.path} is {d.size} bytes; Azure needs a whole number of MiB "
                "between 20 MiB and 32 TiB"
            )
        rel = os.path.relpath(disk_location(d.path, outdir), os.path.abspath(outdir))
        disk_name = f'"$VM-disk{i}"'
        names.append(disk_name)
        os_flags = f" --os-type {os_type} --hyper-v-generation {gen}" if i == 1 else ""
        lines += [
            f'az disk create -g "$RG" -l "$LOCATION" -n {disk_name}{os_flags} '
            f"--upload-type Upload --upload-size-bytes {d.size + FOOTER} --sku Standard_LRS",
            f'SAS=$(az disk grant-access -g "$RG" -n {disk_name} --access-level Write '
            "--duration-in-seconds 86400 --query accessSas -o tsv)",
            f'azcopy copy "$HERE"/{_sh(rel)} "$SAS" --blob-type PageBlob',
            f'az disk revoke-access -g "$RG" -n {disk_name}',
        ]
    data = f" --attach-data-disks {' '.join(names[1:])}" if len(names) > 1 else ""
    lines.append(
        f'az vm create -g "$RG" -n "$VM" --attach-os-disk {names[0]} --os-type {os_type} '
        f'--size "$SIZE"{data}'
    )
    return "\n".join(lines) + "\n"


PLATFORM = Azure()

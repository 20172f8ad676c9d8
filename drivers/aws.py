"""AWS VM Import: streamOptimized VMDKs (raw and VHD are accepted too) uploaded to S3,
and the disk-containers JSON `aws ec2 import-image --disk-containers file://...` reads.

The JSON's S3 bucket is a placeholder the user replaces; the boot mode follows the
firmware (`--boot-mode legacy-bios|uefi`). Nitro instances see disks as NVMe and NICs as
ENA: the guest needs those drivers, which is the checklist's main point.
"""

from __future__ import annotations

import json
import os

from . import checklist
from .machine import MachineSpec
from .platform import DiskTarget, Platform

BUCKET = "REPLACE-WITH-YOUR-BUCKET"


class Aws(Platform):
    name = "aws"
    title = "AWS EC2 (VM Import)"
    disk = DiskTarget("vmdk", (("subformat", "streamOptimized"),))
    formats = ("vmdk", "raw", "vpc")
    buses = ("nvme",)
    nic_models = ("e1000",)  # what import presents to the guest before ENA drivers load
    secure_boot = False
    default_network = "default"

    # Nitro instances: EBS volumes are NVMe, the NIC is ENA at PCI 00:05.0 (ens5, ens6...)
    nic_drivers = {"e1000": ("ena",)}
    keeps_macs = False

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(f"ens{5 + i}" for i in range(len(spec.nics)))

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.aws-containers.json")

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        containers = [
            {
                "Description": f"{spec.name} disk {i}",
                "Format": {"vmdk": "vmdk", "raw": "raw", "vpc": "vhd"}.get(
                    d.format or "vmdk", "vmdk"
                ),
                "UserBucket": {
                    "S3Bucket": BUCKET,
                    "S3Key": f"{self.stem(spec)}/{os.path.basename(d.path or f'disk{i}')}",
                },
            }
            for i, d in enumerate(spec.disks, 1)
        ]
        return (json.dumps(containers, indent=2) + "\n").encode()

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = [line for line in checklist.common(source, target) if "NVRAM" not in line]
        if target.os in (None, "linux"):
            out.append(
                "Linux guests: the nvme and ena drivers in the initramfs (Nitro instances), "
                "cloud-init installed, DHCP on the first NIC, fstab by UUID"
            )
        if target.os in (None, "windows"):
            out.append(
                "Windows guests: the AWS NVMe and ENA drivers, or let VM Import install them"
            )
        out.append("EC2 assigns its own MAC addresses and IPs")
        mode = "uefi" if target.firmware == "uefi" else "legacy-bios"
        stem = self.stem(target)
        out.append(
            f"upload the disks to s3://BUCKET/{stem}/, replace {BUCKET} in {stem}.aws-containers.json, "
            f"then: aws ec2 import-image --boot-mode {mode} --disk-containers file://{stem}.aws-containers.json"
        )
        return out


PLATFORM = Aws()

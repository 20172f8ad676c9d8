"""AWS VM Import: the disk-containers JSON `aws ec2 import-image` reads."""

from __future__ import annotations

import json
from pathlib import Path

from drivers import aws
from drivers.machine import DiskSpec, MachineSpec

MiB = 1 << 20


def test_containers_json_names_each_disk(tmp_path):
    spec = MachineSpec(
        name="api",
        cpus=2,
        memory=2048 * MiB,
        firmware="uefi",
        disks=[
            DiskSpec("api-disk1.vmdk", "vmdk", "nvme"),
            DiskSpec("api-disk2.vhd", "vpc", "nvme"),
        ],
    )
    path = aws.PLATFORM.write(spec, str(tmp_path))
    data = json.loads(Path(path).read_text())
    assert [c["Format"] for c in data] == ["vmdk", "vhd"]
    assert data[0]["UserBucket"]["S3Key"] == "api/api-disk1.vmdk"
    assert set(data[0]) == {"Description", "Format", "UserBucket"}
    steps = aws.PLATFORM.checklist(spec, spec)
    assert any("--boot-mode uefi" in s for s in steps)

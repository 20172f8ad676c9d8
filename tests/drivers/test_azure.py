"""Azure: fixed, MiB-aligned VHDs and the az/azcopy upload script."""

from __future__ import annotations

import pytest

from drivers import DriverError, azure
from drivers.machine import DiskSpec, MachineSpec, NicSpec

MiB = 1 << 20


def machine(sizes, **kw):
    return MachineSpec(
        name="app",
        cpus=2,
        memory=4096 * MiB,
        disks=[DiskSpec(f"app-disk{i}.vhd", "vpc", "scsi", s) for i, s in enumerate(sizes, 1)],
        nics=[NicSpec("52:54:00:00:00:01", "netvsc")],
        **kw,
    )


def test_script_uploads_each_disk_at_file_size(tmp_path):
    text = azure.script(machine([30 * MiB, 64 * MiB], firmware="uefi", os="windows"), str(tmp_path))
    assert f"--upload-size-bytes {30 * MiB + 512}" in text
    assert f"--upload-size-bytes {64 * MiB + 512}" in text
    assert "--hyper-v-generation V2" in text and "--os-type windows" in text
    assert 'azcopy copy "$HERE"/\'app-disk2.vhd\' "$SAS" --blob-type PageBlob' in text
    assert '--attach-os-disk "$VM-disk1"' in text and '--attach-data-disks "$VM-disk2"' in text


@pytest.mark.parametrize("size", [30 * MiB + 1, 10 * MiB, None])
def test_sizes_azure_refuses(tmp_path, size):
    with pytest.raises(DriverError, match="azure"):
        azure.script(machine([size]), str(tmp_path))

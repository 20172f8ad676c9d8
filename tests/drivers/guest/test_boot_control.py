"""The control: server (a), not converted, on the virtio hardware of the definition
drivers/kvm.py writes for it does not come up. It stops at the initramfs prompt, which
is what the conversion exists to fix and what the end-to-end boots would show if it did
nothing: the boot tests can fail."""

from __future__ import annotations

import re

from drivers import kvm
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.guests import boot, fixtures

MiB = 1 << 20
#: initramfs-tools gives up after 30 s without its root device, then opens a shell
STUCK = r"Gave up waiting for root|ALERT! .* does not exist"


def test_unconverted_server_a_stops_at_the_initramfs_prompt_on_virtio(tmp_path):
    srv = fixtures.server("a")
    spec = MachineSpec(
        name="server-a-unconverted",
        cpus=1,
        memory=1024 * MiB,
        firmware="bios",
        disks=[DiskSpec(srv.image, "qcow2", "virtio")],
        nics=[NicSpec(srv.mac, "virtio")],
        os="linux",
    )
    definition = kvm.PLATFORM.write(spec, str(tmp_path))
    log = str(tmp_path / "serial.log")
    with boot.boot_definition(definition, log, accel=fixtures.accel()) as vm:
        stuck = vm.wait_for_serial(STUCK, fixtures.BOOT_TIMEOUT)
        serial = vm.serial()
    # the kernel did start from the disk: GRUB and the kernel are fine, the root is not
    assert "Linux version" in serial, serial[-2000:]
    assert stuck is not None, f"no initramfs prompt in {log}:\n{serial[-2000:]}"
    assert not re.search(r"login:|Reached target.*Multi-User", serial), serial[-2000:]

"""Converting a Linux guest for a platform's virtual hardware, step by step (the order
virt-v2v's convert_linux.ml follows): the old platform's tools out, device names to
UUIDs, the network carried to the new interface names, the initramfs rebuilt with the
new drivers, the boot loader's configuration regenerated, the UEFI fallback loader, an
SELinux relabel. Each step raises GuestError naming itself; the caller commits the
disks only when every step passed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ..platform import GuestHardware
from . import bootloader, devices, initramfs, network, tools
from .appliance import Appliance
from .errors import GuestError
from .inspection import Inspection, Kernel
from .report import Report


def convert_linux(
    app: Appliance,
    found: Inspection,
    platform: str,
    hardware: GuestHardware,
    macs: list[str | None],
    report: Report,
    timings: dict[str, float],
) -> None:
    def timed(step: str, fn: Callable[[], None]) -> None:
        start = time.monotonic()
        fn()
        timings[step] = round(time.monotonic() - start, 2)

    kernels = _kernels_to_rebuild(found, hardware)
    remap = devices.DeviceMap(app)
    # the cheap edits first: a hostile or broken file stops the conversion before the
    # long steps
    timed("devices", lambda: _remap_devices(app, remap, report))
    timed("network", lambda: _network(app, found, hardware, macs, report))
    timed(
        "remove-tools",
        lambda: tools.convert(app, platform, found.hypervisor_tools, found.package_format, report),
    )
    drivers = tuple(dict.fromkeys(hardware.disk_drivers + hardware.nic_drivers))
    timed(
        "initramfs",
        lambda: initramfs.convert(app, found.initramfs_tool, kernels, drivers, platform, report),
    )
    if found.bootloader in ("grub2-bios", "grub2-uefi", "grub-legacy"):
        timed("grub", lambda: bootloader.convert(app, remap, report))
    elif found.bootloader == "systemd-boot":
        timed("boot-entries", lambda: bootloader.remap_entries(app, remap, report))
    else:
        report.warn("no boot loader configuration found to remap")
    if found.firmware == "uefi":
        timed("uefi", lambda: bootloader.ensure_fallback_loader(app, report))
    if found.selinux == "enforcing":
        app.g.touch("/.autorelabel")
        report.file("/.autorelabel", ["created: SELinux relabels the filesystem on the next boot"])


def _kernels_to_rebuild(found: Inspection, hardware: GuestHardware) -> list[Kernel]:
    """The default kernel and every other kernel that has the target's drivers."""
    wanted = hardware.disk_drivers + hardware.nic_drivers
    default = found.kernel(found.default_kernel)
    if default is None:
        raise GuestError("initramfs", "the boot loader's default kernel is not installed")
    lacking = [d for d in wanted if not default.has(d)]
    if lacking:
        others = [k.version for k in found.kernels if all(k.has(d) for d in wanted)]
        hint = f"; kernels that have them: {', '.join(others)}" if others else ""
        raise GuestError(
            "initramfs", f"the default kernel {default.version} has no {', '.join(lacking)}{hint}"
        )
    return [k for k in found.kernels if k is default or all(k.has(d) for d in wanted)]


def _remap_devices(app: Appliance, remap: devices.DeviceMap, report: Report) -> None:
    for path, column in (("/etc/fstab", 0), ("/etc/crypttab", 1)):
        if app.is_symlink(path):
            # a guest's fstab is a file; a link may point anywhere (resolved in the guest)
            raise GuestError("fstab", f"{path} in the guest is a symlink: refusing to edit it")
        if not app.exists(path):
            continue
        old = app.read_text(path, step="fstab")
        new, changes = devices.remap_table(old, column, remap)
        if new != old:
            app.write_text(path, new, step="fstab")
            report.file(path, changes)
    for path in ("/etc/initramfs-tools/conf.d/resume",):
        if app.exists(path):
            old = app.read_text(path, step="fstab")
            new, changes = devices.remap_assignment(old, "RESUME", remap)
            if new != old:
                app.write_text(path, new, step="fstab")
                report.file(path, changes)


def _network(
    app: Appliance,
    found: Inspection,
    hardware: GuestHardware,
    macs: list[str | None],
    report: Report,
) -> None:
    names = list(hardware.interface_names)
    if _kernel_names(app):
        names = [f"eth{i}" for i in range(len(names))]
    source = network.physical_names(found.network)
    kept = {m.lower() for m in macs if m} if hardware.keeps_macs else set()
    # a NIC pinned by a MAC the VM keeps (udev rule, .link file) keeps its pinned name
    pinned = {
        n
        for c in found.network
        if c.system in ("udev",)
        for n, m in zip(c.interfaces, c.mac_pins)
        if m in kept
    }
    source = [n for n in source if n not in pinned]
    mapping = {old: new for old, new in zip(source, names) if new and old != new}
    if len(source) > len(names):
        report.warn(
            f"interfaces {', '.join(source[len(names) :])} have no NIC on the target; left as they are"
        )
    mac_names = {m.lower(): n for m, n in zip(macs, names) if m and n}
    r = network.Rename(mapping, kept, mac_names, names[0] if len(names) == 1 else None)
    network.convert(app, found.network, r, report)


def _kernel_names(app: Appliance) -> bool:
    """net.ifnames=0 on the kernel command line: NICs keep the kernel's ethN names."""
    if not app.exists("/etc/default/grub"):
        return False
    text = app.read_text("/etc/default/grub", step="network")
    return re.search(r"(?<![\w.])net\.ifnames=0\b", text) is not None

"""Target platforms: a MachineSpec in, a VM definition and the preferred disk format out.

    machine     MachineSpec, DiskSpec, NicSpec (validated), DriverError in errors
    platform    what every platform provides (DiskTarget, adapt, write, checklist)
    kvm vmware virtualbox hyperv xen azure aws   one module per platform
    readers     .vmx, .ovf/.ova, libvirt XML, xl.cfg and Hyper-V scripts -> MachineSpec

Imports formats only (formats.ovf for OVF packages); nothing here imports p2v.
"""

from __future__ import annotations

from . import aws, azure, hyperv, kvm, virtualbox, vmware, xen
from .errors import DriverError
from .machine import DiskSpec, MachineSpec, NicSpec
from .platform import Adapted, DiskTarget, Platform
from .readers import read_definition

__all__ = [
    "PLATFORMS",
    "Adapted",
    "DiskSpec",
    "DiskTarget",
    "DriverError",
    "MachineSpec",
    "NicSpec",
    "Platform",
    "get_platform",
    "read_definition",
    "write_definition",
]

#: platform name -> its driver; `p2v v2v --to` and `p2v clone --target` take these names
PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        kvm.PLATFORM,
        vmware.PLATFORM,
        vmware.VSPHERE,
        virtualbox.PLATFORM,
        hyperv.PLATFORM,
        xen.PLATFORM,
        azure.PLATFORM,
        aws.PLATFORM,
    )
}

ALIASES = {
    "libvirt": "kvm",
    "qemu": "kvm",
    "esxi": "vsphere",
    "vbox": "virtualbox",
    "hyper-v": "hyperv",
}


def get_platform(name: str) -> Platform:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PLATFORMS:
        raise DriverError(f"unknown platform {name!r} (one of: {', '.join(PLATFORMS)})")
    return PLATFORMS[key]


def write_definition(spec: MachineSpec, platform: str, outdir: str) -> str:
    """Write `platform`'s VM definition for `spec` into `outdir` and return its path.

    Disk paths are taken relative to `outdir` unless absolute; a disk's bus or a NIC's
    model left open (None) gets the platform's choice."""
    target = get_platform(platform)
    return target.write(target.complete(spec), outdir)

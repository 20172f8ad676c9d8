"""Target platforms: a MachineSpec in, a VM definition and the preferred disk format out.

    names       the platform names, buses, NIC models and OS families (the CLI's choices)
    machine     MachineSpec, DiskSpec, NicSpec (validated), DriverError in errors
    platform    what every platform provides (DiskTarget, adapt, write, checklist)
    kvm vmware virtualbox hyperv xen azure aws   one module per platform
    readers     .vmx, .ovf/.ova, libvirt XML, xl.cfg and Hyper-V scripts -> MachineSpec

Imports formats only (formats.ovf for OVF packages); nothing here imports p2v.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DriverError
from .names import NAMES

if TYPE_CHECKING:
    from .machine import DiskSpec, MachineSpec, NicSpec
    from .platform import Adapted, DiskTarget, Platform
    from .readers import read_definition

__all__ = [
    "NAMES",
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

_LAZY = {
    "DiskSpec": "machine",
    "MachineSpec": "machine",
    "NicSpec": "machine",
    "Adapted": "platform",
    "DiskTarget": "platform",
    "Platform": "platform",
    "read_definition": "readers",
}


def __getattr__(name: str) -> Any:
    if name == "PLATFORMS":
        return _platforms()
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_loaded: dict[str, Platform] = {}


def _platforms() -> dict[str, Platform]:
    """platform name -> its driver, loaded on first use."""
    if not _loaded:
        from . import aws, azure, hyperv, kvm, virtualbox, vmware, xen

        found = (
            kvm.PLATFORM,
            vmware.PLATFORM,
            vmware.VSPHERE,
            virtualbox.PLATFORM,
            hyperv.PLATFORM,
            xen.PLATFORM,
            azure.PLATFORM,
            aws.PLATFORM,
        )
        _loaded.update((p.name, p) for p in found)
    return _loaded


ALIASES = {
    "libvirt": "kvm",
    "qemu": "kvm",
    "esxi": "vsphere",
    "vbox": "virtualbox",
    "hyper-v": "hyperv",
}


def get_platform(name: str) -> Platform:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in NAMES:
        raise DriverError(f"unknown platform {name!r} (one of: {', '.join(NAMES)})")
    return _platforms()[key]


def write_definition(spec: MachineSpec, platform: str, outdir: str) -> str:
    """Write `platform`'s VM definition for `spec` into `outdir` and return its path.

    Disk paths are taken relative to `outdir` unless absolute; a disk's bus or a NIC's
    model left open (None) gets the platform's choice."""
    target = get_platform(platform)
    return target.write(target.complete(spec), outdir)

"""OVF descriptors and OVA appliances (DMTF DSP0243).

    descriptor  build/parse the XML (defusedxml, DTDs refused)
    manifest    SHA256(name)= hex lines
    ustar       the OVA tar container, read without trusting it
    appliance   pack, unpack, describe, write_package

The virtual machine inside is a plain dict shaped like drivers.MachineSpec.to_dict(), so
this package imports nothing outside formats.
"""

from __future__ import annotations

from .appliance import (
    PackResult,
    UnpackResult,
    describe,
    load,
    pack,
    unpack,
    write_ova,
    write_package,
)
from .descriptor import DEFAULT_SYSTEM_TYPE, Descriptor, ResourceType, build, parse

__all__ = [
    "DEFAULT_SYSTEM_TYPE",
    "Descriptor",
    "PackResult",
    "ResourceType",
    "UnpackResult",
    "build",
    "describe",
    "load",
    "pack",
    "parse",
    "unpack",
    "write_ova",
    "write_package",
]

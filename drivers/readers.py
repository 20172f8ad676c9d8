"""Reading a VM definition into a MachineSpec, whichever product wrote it: .vmx, .ovf or
.ova, libvirt domain XML, xl.cfg, or a Hyper-V script as p2v writes them."""

from __future__ import annotations

import os
from typing import Any

from . import hyperv, kvm, sourcepath, vmware, xen
from .errors import DriverError
from .machine import MachineSpec

#: what each reader is for, by file name ending
KINDS = {
    ".vmx": "vmx",
    ".ovf": "ovf",
    ".ova": "ova",
    ".xml": "libvirt",
    ".cfg": "xl",
    ".ps1": "hyperv",
}
_OVF_ONLY_DISK_KEYS = ("populated_size", "disk_id", "subformat", "controller", "output")


def kind_of(path: str) -> str | None:
    return KINDS.get(os.path.splitext(path)[1].lower())


def machine_from_ovf(machine: dict[str, Any], base_dir: str | None, where: str) -> MachineSpec:
    """A MachineSpec from formats.ovf's machine dict; disk paths resolved against
    `base_dir` (an .ovf's directory) or left as archive member names (base_dir None)."""
    data = dict(machine)
    disks = []
    for d in data.get("disks") or []:
        d = {k: v for k, v in d.items() if k not in _OVF_ONLY_DISK_KEYS}
        if base_dir is not None and d.get("path"):
            d["path"] = sourcepath.resolve(d["path"], base_dir, where=where)
        disks.append(d)
    data["disks"] = disks
    try:
        return MachineSpec.from_dict(data)
    except DriverError as exc:
        raise DriverError(f"{where}: {exc}") from exc


def read_ovf(path: str) -> MachineSpec:
    from formats.ovf import load

    src, desc = load(path)
    base = os.path.dirname(os.path.abspath(path)) if src.kind == "ovf" else None
    spec = machine_from_ovf(desc.machine, base, path)
    spec.warnings += [w for w in src.warnings if w not in spec.warnings]
    return spec


def read_definition(path: str) -> MachineSpec:
    """The machine a definition file describes; unknown settings are in `.warnings`."""
    if not os.path.isfile(path):
        raise DriverError(f"{path}: no such file")
    kind = kind_of(path)
    if kind == "vmx":
        return vmware.read_vmx(path)
    if kind in ("ovf", "ova"):
        return read_ovf(path)
    if kind == "libvirt":
        return kvm.read_domain(path)
    if kind == "xl":
        return xen.read_xl(path)
    if kind == "hyperv":
        return hyperv.read_script(path)
    raise DriverError(f"{path}: not a VM definition (.vmx, .ovf, .ova, .xml, .cfg, .ps1)")

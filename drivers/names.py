"""The words the command line offers before any driver loads: platform names, disk buses,
NIC models and OS families (argparse's choices). Loading `machine` for them, with its
dataclasses, cost every `p2v` command ~2 ms; the platforms themselves, ~12 ms more."""

from __future__ import annotations

#: the names `p2v v2v --to` and `p2v clone --target` take, in PLATFORMS' order
NAMES = ("kvm", "vmware", "vsphere", "virtualbox", "hyperv", "xen", "azure", "aws")
BUSES = ("virtio", "scsi", "sata", "ide", "nvme")
NIC_MODELS = ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139", "pcnet", "netvsc", "xen")
OS_FAMILIES = ("linux", "windows", "other")

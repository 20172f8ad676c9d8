"""What every target platform module provides: its preferred disk format, the buses and
NIC models it offers, how a MachineSpec is adapted to it, the VM definition it writes and
the checklist of what a guest needs to boot there.

A disk keeps its bus when the target offers the same device with the same guest driver
(IDE, SATA/AHCI, NVMe are the same everywhere); "scsi" or "virtio" mean different
controllers on different platforms (LSI Logic, PVSCSI, virtio-scsi, Hyper-V storvsc), so
those become the target's preferred bus. NIC models follow the same rule with the e1000
family as the portable ones. Users judge a conversion by first-boot success (INTEROP.md):
what changed is reported, and the checklist says what the guest must have for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from formats.fileio import write_file_atomic

from .errors import DriverError
from .machine import DiskSpec, MachineSpec, file_stem

#: buses whose guest driver is the same on every platform that offers them
PORTABLE_BUSES = ("ide", "sata", "nvme")
PORTABLE_NICS = ("e1000", "e1000e", "rtl8139")

EXTENSIONS = {
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vpc": "vhd",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "raw": "img",
}


@dataclass(frozen=True)
class DiskTarget:
    """How a platform wants its disks: format, creation options, file extension, and the
    multiple the virtual size is rounded up to (Azure: whole MiB)."""

    format: str
    options: tuple[tuple[str, str], ...] = ()
    align: int = 1

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def size_for(self, size: int) -> int:
        return -(-size // self.align) * self.align


#: the Linux module that drives each disk bus and NIC model where every platform means the
#: same device by it; a platform overrides the ones it means differently (its "scsi")
LINUX_DISK_DRIVERS = {
    "virtio": ("virtio_pci", "virtio_blk"),
    "sata": ("ahci",),
    "ide": ("ata_piix",),
    "nvme": ("nvme",),
    "scsi": ("virtio_pci", "virtio_scsi"),
}
LINUX_NIC_DRIVERS = {
    "virtio": ("virtio_pci", "virtio_net"),
    "e1000": ("e1000",),
    "e1000e": ("e1000e",),
    "rtl8139": ("8139cp",),
    "pcnet": ("pcnet32",),
    "vmxnet3": ("vmxnet3",),
    "netvsc": ("hv_vmbus", "hv_netvsc"),
    "xen": ("xen_netfront",),
}


@dataclass(frozen=True)
class GuestHardware:
    """What a guest meets on a platform, as drivers/guest converts it: the Linux drivers
    its disks and NICs need at boot, the name each NIC gets (in the definition's NIC order;
    the platform's slot placement decides it), and whether the definition's MACs are the
    ones the guest will see."""

    disk_drivers: tuple[str, ...]
    nic_drivers: tuple[str, ...]
    interface_names: tuple[str, ...]
    keeps_macs: bool = True


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


@dataclass
class Adapted:
    """A spec made to fit a platform, and what had to change."""

    spec: MachineSpec
    changes: list[str] = field(default_factory=list)


class Platform:
    name = "?"
    title = "?"
    disk = DiskTarget("raw")
    #: disk formats the platform can attach (the first is the preferred one)
    formats: tuple[str, ...] = ("raw",)
    buses: tuple[str, ...] = ("sata",)
    nic_models: tuple[str, ...] = ("e1000",)
    firmwares: tuple[str, ...] = ("bios", "uefi")
    secure_boot = True
    #: memory is rounded up to a multiple of this many MiB
    memory_step_mib = 1
    default_network = "default"

    # -- choices ------------------------------------------------------------------------
    def preferred_bus(self, spec: MachineSpec) -> str:
        return self.buses[0]

    def preferred_nic(self, spec: MachineSpec) -> str:
        return self.nic_models[0]

    def disk_target(self, fmt: str | None = None) -> DiskTarget:
        """The preferred disk target, or the one for format `fmt` (-O) when allowed."""
        if fmt is None or fmt == self.disk.format:
            return self.disk
        if fmt not in self.formats:
            raise DriverError(
                f"{self.name}: disks in {fmt} format are not usable here "
                f"(one of: {', '.join(self.formats)})"
            )
        return DiskTarget(fmt)

    def disk_options(self, target: DiskTarget, disk: DiskSpec) -> dict[str, str]:
        """Creation options (`-o`) for one disk in `target`'s format."""
        return dict(target.options)

    def adapt(
        self,
        spec: MachineSpec,
        *,
        bus: str | None = None,
        nic_model: str | None = None,
        network: str | None = None,
    ) -> Adapted:
        """Fit `spec` to this platform: buses, NIC models, networks, firmware, memory.

        Network names mean nothing on another platform ('VM Network' is no libvirt
        network), so NICs join `network` or the platform's default one, as virt-v2v does."""
        changes: list[str] = []
        if bus is not None and bus not in self.buses:
            raise DriverError(
                f"{self.name}: bus {bus} is not offered (one of: {', '.join(self.buses)})"
            )
        if nic_model is not None and nic_model not in self.nic_models:
            raise DriverError(
                f"{self.name}: NIC model {nic_model} is not offered (one of: {', '.join(self.nic_models)})"
            )
        disks = []
        for i, d in enumerate(spec.disks, 1):
            new = bus or (d.bus if d.bus in PORTABLE_BUSES and d.bus in self.buses else None)
            new = new or self.preferred_bus(spec)
            if new != d.bus:
                changes.append(f"disk {i} bus: {d.bus or 'unknown'} -> {new}")
            disks.append(type(d)(d.path, d.format, new, d.size))
        nics = []
        for i, n in enumerate(spec.nics, 1):
            keep = n.model in PORTABLE_NICS and n.model in self.nic_models
            model = nic_model or (n.model if keep else self.preferred_nic(spec))
            if model != n.model:
                changes.append(
                    f"NIC {i} ({n.mac or 'no MAC'}) model: {n.model or 'unknown'} -> {model}"
                )
            target_net = network or self.default_network
            if n.network and n.network != target_net:
                changes.append(f"NIC {i} network: {n.network} -> {target_net}")
            nics.append(type(n)(n.mac, model, network))
        firmware, secure = spec.firmware, spec.secure_boot
        if firmware not in self.firmwares:
            firmware = self.firmwares[0]
            changes.append(f"firmware: {spec.firmware} -> {firmware}")
        if secure and not self.secure_boot:
            secure = False
            changes.append("Secure Boot: on -> off (not offered)")
        if firmware == spec.firmware:
            changes.append(f"firmware: {firmware} (kept){', Secure Boot' if secure else ''}")
        step = self.memory_step_mib << 20
        memory = -(-spec.memory // step) * step
        if memory != spec.memory:
            changes.append(
                f"memory: {spec.memory} -> {memory} bytes (whole {self.memory_step_mib} MiB)"
            )
        new_spec = spec.replace(
            disks=disks, nics=nics, firmware=firmware, secure_boot=secure, memory=memory
        )
        return Adapted(new_spec, changes)

    def complete(self, spec: MachineSpec) -> MachineSpec:
        """Fill what a description left open (a disk's bus, a NIC's model) with this
        platform's choices; a spec that already fits is returned as it is."""
        fits = all(d.bus in self.buses for d in spec.disks) and all(
            n.model in self.nic_models for n in spec.nics
        )
        if fits:
            return spec
        adapted = self.adapt(spec).spec
        adapted.nics = [type(n)(n.mac, n.model, o.network) for n, o in zip(adapted.nics, spec.nics)]
        return adapted

    # -- output -------------------------------------------------------------------------
    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        raise NotImplementedError

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        raise NotImplementedError

    def check(self, spec: MachineSpec) -> None:
        """Refuse disks this platform cannot attach."""
        for d in spec.disks:
            if d.format is not None and d.format not in self.formats:
                raise DriverError(
                    f"{self.name}: disk {d.path} is {d.format}; this platform attaches "
                    f"{', '.join(self.formats)} (convert it with -O {self.disk.format})"
                )

    def write(self, spec: MachineSpec, outdir: str) -> str:
        """Write the definition into `outdir` (atomically) and return its path."""
        self.check(spec)
        path = self.definition_path(spec, outdir)
        data = self.render(spec, outdir)
        write_file_atomic(path, data)
        return path

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        """What the guest needs before it boots here."""
        return []

    # -- the guest's view (drivers/guest converts for it) ---------------------------------
    disk_drivers: dict[str, tuple[str, ...]] = {}
    nic_drivers: dict[str, tuple[str, ...]] = {}
    keeps_macs = True

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        """The name each NIC of `spec` gets in a Linux guest (systemd's predictable names:
        the slot the definition places it in), in NIC order."""
        raise NotImplementedError

    def guest_hardware(self, spec: MachineSpec) -> GuestHardware:
        """The drivers and interface names a Linux guest needs for `spec` (completed) here."""
        spec = self.complete(spec)
        disks = {**LINUX_DISK_DRIVERS, **self.disk_drivers}
        nics = {**LINUX_NIC_DRIVERS, **self.nic_drivers}
        disk = [m for d in spec.disks for m in disks[d.bus or self.buses[0]]]
        nic = [m for n in spec.nics for m in nics[n.model or self.nic_models[0]]]
        return GuestHardware(
            _unique(disk), _unique(nic), self.interface_names(spec), self.keeps_macs
        )

    def stem(self, spec: MachineSpec) -> str:
        return file_stem(spec.name)


def disk_location(path: str | None, outdir: str) -> str:
    """A disk's path as a definition should name it: absolute, resolved against OUTDIR."""
    if not path:
        raise DriverError("a disk has no image file")
    return os.path.abspath(os.path.join(outdir, path))

"""The guest-side checklist shared by every platform: what a converted guest needs to
boot after its disk controller, NIC or firmware changed.

virt-v2v edits the guest (initramfs, fstab, virtio-win); p2v converts the disks and the
definition and says plainly what the guest must have, so the first boot is not a surprise.
"""

from __future__ import annotations

from .machine import MachineSpec

_LINUX_MODULES = {
    "virtio": "virtio_blk virtio_scsi virtio_pci",
    "scsi": "the SCSI controller's module",
    "nvme": "nvme",
    "sata": "ahci",
    "ide": "ata_piix",
}


def _for(spec: MachineSpec, family: str) -> bool:
    return spec.os in (None, family)


def _label(spec: MachineSpec, family: str) -> str:
    return "" if spec.os == family else f"{family.capitalize()} guests: "


def common(source: MachineSpec, target: MachineSpec) -> list[str]:
    """Lines every target shares: changed disk buses, NIC models, firmware."""
    out: list[str] = []
    new_buses = sorted(
        {t.bus for s, t in zip(source.disks, target.disks) if t.bus and s.bus != t.bus}
    )
    if new_buses:
        if _for(target, "linux"):
            mods = ", ".join(_LINUX_MODULES.get(b, b) for b in new_buses)
            out.append(
                f"{_label(target, 'linux')}the initramfs must contain the driver for the new disk "
                f"bus ({mods}) before the first boot: dracut -f --add-drivers '...' or list the "
                "modules in /etc/initramfs-tools/modules and run update-initramfs -u"
            )
            out.append(
                f"{_label(target, 'linux')}disk device names change (e.g. /dev/sda -> /dev/vda): "
                "/etc/fstab, crypttab and the boot loader should name filesystems by UUID= or LABEL="
            )
        if _for(target, "windows"):
            out.append(
                f"{_label(target, 'windows')}the boot disk controller changed: its driver must be "
                "installed and set to start at boot before moving, or Windows stops with "
                "INACCESSIBLE_BOOT_DEVICE"
            )
    changed_nics = [t for s, t in zip(source.nics, target.nics) if s.model != t.model]
    if changed_nics:
        out.append(
            "NIC models changed: interface names may change (e.g. ens192 -> enp1s0); the MAC "
            "addresses are kept, so configuration keyed on MAC keeps working"
        )
    if target.nics and not any(n.mac for n in target.nics):
        out.append("no MAC address was known: the platform assigns new ones (DHCP leases change)")
    if target.firmware == "uefi":
        out.append(
            "UEFI: the firmware's boot entries (NVRAM) do not travel; the EFI system partition "
            "must hold the fallback loader \\EFI\\BOOT\\BOOTX64.EFI or an entry must be added"
        )
    if source.firmware != target.firmware:
        out.append(
            f"the firmware changed from {source.firmware} to {target.firmware}: the disk's boot "
            "loader must match (GPT + EFI system partition for UEFI, MBR boot code for BIOS)"
        )
    if _for(target, "windows"):
        out.append(
            f"{_label(target, 'windows')}activation may be requested again after the hardware change"
        )
    return out

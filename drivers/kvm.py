"""KVM through libvirt: a domain XML (https://libvirt.org/formatdomain.html) to
`virsh define`, and the reader that turns a libvirt domain into a MachineSpec.

q35 with virtio disks and NICs by default; SATA and e1000e for Windows, which has no
inbox virtio drivers; i440fx ("pc") when a disk needs IDE, which q35 lacks. UEFI uses
libvirt's firmware auto-selection (`<os firmware='efi'>`, libvirt >= 5.2) so the
definition does not hard-code where a distribution keeps OVMF; Secure Boot asks for the
`secure-boot` and `enrolled-keys` firmware features and turns on SMM, which it needs.
"""

from __future__ import annotations

import os
from xml.etree import ElementTree as ET

from . import checklist, sourcepath, xmlsafe
from .errors import DriverError
from .machine import DiskSpec, MachineSpec, NicSpec
from .platform import DiskTarget, Platform, disk_location

#: our own metadata namespace: libvirt keeps foreign metadata verbatim
NS_P2V = "urn:p2v:libvirt:machine:1"
NS_LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"

_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
_UNITS = {
    "b": 1, "bytes": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}  # fmt: skip
#: what every definition regenerates for its platform: read without a warning
_BOILERPLATE_DEVICES = {
    "emulator",
    "controller",
    "serial",
    "console",
    "graphics",
    "video",
    "input",
    "memballoon",
    "channel",
    "rng",
    "audio",
}
_BOILERPLATE = {
    "uuid",
    "title",
    "description",
    "currentMemory",
    "clock",
    "features",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "resource",
    "seclabel",
}
_LIBVIRT_NIC = {
    "virtio": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
    "pcnet": "pcnet",
}


def _dev_name(prefix: str, index: int) -> str:
    """vda, vdb, ..., vdz, vdaa: the letters libvirt and Linux use."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return prefix + letters


class Kvm(Platform):
    name = "kvm"
    title = "KVM (libvirt)"
    disk = DiskTarget("qcow2")
    # QEMU runs every format here; qcow2 and raw are the ones libvirt tooling expects
    formats = ("qcow2", "raw", "vmdk", "vpc", "vhdx", "vdi")
    buses = ("virtio", "sata", "scsi", "ide")
    nic_models = ("virtio", "e1000e", "e1000", "rtl8139")
    default_network = "default"

    def preferred_bus(self, spec: MachineSpec) -> str:
        return "sata" if spec.os == "windows" else "virtio"

    def preferred_nic(self, spec: MachineSpec) -> str:
        return "e1000e" if spec.os == "windows" else "virtio"

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.xml")

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        machine = machine_type(spec)
        return tuple(interface_name(machine, i) for i in range(len(spec.nics)))

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        return domain_xml(spec, outdir)

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        uses_virtio = any(d.bus == "virtio" for d in target.disks) or any(
            n.model == "virtio" for n in target.nics
        )
        if uses_virtio and target.os in (None, "windows"):
            out.append(
                "Windows guests: install the virtio-win drivers (viostor or vioscsi, NetKVM) "
                "before switching to virtio, or boot once on SATA/e1000e and install them then"
            )
        if uses_virtio and target.os in (None, "linux"):
            out.append("Linux guests: virtio_net must be available for the virtio NIC")
        out.append(
            f"define and start: virsh define {self.stem(target)}.xml && virsh start {target.name}"
        )
        if target.nics:
            nets = sorted({n.network or self.default_network for n in target.nics})
            out.append(
                f"the libvirt network(s) {', '.join(nets)} must exist (virsh net-list --all)"
            )
        out.append(
            "remove the previous platform's guest tools (VMware Tools, Hyper-V services) if present; qemu-guest-agent is recommended"
        )
        return out


def machine_type(spec: MachineSpec) -> str:
    return "pc" if any(d.bus == "ide" for d in spec.disks) else "q35"


#: pc (i440fx): the host bridge, PIIX3 and the video card hold slots 0-2
_PC_FIRST_NIC_SLOT = 3


def nic_address(machine: str, index: int) -> tuple[int, int]:
    """The PCI (bus, slot) of NIC `index`, which the definition writes and which decides
    the guest's interface name (interface_name): on q35 each NIC has its own
    pcie-root-port, whose index is its bus number; on pc they share bus 0 from slot 3."""
    if machine == "q35":
        return index + 1, 0
    slot = _PC_FIRST_NIC_SLOT + index
    if slot > 31:
        raise DriverError(f"kvm: NIC {index + 1} does not fit on the pc machine's PCI bus")
    return 0, slot


def interface_name(machine: str, index: int) -> str:
    """systemd's predictable name for NIC `index`: enp<bus>s<slot> behind a q35 root port
    (enp1s0, as virt-install's guests have), ens<slot> for pc's hotplug slots (ens3)."""
    bus, slot = nic_address(machine, index)
    return f"enp{bus}s{slot}" if machine == "q35" else f"ens{slot}"


def domain_xml(spec: MachineSpec, outdir: str) -> bytes:
    """The libvirt domain for `spec`; disk paths are made absolute against `outdir`."""
    machine = machine_type(spec)
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = spec.name
    meta = ET.SubElement(dom, "metadata")
    if spec.os:
        ET.SubElement(meta, f"{{{NS_P2V}}}os", family=spec.os)
    ET.SubElement(dom, "memory", unit="KiB").text = str(spec.memory // 1024)
    ET.SubElement(dom, "vcpu", placement="static").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os")
    if spec.firmware == "uefi":
        os_el.set("firmware", "efi")
    ET.SubElement(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    if spec.firmware == "uefi":
        fw = ET.SubElement(os_el, "firmware")
        ET.SubElement(
            fw, "feature", enabled="yes" if spec.secure_boot else "no", name="secure-boot"
        )
        ET.SubElement(
            fw, "feature", enabled="yes" if spec.secure_boot else "no", name="enrolled-keys"
        )
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.secure_boot:
        ET.SubElement(features, "smm", state="on")
    # Windows keeps the hardware clock in local time
    ET.SubElement(dom, "clock", offset="localtime" if spec.os == "windows" else "utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    counters: dict[str, int] = {}
    for d in spec.disks:
        bus = d.bus or "virtio"
        if bus not in _DEV_PREFIX:
            raise DriverError(f"kvm: libvirt has no {bus} disk bus here (virtio, sata, scsi, ide)")
        prefix = _DEV_PREFIX[bus]
        index = counters.get(prefix, 0)
        counters[prefix] = index + 1
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d.format or "raw")
        ET.SubElement(disk, "source", file=disk_location(d.path, outdir))
        ET.SubElement(disk, "target", dev=_dev_name(prefix, index), bus=bus)
    if any(d.bus == "scsi" for d in spec.disks):
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if machine == "q35":
        for i in range(len(spec.nics)):
            bus, _ = nic_address(machine, i)
            ET.SubElement(devices, "controller", type="pci", index=str(bus), model="pcie-root-port")
    for i, n in enumerate(spec.nics):
        iface = ET.SubElement(devices, "interface", type="network")
        if n.mac:
            ET.SubElement(iface, "mac", address=n.mac)
        ET.SubElement(iface, "source", network=n.network or Kvm.default_network)
        ET.SubElement(iface, "model", type=_LIBVIRT_NIC.get(n.model or "virtio", "virtio"))
        bus, slot = nic_address(machine, i)
        ET.SubElement(
            iface, "address", type="pci", domain="0x0000", bus=f"0x{bus:02x}",
            slot=f"0x{slot:02x}", function="0x0",
        )  # fmt: skip
    ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(devices, "console", type="pty")
    ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes")
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="vga")
    ET.indent(dom)
    ET.register_namespace("p2v", NS_P2V)
    return ET.tostring(dom, encoding="unicode").encode() + b"\n"


# -- reading ----------------------------------------------------------------------------


def _bytes(el: ET.Element | None, where: str) -> int | None:
    if el is None or el.text is None:
        return None
    text = el.text.strip()
    unit = (el.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise DriverError(f"{where}: unknown memory unit {el.get('unit')!r}")
    if not text.isdigit() or len(text) > 20:
        raise DriverError(f"{where}: memory {text[:40]!r} is not a whole number")
    return int(text) * _UNITS[unit]


def _family(root: ET.Element) -> str | None:
    meta = root.find("metadata")
    if meta is None:
        return None
    ours = meta.find(f"{{{NS_P2V}}}os")
    if ours is not None:
        return ours.get("family")
    for el in meta.iter(f"{{{NS_LIBOSINFO}}}os"):
        osid = (el.get("id") or "").lower()
        if "microsoft.com/win" in osid:
            return "windows"
        if osid:
            return (
                "linux"
                if any(
                    k in osid
                    for k in (
                        "linux",
                        "ubuntu",
                        "debian",
                        "fedora",
                        "redhat",
                        "centos",
                        "suse",
                        "alpine",
                        "arch",
                    )
                )
                else "other"
            )
    return None


def read_domain(path: str) -> MachineSpec:
    """A libvirt domain XML file as a MachineSpec (disk paths resolved, unknowns warned)."""
    return parse_domain(xmlsafe.read(path), os.path.dirname(os.path.abspath(path)), where=path)


def parse_domain(data: bytes, base_dir: str, *, where: str = "libvirt XML") -> MachineSpec:
    root = xmlsafe.parse(data, where)
    if root.tag != "domain":
        raise DriverError(f"{where}: root element is <{root.tag}>, not <domain>")
    warnings: list[str] = []
    consumed = {"name", "memory", "vcpu", "os", "devices", "metadata"} | _BOILERPLATE
    name = (root.findtext("name") or "").strip()
    if not name:
        raise DriverError(f"{where}: the domain has no <name>")
    memory = _bytes(root.find("memory"), where)
    if memory is None:
        raise DriverError(f"{where}: the domain has no <memory>")
    vcpu_text = (root.findtext("vcpu") or "1").strip()
    if not vcpu_text.isdigit() or len(vcpu_text) > 6:
        raise DriverError(f"{where}: <vcpu> {vcpu_text[:20]!r} is not a whole number")
    firmware, secure = "bios", False
    os_el = root.find("os")
    if os_el is not None:
        if os_el.get("firmware") == "efi":
            firmware = "uefi"
        loader = os_el.find("loader")
        if loader is not None:
            path = (loader.text or "").lower()
            if loader.get("type") == "pflash" or any(
                k in path for k in ("ovmf", "edk2", "aavmf", "efi")
            ):
                firmware = "uefi"
            if loader.get("secure") == "yes":
                secure = True
        for feat in os_el.findall("firmware/feature"):
            if feat.get("name") == "secure-boot" and feat.get("enabled") == "yes":
                secure = True
        os_type = os_el.find("type")
        if os_type is not None and (os_type.text or "hvm").strip() != "hvm":
            raise DriverError(
                f"{where}: OS type {os_type.text!r} is not a full virtual machine (hvm)"
            )
    disks: list[DiskSpec] = []
    nics: list[NicSpec] = []
    dropped: list[str] = []
    devices = root.find("devices")
    for dev in list(devices) if devices is not None else []:
        if dev.tag == "disk":
            kind = dev.get("device", "disk")
            if kind != "disk":
                dropped.append(f"{kind} drive")
                continue
            source = dev.find("source")
            file = None
            if source is not None:
                file = source.get("file") or source.get("dev")
            if dev.get("type") not in ("file", "block", None) or not file:
                warnings.append(f"disk of type {dev.get('type')} (no local file) not carried over")
                continue
            driver = dev.find("driver")
            fmt = driver.get("type") if driver is not None else None
            target = dev.find("target")
            bus = target.get("bus") if target is not None else None
            if bus not in (None, "virtio", "scsi", "sata", "ide", "nvme"):
                warnings.append(
                    f"disk {file}: bus {bus} is not known; the target's default is used"
                )
                bus = None
            disks.append(
                DiskSpec(
                    sourcepath.resolve(file, base_dir, allow_absolute=True, where=where),
                    None if fmt in (None, "") else fmt,
                    bus,
                )
            )
        elif dev.tag == "interface":
            mac_el = dev.find("mac")
            model_el = dev.find("model")
            src = dev.find("source")
            network = None
            if src is not None:
                network = src.get("network") or src.get("bridge")
            model = model_el.get("type") if model_el is not None else None
            if model is not None and model not in _LIBVIRT_NIC:
                warnings.append(f"NIC model {model} is not known; the target's default is used")
                model = None
            nics.append(
                NicSpec(mac_el.get("address") if mac_el is not None else None, model, network)
            )
        elif dev.tag not in _BOILERPLATE_DEVICES:
            dropped.append(dev.tag)
    if dropped:
        warnings.append("devices not carried over: " + ", ".join(sorted(set(dropped))))
    others = sorted({el.tag for el in root if el.tag not in consumed})
    if others:
        warnings.append("settings not carried over: " + ", ".join(others))
    spec = MachineSpec(
        name=name,
        cpus=int(vcpu_text),
        memory=memory,
        firmware=firmware,
        secure_boot=secure and firmware == "uefi",
        disks=disks,
        nics=nics,
        os=_family(root),
    )
    spec.warnings = warnings
    return spec


PLATFORM = Kvm()

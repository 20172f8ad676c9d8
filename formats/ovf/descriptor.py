"""OVF descriptors (DMTF DSP0243 1.x and 2.0): build one from a machine dict, parse one
into a machine dict.

The machine dict has the shape of drivers.MachineSpec.to_dict() (name, cpus, memory in
bytes, firmware bios|uefi, secure_boot, os family, disks with path/format/bus/size, nics
with mac/model/network), so this module needs nothing from drivers. Parsing uses
defusedxml with DTDs forbidden: a descriptor has no business declaring entities, and
that is how billion-laughs bombs arrive.

Interoperability choices (INTEROP.md): `vmx-11` as the VirtualSystemType (VMware tools
refuse `virtualbox-2.2`, VirtualBox refuses too new a `vmx-NN`); hardware is described
with the generic `Item` element even in OVF 2.0, because `StorageItem` and
`EthernetPortItem` break VMware Workstation; firmware travels as VMware's
`vmw:Config firmware=efi`, which vSphere reads and other importers skip harmlessly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import defusedxml
import defusedxml.ElementTree as DET

from ..errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature

# -- the specification's names ----------------------------------------------------------

NS_OVF = {
    "1.0": "http://schemas.dmtf.org/ovf/envelope/1",
    "2.0": "http://schemas.dmtf.org/ovf/envelope/2",
}
NS_RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
NS_VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
NS_CIM = "http://schemas.dmtf.org/wbem/wscim/1/common"
NS_VMW = "http://www.vmware.com/schema/ovf"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS_VBOX = "http://www.virtualbox.org/ovf/machine"

DEFAULT_SYSTEM_TYPE = "vmx-11"
MAX_DESCRIPTOR = 16 << 20
MAX_ITEMS = 512
MAX_DISKS = 64
MAX_NICS = 32
MAX_CAPACITY = 1 << 50  # 1 PiB: larger than any disk format here can describe
MAX_MEMORY = 24 << 40
MAX_CPUS = 768


class ResourceType:
    """CIM_ResourceAllocationSettingData.ResourceType values OVF hardware items use."""

    OTHER = 1
    PROCESSOR = 3
    MEMORY = 4
    IDE_CONTROLLER = 5
    SCSI_CONTROLLER = 6
    ETHERNET = 10
    FLOPPY = 14
    CD_DRIVE = 15
    DVD_DRIVE = 16
    DISK = 17
    SATA_CONTROLLER = 20  # "other storage": SATA (AHCI) and NVMe controllers
    SERIAL_PORT = 21
    USB_CONTROLLER = 23
    VIDEO = 24
    SOUND = 35


_DROPPED_KINDS = {
    ResourceType.FLOPPY: "floppy drive",
    ResourceType.CD_DRIVE: "CD drive",
    ResourceType.DVD_DRIVE: "DVD drive",
    ResourceType.SERIAL_PORT: "serial port",
    ResourceType.USB_CONTROLLER: "USB controller",
    ResourceType.VIDEO: "video card",
    ResourceType.SOUND: "sound card",
}

#: ovf:format URIs of disk files, as VMware, VirtualBox and Microsoft publish them
FORMAT_URIS = {
    (
        "vmdk",
        "streamOptimized",
    ): "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    ("vmdk", "monolithicSparse"): "http://www.vmware.com/specifications/vmdk.html#sparse",
    ("vpc", None): "http://go.microsoft.com/fwlink/?LinkId=137171",
    ("qcow2", None): "http://www.gnome.org/~markmc/qcow-image-format.html",
    ("raw", None): "http://en.wikipedia.org/wiki/Byte",
}

#: CIM_OperatingSystem.OsType codes for the OS families a machine dict knows
OS_IDS = {"linux": 101, "windows": 77, "other": 102}
VMW_OS_TYPES = {
    "linux": "otherLinux64Guest",
    "windows": "windows9Server64Guest",
    "other": "other64Guest",
}
_LINUX_IDS = {36, 79, 80, 82, 83, 84, 85, 87, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101}
_WINDOWS_IDS = {
    58,
    63,
    67,
    69,
    70,
    71,
    72,
    73,
    74,
    75,
    76,
    77,
    105,
    106,
    107,
    108,
    109,
    110,
    111,
    112,
    113,
}

SCSI_SUBTYPES = {
    "lsilogic": "lsilogic",
    "lsisas1068": "lsilogicsas",
    "pvscsi": "VirtualSCSI",
    "buslogic": "buslogic",
}
NIC_SUBTYPES = {
    "vmxnet3": "VmxNet3",
    "e1000": "E1000",
    "e1000e": "E1000e",
    "pcnet": "PCNet32",
    "virtio": "virtio",
}
_NIC_MODELS = {v.lower(): k for k, v in NIC_SUBTYPES.items()} | {
    "vmxnet3": "vmxnet3",
    "pcnet32": "pcnet",
}


# -- writing ----------------------------------------------------------------------------


class _El:
    """Just enough of an XML element to write OVF the way importers expect it: the
    envelope namespace as the default, `ovf:` on attributes, rasd children in the
    alphabetical order the CIM schema's xs:sequence demands."""

    def __init__(self, tag: str, attrs: dict[str, Any] | None = None, text: Any = None) -> None:
        self.tag = tag
        self.attrs = {k: str(v) for k, v in (attrs or {}).items() if v is not None}
        self.text = None if text is None else str(text)
        self.children: list[_El] = []

    def add(self, tag: str, attrs: dict[str, Any] | None = None, text: Any = None) -> _El:
        child = _El(tag, attrs, text)
        self.children.append(child)
        return child

    def write(self, out: list[str], depth: int) -> None:
        pad = "  " * depth
        attrs = "".join(f" {k}={quoteattr(v)}" for k, v in self.attrs.items())
        if self.text is None and not self.children:
            out.append(f"{pad}<{self.tag}{attrs}/>\n")
        elif not self.children:
            out.append(f"{pad}<{self.tag}{attrs}>{escape(self.text or '')}</{self.tag}>\n")
        else:
            out.append(f"{pad}<{self.tag}{attrs}>\n")
            for c in self.children:
                c.write(out, depth + 1)
            out.append(f"{pad}</{self.tag}>\n")


def _item(parent: _El, fields: dict[str, Any], *, required: bool = True) -> None:
    item = parent.add("Item", None if required else {"ovf:required": "false"})
    for key in sorted(k for k, v in fields.items() if v is not None):
        item.add(f"rasd:{key}", text=fields[key])


@dataclass
class _Controller:
    bus: str
    instance: int
    units: int = 0


_CONTROLLER_SLOTS = {"ide": 2, "scsi": 15, "sata": 30, "nvme": 15}


def build(
    machine: dict[str, Any],
    *,
    version: str = "1.0",
    system_type: str = DEFAULT_SYSTEM_TYPE,
    flavor: str = "vmware",
    scsi_model: str = "lsilogic",
) -> bytes:
    """An OVF descriptor for `machine`; each disk dict also carries `file_size` (the file's
    real size: ovf:size) and optionally `populated_size` and `subformat`."""
    if version not in NS_OVF:
        raise FormatError(f"ovf: unknown OVF version {version!r} (1.0 or 2.0)")
    if flavor not in ("vmware", "virtualbox"):
        raise FormatError(f"ovf: unknown flavor {flavor!r}")
    name = str(machine.get("name") or "vm")
    disks = list(machine.get("disks") or [])
    nics = list(machine.get("nics") or [])
    env = _El(
        "Envelope",
        {
            "ovf:version": version,
            "xml:lang": "en-US",
            "xmlns": NS_OVF[version],
            "xmlns:ovf": NS_OVF[version],
            "xmlns:cim": NS_CIM,
            "xmlns:rasd": NS_RASD,
            "xmlns:vssd": NS_VSSD,
            "xmlns:vmw": NS_VMW,
            "xmlns:xsi": NS_XSI,
        },
    )
    refs = env.add("References")
    for i, d in enumerate(disks, 1):
        href = _href(d.get("path"), i)
        if d.get("file_size") is None:
            raise FormatError(f"ovf: disk {href} has no file size")
        refs.add("File", {"ovf:href": href, "ovf:id": f"file{i}", "ovf:size": int(d["file_size"])})
    section = env.add("DiskSection")
    section.add("Info", text="Virtual disk information")
    for i, d in enumerate(disks, 1):
        if d.get("size") is None:
            raise FormatError(f"ovf: disk {i} has no capacity")
        uri = FORMAT_URIS.get((d.get("format"), d.get("subformat"))) or FORMAT_URIS.get(
            (d.get("format"), None)
        )
        if uri is None:
            raise FormatError(
                f"ovf: no OVF format URI for a {d.get('format')} "
                f"{d.get('subformat') or ''} disk".replace("  ", " ")
            )
        section.add(
            "Disk",
            {
                "ovf:capacity": int(d["size"]),
                "ovf:capacityAllocationUnits": "byte",
                "ovf:diskId": f"vmdisk{i}",
                "ovf:fileRef": f"file{i}",
                "ovf:format": uri,
                "ovf:populatedSize": d.get("populated_size"),
            },
        )
    networks = _networks(nics, flavor)
    if networks:
        net = env.add("NetworkSection")
        net.add("Info", text="The logical networks")
        for n in networks:
            el = net.add("Network", {"ovf:name": n})
            el.add("Description", text=f"The {n} network")
    vs = env.add("VirtualSystem", {"ovf:id": name})
    vs.add("Info", text="A virtual machine")
    vs.add("Name", text=name)
    family = machine.get("os")
    os_section = vs.add(
        "OperatingSystemSection",
        {
            # CIM's 1 is "Other": what an unknown guest is, and reads back as unknown
            "ovf:id": OS_IDS.get(family, 1) if family else 1,
            "vmw:osType": VMW_OS_TYPES.get(family or "other"),
        },
    )
    os_section.add("Info", text="The kind of installed guest operating system")
    hw = vs.add("VirtualHardwareSection")
    hw.add("Info", text="Virtual hardware requirements")
    system = hw.add("System")
    system.add("vssd:ElementName", text="Virtual Hardware Family")
    system.add("vssd:InstanceID", text=0)
    system.add("vssd:VirtualSystemIdentifier", text=name)
    system.add("vssd:VirtualSystemType", text=system_type)
    cpus = int(machine["cpus"])
    mem_mib = -(-int(machine["memory"]) // (1 << 20))
    _item(
        hw,
        {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of Virtual CPUs",
            "ElementName": f"{cpus} virtual CPU(s)",
            "InstanceID": 1,
            "ResourceType": ResourceType.PROCESSOR,
            "VirtualQuantity": cpus,
        },
    )
    _item(
        hw,
        {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory Size",
            "ElementName": f"{mem_mib}MB of memory",
            "InstanceID": 2,
            "ResourceType": ResourceType.MEMORY,
            "VirtualQuantity": mem_mib,
        },
    )
    instance = 3
    controllers: dict[str, list[_Controller]] = {}
    disk_items = []
    for i, d in enumerate(disks, 1):
        bus = d.get("bus") or "scsi"
        if bus not in _CONTROLLER_SLOTS:
            raise FormatError(
                f"ovf: disk {i}: bus {bus!r} has no OVF controller (ide, scsi, sata, nvme)"
            )
        pool = controllers.setdefault(bus, [])
        ctl = pool[-1] if pool and pool[-1].units < _CONTROLLER_SLOTS[bus] else None
        if ctl is None:
            limit = 2 if bus == "ide" else 4
            if len(pool) >= limit:
                raise FormatError(f"ovf: too many {bus} disks ({i})")
            ctl = _Controller(bus, instance)
            pool.append(ctl)
            instance += 1
            _item(hw, _controller_fields(ctl, len(pool) - 1, flavor, scsi_model))
        unit = ctl.units
        if bus == "scsi" and unit >= 7:
            unit += 1  # unit 7 is the SCSI controller itself
        ctl.units += 1
        disk_items.append((i, ctl, unit))
    for i, ctl, unit in disk_items:
        _item(
            hw,
            {
                "AddressOnParent": unit,
                "ElementName": f"Hard disk {i}",
                "HostResource": f"ovf:/disk/vmdisk{i}",
                "InstanceID": instance,
                "Parent": ctl.instance,
                "ResourceType": ResourceType.DISK,
            },
        )
        instance += 1
    for i, n in enumerate(nics, 1):
        model = n.get("model") or ("e1000" if flavor == "virtualbox" else "vmxnet3")
        if model not in NIC_SUBTYPES:
            raise FormatError(f"ovf: NIC {i}: model {model!r} has no OVF name")
        network = n.get("network") or networks[0]
        _item(
            hw,
            {
                "Address": n.get("mac"),
                "AddressOnParent": 6 + i,
                "AutomaticAllocation": "true",
                "Connection": network,
                "Description": f"{NIC_SUBTYPES[model]} ethernet adapter on {network}",
                "ElementName": f"Network adapter {i}",
                "InstanceID": instance,
                "ResourceSubType": NIC_SUBTYPES[model],
                "ResourceType": ResourceType.ETHERNET,
            },
        )
        instance += 1
    if machine.get("firmware") == "uefi":
        hw.add("vmw:Config", {"ovf:required": "false", "vmw:key": "firmware", "vmw:value": "efi"})
        if machine.get("secure_boot"):
            hw.add(
                "vmw:Config",
                {
                    "ovf:required": "false",
                    "vmw:key": "uefi.secureBoot.enabled",
                    "vmw:value": "true",
                },
            )
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n']
    env.write(out, 0)
    return "".join(out).encode("utf-8")


def _href(path: Any, index: int) -> str:
    href = str(path or f"disk{index}.vmdk")
    check_href(href)
    return href


def check_href(href: str) -> str:
    """A file reference must name a file beside the descriptor: no directories, no
    absolute paths, no URLs (OVF allows them; we never fetch or follow them)."""
    if not href or len(href) > 255:
        raise UnsafeImage(f"ovf: file reference {href[:80]!r} is empty or too long")
    if "/" in href or "\\" in href or href in (".", "..") or "\0" in href:
        raise UnsafeImage(f"ovf: file reference {href!r} is not a plain file name")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", href):
        raise UnsafeImage(f"ovf: file reference {href!r} is a URL; only local files are read")
    if any(ord(c) < 32 for c in href):
        raise UnsafeImage(f"ovf: file reference {href!r} contains control characters")
    return href


def _networks(nics: list[dict[str, Any]], flavor: str) -> list[str]:
    default = "NAT" if flavor == "virtualbox" else "VM Network"
    names: list[str] = []
    for n in nics:
        name = n.get("network") or default
        if name not in names:
            names.append(name)
    return names


def _controller_fields(
    ctl: _Controller, number: int, flavor: str, scsi_model: str
) -> dict[str, Any]:
    if ctl.bus == "ide":
        return {
            "Address": number,
            "Description": "IDE Controller",
            "ElementName": f"IDE controller {number}",
            "InstanceID": ctl.instance,
            "ResourceSubType": "PIIX4",
            "ResourceType": ResourceType.IDE_CONTROLLER,
        }
    if ctl.bus == "scsi":
        if scsi_model not in SCSI_SUBTYPES:
            raise FormatError(f"ovf: unknown SCSI controller model {scsi_model!r}")
        return {
            "Address": number,
            "Description": "SCSI Controller",
            "ElementName": f"SCSI controller {number}",
            "InstanceID": ctl.instance,
            "ResourceSubType": SCSI_SUBTYPES[scsi_model],
            "ResourceType": ResourceType.SCSI_CONTROLLER,
        }
    if ctl.bus == "sata":
        return {
            "Address": number,
            "Description": "SATA Controller",
            "ElementName": f"SATA controller {number}",
            "InstanceID": ctl.instance,
            # VirtualBox looks for "AHCI"; vSphere writes and reads its own name
            "ResourceSubType": "AHCI" if flavor == "virtualbox" else "vmware.sata.ahci",
            "ResourceType": ResourceType.SATA_CONTROLLER,
        }
    return {
        "Address": number,
        "Description": "NVME Controller",
        "ElementName": f"NVME controller {number}",
        "InstanceID": ctl.instance,
        "ResourceSubType": "vmware.nvme.controller",
        "ResourceType": ResourceType.SATA_CONTROLLER,
    }


# -- reading ----------------------------------------------------------------------------


@dataclass
class Descriptor:
    """A parsed descriptor: the machine dict plus what the package itself declares."""

    version: str
    machine: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)  # href, id, size, compression
    system_type: str | None = None
    warnings: list[str] = field(default_factory=list)

    def file_by_href(self, href: str) -> dict[str, Any] | None:
        return next((f for f in self.files if f["href"] == href), None)


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _attr(el: ET.Element, name: str) -> str | None:
    """An attribute by local name, whichever namespace (or none) the writer used."""
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    found = _children(el, name)
    return found[0] if found else None


def _text(el: ET.Element, name: str) -> str | None:
    c = _child(el, name)
    if c is None or c.text is None:
        return None
    return c.text.strip()


def parse_xml(data: bytes, where: str = "ovf") -> ET.Element:
    """Parse untrusted XML: DTDs and entities refused, size capped, errors one line."""
    if len(data) > MAX_DESCRIPTOR:
        raise UnsafeImage(f"{where}: descriptor of {len(data)} bytes is too large")
    try:
        return DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise UnsafeImage(f"{where}: descriptor refused: {exc}") from exc
    except ET.ParseError as exc:
        raise CorruptImage(f"{where}: malformed XML: {exc}") from exc
    except (ValueError, LookupError) as exc:
        # expat refuses multi-byte and unknown encodings with ValueError/LookupError.
        raise CorruptImage(f"{where}: unreadable XML: {exc}") from exc


_UNITS = {
    "byte": 1, "bytes": 1, "b": 1,
    "kilobytes": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "megabytes": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "gigabytes": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "terabytes": 1 << 40, "tb": 1 << 40,
}  # fmt: skip
_PROGRAMMATIC = re.compile(r"^byte\s*\*\s*(2|10)\s*\^\s*(\d{1,2})$")


def parse_units(text: str | None, where: str) -> int:
    """DSP0004 programmatic units ('byte * 2^20') or the names importers write ('MegaBytes')."""
    if text is None:
        return 1
    t = " ".join(text.strip().lower().split())
    if t in _UNITS:
        return _UNITS[t]
    m = _PROGRAMMATIC.match(t)
    if m:
        return int(m.group(1)) ** int(m.group(2))
    raise UnsupportedFeature(f"ovf: {where}: unknown allocation units {text!r}")


def _int(text: str | None, what: str, *, low: int = 0, high: int = 1 << 62) -> int:
    if text is None or not text.strip():
        raise CorruptImage(f"ovf: {what} is missing")
    t = text.strip()
    if t.startswith("${"):
        raise UnsupportedFeature(f"ovf: {what} is the property reference {t}; not supported")
    if not t.isdigit() or len(t) > 20:
        raise CorruptImage(f"ovf: {what} {t[:40]!r} is not a whole number")
    value = int(t)
    if not low <= value <= high:
        raise CorruptImage(f"ovf: {what} {value} is out of range ({low}..{high})")
    return value


def _format_of(uri: str | None) -> tuple[str | None, str | None]:
    if not uri:
        return None, None
    u = uri.lower()
    if "vmdk" in u:
        for sub in ("streamoptimized", "sparse", "compressed"):
            if u.endswith("#" + sub):
                return "vmdk", {
                    "streamoptimized": "streamOptimized",
                    "sparse": "monolithicSparse",
                }.get(sub, sub)
        return "vmdk", None
    if "linkid=137171" in u:
        return "vpc", None
    if "qcow" in u:
        return "qcow2", None
    if u.endswith("/wiki/byte"):
        return "raw", None
    return None, None


def _os_family(os_id: int | None, os_type: str | None) -> str | None:
    t = (os_type or "").lower()
    if t.startswith("win"):
        return "windows"
    if any(
        k in t
        for k in ("linux", "ubuntu", "debian", "rhel", "centos", "sles", "suse", "fedora", "oracle")
    ):
        return "linux"
    if os_id in _WINDOWS_IDS:
        return "windows"
    if os_id in _LINUX_IDS:
        return "linux"
    if os_id is not None and os_id > 1:
        return "other"
    return None


def parse(data: bytes, *, where: str = "ovf") -> Descriptor:
    """A descriptor's machine dict; what it cannot carry over is listed in warnings."""
    root = parse_xml(data, where)
    if _local(root.tag) != "Envelope":
        raise CorruptImage(f"{where}: root element is <{_local(root.tag)}>, not <Envelope>")
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    version = next((v for v, uri in NS_OVF.items() if uri == ns), None)
    if version is None:
        raise UnsupportedFeature(f"{where}: unknown OVF namespace {ns!r}")
    warnings: list[str] = []
    files = _parse_references(root, where)
    by_id = {f["id"]: f for f in files}
    disk_defs = _parse_disk_section(root, by_id, where)
    systems = _children(root, "VirtualSystem")
    if _child(root, "VirtualSystemCollection") is not None:
        raise UnsupportedFeature(
            f"{where}: VirtualSystemCollection (multi-VM appliances) is not supported"
        )
    if len(systems) != 1:
        raise CorruptImage(f"{where}: {len(systems)} VirtualSystem elements (expected 1)")
    vs = systems[0]
    for section in root:
        tag = _local(section.tag)
        if tag not in ("References", "DiskSection", "NetworkSection", "VirtualSystem"):
            warnings.append(f"{tag} is not carried over")
    name = _text(vs, "Name") or _attr(vs, "id") or "vm"
    os_el = _child(vs, "OperatingSystemSection")
    os_id = None
    os_type = None
    if os_el is not None:
        raw_id = _attr(os_el, "id")
        os_id = int(raw_id) if raw_id and raw_id.isdigit() and len(raw_id) < 6 else None
        os_type = _attr(os_el, "osType")
    machine: dict[str, Any] = {
        "name": name,
        "cpus": None,
        "memory": None,
        "firmware": "bios",
        "secure_boot": False,
        "os": _os_family(os_id, os_type),
        "disks": [],
        "nics": [],
    }
    hws = _children(vs, "VirtualHardwareSection")
    if not hws:
        raise CorruptImage(f"{where}: VirtualSystem has no VirtualHardwareSection")
    if len(hws) > 1:
        warnings.append(f"{len(hws) - 1} further VirtualHardwareSection(s) ignored")
    system_type = _parse_hardware(hws[0], machine, disk_defs, warnings, where)
    for section in vs:
        tag = _local(section.tag)
        if tag in ("Info", "Name", "OperatingSystemSection", "VirtualHardwareSection"):
            continue
        if tag == "Machine" and section.tag.startswith("{" + NS_VBOX):
            _parse_vbox_machine(section, machine, warnings)
            continue
        warnings.append(f"{tag} is not carried over")
    used = {d.get("disk_id") for d in machine["disks"]}
    for disk_id in disk_defs:
        if disk_id not in used:
            warnings.append(f"disk {disk_id} is declared but attached to no controller")
    if machine["cpus"] is None:
        warnings.append("no CPU item: 1 CPU assumed")
        machine["cpus"] = 1
    if machine["memory"] is None:
        raise CorruptImage(f"{where}: no memory item in the VirtualHardwareSection")
    machine["warnings"] = list(warnings)
    return Descriptor(version, machine, files, system_type, warnings)


def _parse_references(root: ET.Element, where: str) -> list[dict[str, Any]]:
    refs = _child(root, "References")
    files: list[dict[str, Any]] = []
    if refs is None:
        return files
    for f in _children(refs, "File"):
        fid, href = _attr(f, "id"), _attr(f, "href")
        if not fid or not href:
            raise CorruptImage(f"{where}: a File reference lacks ovf:id or ovf:href")
        check_href(href)
        # DSP0243 5.3: gzip is the one compression the spec names ("identity" is none)
        compression = _attr(f, "compression") or None
        if compression == "identity":
            compression = None
        if compression not in (None, "gzip"):
            raise UnsupportedFeature(
                f"{where}: file {href} is compressed with {compression!r} (gzip is read)"
            )
        if _attr(f, "chunkSize"):
            raise UnsupportedFeature(f"{where}: file {href} is split into chunks")
        size = _attr(f, "size")
        entry = {
            "id": fid,
            "href": href,
            "size": _int(size, f"size of {href}") if size else None,
            "compression": compression,
        }
        if any(x["id"] == fid or x["href"] == href for x in files):
            raise CorruptImage(f"{where}: file {href} ({fid}) is declared twice")
        files.append(entry)
        if len(files) > MAX_DISKS * 2:
            raise UnsafeImage(f"{where}: too many file references")
    return files


def _parse_disk_section(
    root: ET.Element, by_id: dict[str, dict[str, Any]], where: str
) -> dict[str, dict[str, Any]]:
    section = _child(root, "DiskSection")
    disks: dict[str, dict[str, Any]] = {}
    if section is None:
        return disks
    for d in _children(section, "Disk"):
        disk_id = _attr(d, "diskId")
        if not disk_id:
            raise CorruptImage(f"{where}: a Disk lacks ovf:diskId")
        units = parse_units(_attr(d, "capacityAllocationUnits"), f"disk {disk_id}")
        capacity = _int(_attr(d, "capacity"), f"capacity of disk {disk_id}") * units
        if capacity > MAX_CAPACITY:
            raise CorruptImage(f"{where}: disk {disk_id} capacity {capacity} is absurd")
        file_ref = _attr(d, "fileRef")
        if file_ref is not None and file_ref not in by_id:
            raise CorruptImage(f"{where}: disk {disk_id} refers to unknown file {file_ref!r}")
        fmt, sub = _format_of(_attr(d, "format"))
        populated = _attr(d, "populatedSize")
        disks[disk_id] = {
            "path": by_id[file_ref]["href"] if file_ref else None,
            "format": fmt,
            "subformat": sub,
            "size": capacity,
            "populated_size": _int(populated, f"populated size of {disk_id}")
            if populated
            else None,
            "disk_id": disk_id,
        }
        if len(disks) > MAX_DISKS:
            raise UnsafeImage(f"{where}: more than {MAX_DISKS} disks")
    return disks


def _rasd(item: ET.Element) -> dict[str, str]:
    return {_local(c.tag): (c.text or "").strip() for c in item}


def _parse_hardware(
    hw: ET.Element,
    machine: dict[str, Any],
    disk_defs: dict[str, dict[str, Any]],
    warnings: list[str],
    where: str,
) -> str | None:
    system_type = None
    system = _child(hw, "System")
    if system is not None:
        system_type = _text(system, "VirtualSystemType")
    items = [el for el in hw if _local(el.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    if len(items) > MAX_ITEMS:
        raise UnsafeImage(f"{where}: {len(items)} hardware items is too many")
    controllers: dict[str, tuple[str, str]] = {}
    disk_items: list[dict[str, str]] = []
    dropped: dict[str, int] = {}
    for el in items:
        r = _rasd(el)
        try:
            rtype = int(r.get("ResourceType", ""))
        except ValueError:
            raise CorruptImage(f"{where}: hardware item without a numeric ResourceType") from None
        sub = r.get("ResourceSubType", "")
        if rtype == ResourceType.PROCESSOR:
            machine["cpus"] = _int(r.get("VirtualQuantity"), "CPU count", low=1, high=MAX_CPUS)
        elif rtype == ResourceType.MEMORY:
            units = parse_units(r.get("AllocationUnits") or "byte * 2^20", "memory")
            machine["memory"] = _int(r.get("VirtualQuantity"), "memory", high=MAX_MEMORY) * units
            if machine["memory"] > MAX_MEMORY:
                raise CorruptImage(f"{where}: memory of {machine['memory']} bytes is absurd")
        elif rtype in (
            ResourceType.IDE_CONTROLLER,
            ResourceType.SCSI_CONTROLLER,
            ResourceType.SATA_CONTROLLER,
        ):
            kind = {5: "ide", 6: "scsi"}.get(rtype) or ("nvme" if "nvme" in sub.lower() else "sata")
            controllers[r.get("InstanceID", "")] = (kind, sub)
        elif rtype == ResourceType.DISK:
            disk_items.append(r)
        elif rtype == ResourceType.ETHERNET:
            model = _NIC_MODELS.get(sub.lower()) if sub else None
            if sub and model is None:
                warnings.append(f"NIC model {sub!r} is not known; the target's default is used")
            mac = r.get("Address") or None
            machine["nics"].append(
                {"mac": mac, "model": model, "network": r.get("Connection") or None}
            )
            if len(machine["nics"]) > MAX_NICS:
                raise UnsafeImage(f"{where}: more than {MAX_NICS} NICs")
        elif rtype in _DROPPED_KINDS:
            dropped[_DROPPED_KINDS[rtype]] = dropped.get(_DROPPED_KINDS[rtype], 0) + 1
        else:
            dropped[f"resource type {rtype}"] = dropped.get(f"resource type {rtype}", 0) + 1
    for kind, count in dropped.items():
        warnings.append(f"{count} {kind}{'s' if count > 1 else ''} not carried over")
    for r in disk_items:
        host = r.get("HostResource", "")
        m = re.match(r"^(?:ovf:)?/(disk|file)/(.+)$", host)
        if not m:
            warnings.append(f"disk item with host resource {host!r} not carried over")
            continue
        if m.group(1) == "disk":
            if m.group(2) not in disk_defs:
                raise CorruptImage(f"{where}: disk item refers to unknown disk {m.group(2)!r}")
            disk = dict(disk_defs[m.group(2)])
        else:
            raise UnsupportedFeature(
                f"{where}: disk items that name a file directly are not supported"
            )
        found = controllers.get(r.get("Parent", ""))
        bus: str | None = found[0] if found else None
        sub = found[1] if found else ""
        if bus is None:
            warnings.append(f"disk {disk['disk_id']} has no known controller")
        disk["bus"] = bus
        if bus == "scsi" and sub:
            disk["controller"] = sub
        machine["disks"].append(disk)
    for cfg in _children(hw, "Config"):
        key, value = _attr(cfg, "key"), (_attr(cfg, "value") or "").lower()
        if key == "firmware":
            machine["firmware"] = "uefi" if value == "efi" else "bios"
        elif key == "uefi.secureBoot.enabled":
            machine["secure_boot"] = value == "true"
        else:
            warnings.append(f"VMware setting {key} is not carried over")
    if machine["secure_boot"] and machine["firmware"] != "uefi":
        warnings.append("Secure Boot without EFI firmware ignored")
        machine["secure_boot"] = False
    return system_type


def _parse_vbox_machine(section: ET.Element, machine: dict[str, Any], warnings: list[str]) -> None:
    """VirtualBox writes its firmware only in its own vbox:Machine section."""
    for el in section.iter():
        if _local(el.tag) == "Firmware" and (_attr(el, "type") or "").upper().startswith("EFI"):
            machine["firmware"] = "uefi"
    warnings.append("VirtualBox machine settings other than firmware are not carried over")

"""VMware: a .vmx for Workstation/Fusion/ESXi (`vmware` platform) and an OVF package for
vSphere import (`vsphere`), and the .vmx reader.

A .vmx is `key = "value"` lines; keys are case-insensitive and `|XX` escapes a byte in
hexadecimal. Disks sit on pvscsi (Linux: vmw_pvscsi is in mainline) or LSI Logic SAS
(Windows' inbox driver) controllers; NICs are vmxnet3, or e1000e for Windows, which needs
VMware Tools for vmxnet3. Monolithic sparse VMDKs suit Workstation; ESXi runs only flat
(vmfs) extents and imports streamOptimized ones through OVF (INTEROP.md), which is what
the `vsphere` platform writes. A MAC outside VMware's static range (00:50:56:00:00:00 -
00:50:56:3f:ff:ff) is kept, with checkMACAddress off, because ESXi otherwise refuses
to power the VM on; network identity surviving the move matters more.
"""

from __future__ import annotations

import os
import re

from . import checklist, sourcepath
from .errors import DriverError
from .machine import DiskSpec, MachineSpec, NicSpec
from .platform import DiskTarget, Platform, disk_location

MAX_VMX = 1 << 20
DEFAULT_HW_VERSION = 11  # vmx-11: ESXi 6.0 / Workstation 11 and newer run it

GUEST_OS = {"linux": "otherlinux-64", "windows": "windows9srv-64", "other": "other-64"}
SCSI_MODELS = {"linux": "pvscsi", "windows": "lsisas1068", "other": "lsilogic"}
_VMX_NIC = {"vmxnet3": "vmxnet3", "e1000": "e1000", "e1000e": "e1000e", "pcnet": "vlance"}
_NIC_FROM_VMX = {"vmxnet3": "vmxnet3", "e1000": "e1000", "e1000e": "e1000e", "vlance": "pcnet"}
_BUS_ORDER = ("scsi", "sata", "nvme", "ide")
_SLOTS = {"scsi": (4, 15), "sata": (4, 30), "nvme": (4, 15), "ide": (2, 2)}
_DISK_KEY = re.compile(r"^(scsi|sata|ide|nvme)(\d{1,2}):(\d{1,2})\.filename$")
_NIC_KEY = re.compile(r"^ethernet(\d{1,2})\.present$")
_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*(?:"(.*)"|(\S*))\s*$')
#: keys every .vmx carries that VMware regenerates: read without a warning
_BOILERPLATE = (
    ".encoding", "config.version", "virtualhw.version", "pcibridge", "vmci0", "hpet0",
    "nvram", "virtualhw.productcompatibility", "extendedconfigfile", "uuid.", "vc.uuid",
    "checkpoint.", "migrate.", "cleanshutdown", "softpoweroff", "tools.", "toolscripts.",
    "svga.", "monitor.", "vmotion.", "numa.", "sched.", "guestinfo.", "annotation",
    "cpuid.coresPerSocket".lower(), "powertype.", "bios.", "mks.", "ehci", "usb", "floppy0",
    "sound.", "serial0", "replay.", "vmxstats.", "msg.", "gui.", "ich7m.", "sata0.pcislotnumber",
)  # fmt: skip


def _encode(value: str) -> str:
    return re.sub(r'[|"\x00-\x1f\x7f]', lambda m: f"|{ord(m.group()):02X}", value)


def _decode(value: str) -> str:
    return re.sub(r"\|([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _is_vmware_static(mac: str) -> bool:
    return mac.startswith("00:50:56:") and int(mac[9:11], 16) <= 0x3F


class Vmware(Platform):
    name = "vmware"
    title = "VMware Workstation / ESXi (.vmx)"
    disk = DiskTarget("vmdk", (("subformat", "monolithicSparse"),))
    formats = ("vmdk",)
    buses = ("scsi", "sata", "nvme", "ide")
    nic_models = ("vmxnet3", "e1000e", "e1000", "pcnet")
    memory_step_mib = 4  # memSize must be a multiple of 4 MB
    default_network = "VM Network"

    disk_drivers = {"scsi": ("vmw_pvscsi",)}
    # ESXi places ethernet0-3 behind the pcieRootPort bridges the .vmx declares: the
    # names its Linux guests get are well known; beyond the fourth they depend on ESXi
    _NAMES = ("ens192", "ens224", "ens256", "ens161")

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(self._NAMES[i] if i < len(self._NAMES) else "" for i in range(len(spec.nics)))

    def preferred_nic(self, spec: MachineSpec) -> str:
        return "e1000e" if spec.os == "windows" else "vmxnet3"

    def disk_options(self, target: DiskTarget, disk: DiskSpec) -> dict[str, str]:
        options = dict(target.options)
        if target.format == "vmdk":
            # ddb.adapterType: VMware writes lsilogic for every SCSI flavour (pvscsi too)
            options["adapter_type"] = "ide" if disk.bus == "ide" else "lsilogic"
        return options

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.vmx")

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        return vmx_text(spec, outdir).encode("utf-8")

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        needs_tools = any(n.model == "vmxnet3" for n in target.nics) or any(
            d.bus == "scsi" for d in target.disks
        )
        if needs_tools and target.os in (None, "windows"):
            out.append(
                "Windows guests: pvscsi and vmxnet3 need VMware Tools; install it first "
                "or use LSI Logic SAS / e1000e until it is installed"
            )
        out.append("install open-vm-tools (Linux) or VMware Tools (Windows) after the first boot")
        out.append(
            "ESXi does not run monolithicSparse disks: import them with vmkfstools -i DISK.vmdk "
            "-d thin, or convert with --to vsphere (OVF + streamOptimized) instead"
        )
        foreign = [n.mac for n in target.nics if n.mac and not _is_vmware_static(n.mac)]
        if foreign:
            out.append(
                "MAC addresses outside VMware's static range are kept with checkMACAddress=FALSE "
                f"({', '.join(foreign)})"
            )
        out.append(
            "remove the previous platform's guest agents (qemu-guest-agent, Hyper-V services) if present"
        )
        return out


def _hw_version(spec: MachineSpec) -> int:
    version = DEFAULT_HW_VERSION
    if any(d.bus == "nvme" for d in spec.disks):
        version = max(version, 13)
    if spec.secure_boot:
        version = max(version, 14)  # virtual Secure Boot arrived with hardware version 14
    return version


def _relative(path: str | None, outdir: str) -> str:
    full = disk_location(path, outdir)
    rel = os.path.relpath(full, os.path.abspath(outdir))
    return full if rel.startswith("..") else rel


def vmx_text(spec: MachineSpec, outdir: str) -> str:
    family = spec.os or "other"
    lines: list[tuple[str, str]] = [
        (".encoding", "UTF-8"),
        ("config.version", "8"),
        ("virtualHW.version", str(_hw_version(spec))),
        ("displayName", spec.name),
        ("guestOS", GUEST_OS[family]),
        ("numvcpus", str(spec.cpus)),
        ("memSize", str(-(-spec.memory_mib // 4) * 4)),
        ("pciBridge0.present", "TRUE"),
    ]
    for i in range(4, 8):
        lines += [
            (f"pciBridge{i}.present", "TRUE"),
            (f"pciBridge{i}.virtualDev", "pcieRootPort"),
            (f"pciBridge{i}.functions", "8"),
        ]
    if spec.firmware == "uefi":
        lines.append(("firmware", "efi"))
        if spec.secure_boot:
            lines.append(("uefi.secureBoot.enabled", "TRUE"))
    used: dict[str, list[int]] = {}
    for d in spec.disks:
        bus = d.bus or "scsi"
        if bus not in _SLOTS:
            raise DriverError(f"vmware: no {bus} disk bus (scsi, sata, nvme, ide)")
        controllers, per = _SLOTS[bus]
        slots = used.setdefault(bus, [])
        n = len(slots)
        ctl, unit = divmod(n, per)
        if bus == "scsi" and unit >= 7:
            unit += 1  # unit 7 is the controller itself
        if ctl >= controllers:
            raise DriverError(f"vmware: too many {bus} disks ({n + 1})")
        if n % per == 0:
            lines.append((f"{bus}{ctl}.present", "TRUE"))
            if bus == "scsi":
                lines.append((f"scsi{ctl}.virtualDev", SCSI_MODELS[family]))
        slots.append(n)
        lines += [
            (f"{bus}{ctl}:{unit}.present", "TRUE"),
            (f"{bus}{ctl}:{unit}.fileName", _relative(d.path, outdir)),
        ]
        if bus == "scsi":
            lines.append((f"{bus}{ctl}:{unit}.deviceType", "scsi-hardDisk"))
    for i, nic in enumerate(spec.nics):
        lines += [
            (f"ethernet{i}.present", "TRUE"),
            (f"ethernet{i}.virtualDev", _VMX_NIC.get(nic.model or "vmxnet3", "vmxnet3")),
            (f"ethernet{i}.networkName", nic.network or Vmware.default_network),
            (f"ethernet{i}.connectionType", "bridged"),
        ]
        if nic.mac:
            lines += [(f"ethernet{i}.addressType", "static"), (f"ethernet{i}.address", nic.mac)]
            if not _is_vmware_static(nic.mac):
                lines.append((f"ethernet{i}.checkMACAddress", "FALSE"))
        else:
            lines.append((f"ethernet{i}.addressType", "generated"))
    lines.append(("tools.syncTime", "FALSE"))
    return "".join(f'{k} = "{_encode(v)}"\n' for k, v in lines)


# -- reading ----------------------------------------------------------------------------


def parse_vmx_text(text: str, where: str) -> dict[str, str]:
    """Keys (lowercased) -> decoded values; a line that is not `key = value` is an error."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise DriverError(f"{where}: line {number} is not 'key = \"value\"': {line[:60]!r}")
        value = m.group(2) if m.group(2) is not None else m.group(3)
        out[m.group(1).lower()] = _decode(value)
    return out


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _family(guest: str) -> str | None:
    g = guest.lower()
    if not g:
        return None
    if g.startswith("win"):
        return "windows"
    if any(
        k in g
        for k in (
            "linux",
            "ubuntu",
            "debian",
            "rhel",
            "centos",
            "sles",
            "suse",
            "fedora",
            "oracle",
            "photon",
            "coreos",
            "mandr",
            "asianux",
        )
    ):
        return "linux"
    return "other"


def read_vmx(path: str) -> MachineSpec:
    """A .vmx as a MachineSpec: disks resolved inside the .vmx's directory, CD drives,
    floppies and other settings listed as warnings."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_VMX + 1)
    except OSError as exc:
        raise DriverError(f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_VMX:
        raise DriverError(f"{path}: too large for a .vmx")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return parse_vmx(parse_vmx_text(text, path), os.path.dirname(os.path.abspath(path)), where=path)


def parse_vmx(keys: dict[str, str], base_dir: str, *, where: str = "vmx") -> MachineSpec:
    consumed: set[str] = set()

    def get(key: str) -> str | None:
        consumed.add(key)
        return keys.get(key)

    warnings: list[str] = []
    name = get("displayname") or os.path.splitext(os.path.basename(where))[0]
    cpus = (get("numvcpus") or "1").strip()
    mem = (get("memsize") or "").strip()
    if not mem:
        raise DriverError(f"{where}: no memSize")
    if not cpus.isdigit() or not mem.isdigit() or len(mem) > 12 or len(cpus) > 6:
        raise DriverError(f"{where}: numvcpus {cpus!r} or memSize {mem!r} is not a whole number")
    firmware = "uefi" if (get("firmware") or "bios").lower() == "efi" else "bios"
    secure = _true(get("uefi.secureboot.enabled"))
    family = _family(get("guestos") or "")
    disks: list[tuple[tuple[int, int, int], DiskSpec]] = []
    dropped: list[str] = []
    for key in sorted(keys):
        m = _DISK_KEY.match(key)
        if not m:
            continue
        bus, ctl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        slot = f"{bus}{ctl}:{unit}"
        consumed.update(
            {key, f"{slot}.present", f"{slot}.devicetype", f"{slot}.mode", f"{slot}.redo"}
        )
        consumed.update(
            {f"{bus}{ctl}.present", f"{bus}{ctl}.virtualdev", f"{bus}{ctl}.pcislotnumber"}
        )
        if not _true(keys.get(f"{slot}.present")) or not _true(
            keys.get(f"{bus}{ctl}.present", "TRUE")
        ):
            continue
        dtype = (keys.get(f"{slot}.devicetype") or "").lower()
        fname = keys[key]
        if "cdrom" in dtype or fname.lower().endswith(".iso") or dtype in ("atapi-cdrom",):
            dropped.append(f"CD drive {slot}")
            continue
        if dtype and "disk" not in dtype and "hardDisk".lower() not in dtype:
            dropped.append(f"{dtype} {slot}")
            continue
        full = sourcepath.resolve(fname, base_dir, where=where)
        fmt = "vmdk" if fname.lower().endswith(".vmdk") else None
        disks.append(((_BUS_ORDER.index(bus), ctl, unit), DiskSpec(full, fmt, bus)))
    nics: list[tuple[int, NicSpec]] = []
    for key in sorted(keys):
        m = _NIC_KEY.match(key)
        if not m:
            continue
        i = m.group(1)
        p = f"ethernet{i}."
        consumed.update(k for k in keys if k.startswith(p))
        if not _true(keys[key]):
            continue
        addr_type = (keys.get(p + "addresstype") or "generated").lower()
        mac = keys.get(p + "address") if addr_type == "static" else keys.get(p + "generatedaddress")
        dev = (keys.get(p + "virtualdev") or "").lower()
        model = _NIC_FROM_VMX.get(dev)
        if dev and model is None:
            warnings.append(f"ethernet{i}: model {dev} is not known; the target's default is used")
        nics.append((int(i), NicSpec(mac or None, model, keys.get(p + "networkname") or None)))
    if dropped:
        warnings.append("devices not carried over: " + ", ".join(dropped))
    others = sorted(
        {
            k.split(".")[0].split(":")[0]
            for k in keys
            if k not in consumed and not any(k.startswith(b) for b in _BOILERPLATE)
        }
    )
    if others:
        warnings.append("settings not carried over: " + ", ".join(others))
    spec = MachineSpec(
        name=name,
        cpus=int(cpus),
        memory=int(mem) << 20,
        firmware=firmware,
        secure_boot=secure and firmware == "uefi",
        disks=[d for _, d in sorted(disks, key=lambda x: x[0])],
        nics=[n for _, n in sorted(nics, key=lambda x: x[0])],
        os=family,
    )
    spec.warnings = warnings
    return spec


class Vsphere(Vmware):
    """vSphere/ESXi import: an OVF package (descriptor, manifest, streamOptimized VMDKs)
    for the vSphere client's "Deploy OVF Template" or ovftool."""

    name = "vsphere"
    title = "vSphere / ESXi (OVF package)"
    disk = DiskTarget("vmdk", (("subformat", "streamOptimized"),))

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.ovf")

    def write(self, spec: MachineSpec, outdir: str) -> str:
        from formats.ovf import write_package

        self.check(spec)
        machine = spec.to_dict()
        for d, src in zip(machine["disks"], spec.disks):
            if not src.path or os.path.dirname(disk_location(src.path, outdir)) != os.path.abspath(
                outdir
            ):
                raise DriverError(
                    f"vsphere: disk {src.path} must be inside {outdir} for an OVF package"
                )
            d["path"] = os.path.basename(src.path)
            d["subformat"] = "streamOptimized"
            if d.get("size") is None:
                raise DriverError(f"vsphere: disk {src.path} has no known size")
        scsi = SCSI_MODELS[spec.os or "other"]
        return write_package(outdir, self.stem(spec), machine, scsi_model=scsi)

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = [line for line in super().checklist(source, target) if "vmkfstools" not in line]
        out.append(
            f"deploy with the vSphere client (Deploy OVF Template) or: ovftool {self.stem(target)}.ovf "
            "vi://HOST/DATACENTER/host/CLUSTER"
        )
        return out


PLATFORM = Vmware()
VSPHERE = Vsphere()

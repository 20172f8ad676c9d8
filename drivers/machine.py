"""`MachineSpec`: what a VM needs to boot like the machine it came from.

One description for every target: a physical server's inventory, a .vmx, an OVF or a
libvirt domain all become a MachineSpec, and each platform writes its own definition from
it. The dict form (`to_dict`/`from_dict`) is the shape formats.ovf reads and writes, so
formats stays independent of drivers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DriverError
from .names import BUSES, NIC_MODELS, OS_FAMILIES

FIRMWARES = ("bios", "uefi")
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")

MIN_MEMORY = 4 << 20
#: the largest memory any target here accepts (Hyper-V and ESXi stop at 24 TiB)
MAX_MEMORY = 24 << 40
MAX_CPUS = 768
MAX_DISKS = 64
MAX_NICS = 32
MAX_NAME = 128

_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-]?)[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
_FORMAT_ALIASES = {"vhd": "vpc", "img": "raw"}
_FIRMWARE_ALIASES = {"efi": "uefi", "ovmf": "uefi", "seabios": "bios"}


def normalize_mac(text: str) -> str:
    """'00-50-56-AB-CD-EF', '005056abcdef' -> '00:50:56:ab:cd:ef'; multicast and zero refused
    (a NIC with either address never gets traffic)."""
    t = str(text).strip()
    if not _MAC.match(t):
        raise DriverError(f"invalid MAC address {text!r} (expected six hex octets)")
    digits = re.sub(r"[:-]", "", t).lower()
    if int(digits[:2], 16) & 1:
        raise DriverError(f"invalid MAC address {text!r}: a multicast address")
    if digits == "000000000000":
        raise DriverError(f"invalid MAC address {text!r}: all zeros")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def file_stem(name: str) -> str:
    """A file name made from a machine name: what a filesystem and a script both accept."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return stem[:64] or "machine"


@dataclass
class DiskSpec:
    """A disk: its image file, the file's format, the bus the guest sees, virtual bytes."""

    path: str | None
    format: str | None = None
    bus: str | None = None  # None: the target platform's preferred bus
    size: int | None = None

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise DriverError(f"disk path {self.path!r} is not a file name")
        if self.path is not None and "\0" in self.path:
            raise DriverError("disk path contains a NUL byte")
        if self.format is not None:
            fmt = _FORMAT_ALIASES.get(str(self.format).lower(), str(self.format).lower())
            if fmt not in DISK_FORMATS:
                raise DriverError(
                    f"disk {self.path}: unknown format {self.format!r} "
                    f"(one of: {', '.join(DISK_FORMATS)})"
                )
            self.format = fmt
        if self.bus is not None:
            bus = str(self.bus).lower()
            if bus not in BUSES:
                raise DriverError(
                    f"disk {self.path}: unknown bus {self.bus!r} (one of: {', '.join(BUSES)})"
                )
            self.bus = bus
        if self.size is not None and (
            not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0
        ):
            raise DriverError(f"disk {self.path}: invalid size {self.size!r}")


@dataclass
class NicSpec:
    """A network adapter: the MAC travels (network identity survives the move)."""

    mac: str | None = None
    model: str | None = None  # None: the target platform's preferred model
    network: str | None = None

    def __post_init__(self) -> None:
        if self.mac is not None:
            self.mac = normalize_mac(self.mac)
        if self.model is not None:
            model = str(self.model).lower()
            if model not in NIC_MODELS:
                raise DriverError(
                    f"NIC {self.mac}: unknown model {self.model!r} "
                    f"(one of: {', '.join(NIC_MODELS)})"
                )
            self.model = model
        if self.network is not None:
            _check_text(self.network, "network name")


@dataclass
class MachineSpec:
    """A machine: validated on construction, so every writer can trust it."""

    name: str
    cpus: int
    memory: int  # bytes
    firmware: str = "bios"
    secure_boot: bool = False
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)
    os: str | None = None  # family: linux, windows, other
    #: what a reader found and could not carry over; never part of equality
    warnings: list[str] = field(default_factory=list, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DriverError("machine name is empty")
        self.name = self.name.strip()
        _check_text(self.name, "machine name")
        if len(self.name) > MAX_NAME:
            raise DriverError(f"machine name is {len(self.name)} characters (at most {MAX_NAME})")
        self.cpus = _integer(self.cpus, "CPU count")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise DriverError(f"{self.name}: {self.cpus} CPUs is absurd (1..{MAX_CPUS})")
        self.memory = _integer(self.memory, "memory")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise DriverError(
                f"{self.name}: memory of {self.memory} bytes is absurd "
                f"({MIN_MEMORY >> 20} MiB..{MAX_MEMORY >> 40} TiB)"
            )
        fw = str(self.firmware).lower()
        fw = _FIRMWARE_ALIASES.get(fw, fw)
        if fw not in FIRMWARES:
            raise DriverError(f"{self.name}: unknown firmware {self.firmware!r} (bios or uefi)")
        self.firmware = fw
        if not isinstance(self.secure_boot, bool):
            raise DriverError(f"{self.name}: secure_boot must be true or false")
        if self.secure_boot and fw != "uefi":
            raise DriverError(f"{self.name}: Secure Boot needs UEFI firmware")
        if self.os is not None:
            family = str(self.os).lower()
            if family not in OS_FAMILIES:
                raise DriverError(f"{self.name}: unknown OS family {self.os!r}")
            self.os = family
        self.disks = [d if isinstance(d, DiskSpec) else _disk(d) for d in self.disks]
        self.nics = [n if isinstance(n, NicSpec) else _nic(n) for n in self.nics]
        if len(self.disks) > MAX_DISKS:
            raise DriverError(f"{self.name}: {len(self.disks)} disks (at most {MAX_DISKS})")
        if len(self.nics) > MAX_NICS:
            raise DriverError(f"{self.name}: {len(self.nics)} NICs (at most {MAX_NICS})")
        macs = [n.mac for n in self.nics if n.mac]
        dup = {m for m in macs if macs.count(m) > 1}
        if dup:
            raise DriverError(f"{self.name}: MAC address {sorted(dup)[0]} is used twice")

    @property
    def memory_mib(self) -> int:
        """Memory in whole MiB, rounded up: every target counts in MiB or coarser."""
        return -(-self.memory // (1 << 20))

    def replace(self, **changes: Any) -> MachineSpec:
        """A validated copy with some fields changed; the warnings are kept."""
        new = dataclasses.replace(self, **changes)
        new.warnings = list(self.warnings)
        return new

    def to_dict(self) -> dict[str, Any]:
        """The plain dict formats.ovf builds descriptors from."""
        return {
            "name": self.name,
            "cpus": self.cpus,
            "memory": self.memory,
            "firmware": self.firmware,
            "secure_boot": self.secure_boot,
            "os": self.os,
            "disks": [dataclasses.asdict(d) for d in self.disks],
            "nics": [dataclasses.asdict(n) for n in self.nics],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineSpec:
        """A MachineSpec from a dict (formats.ovf's parse, machine.json, inventory).

        Keys this class does not hold are kept as warnings, never dropped silently."""
        if not isinstance(data, dict):
            raise DriverError("machine description is not a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        warnings = [str(w) for w in data.get("warnings") or []]
        for key in sorted(set(data) - known):
            if data[key] not in (None, [], {}, ""):
                warnings.append(f"field {key!r} is not carried over")
        for key in ("name", "cpus", "memory"):
            if data.get(key) is None:
                raise DriverError(f"machine description has no {key}")
        spec = cls(
            name=data["name"],
            cpus=data["cpus"],
            memory=data["memory"],
            firmware=data.get("firmware") or "bios",
            secure_boot=bool(data.get("secure_boot") or False),
            disks=[_disk(d, warnings) for d in data.get("disks") or []],
            nics=[_nic(n, warnings) for n in data.get("nics") or []],
            os=data.get("os"),
        )
        spec.warnings = warnings
        return spec


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise DriverError(f"{what} {value!r} is not text")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise DriverError(f"{what} {value!r} contains control characters")


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise DriverError(f"{what} {value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise DriverError(f"{what} {value!r} is not a whole number")


def _pick(data: Any, keys: tuple[str, ...], what: str, warnings: list[str] | None) -> dict:
    if not isinstance(data, dict):
        raise DriverError(f"{what} description {data!r} is not a mapping")
    extra = sorted(k for k in set(data) - set(keys) if data[k] not in (None, [], {}, ""))
    if extra and warnings is not None:
        warnings.append(f"{what} {data.get(keys[0])}: {', '.join(extra)} not carried over")
    return {k: data.get(k) for k in keys}


def _disk(data: Any, warnings: list[str] | None = None) -> DiskSpec:
    if isinstance(data, DiskSpec):
        return data
    return DiskSpec(**_pick(data, ("path", "format", "bus", "size"), "disk", warnings))


def _nic(data: Any, warnings: list[str] | None = None) -> NicSpec:
    if isinstance(data, NicSpec):
        return data
    return NicSpec(**_pick(data, ("mac", "model", "network"), "NIC", warnings))

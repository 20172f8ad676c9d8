"""V2V: move a virtual machine (or a bare disk) from one hypervisor to another.

SOURCE is a .vmx, an .ovf or .ova, a libvirt domain XML, an xl.cfg, a Hyper-V script as
p2v writes them, or a bare disk image. Every disk is converted to the target platform's
preferred format with the conversion engine, the target's VM definition is written
beside the disks, and the result says what changed (buses, NIC models, firmware) and
what the guest needs to boot on the new platform. The guest itself is not modified: the
checklist says what virt-v2v would have edited.

An .ova or .ovf is verified (manifest digests) and unpacked into a staging directory
inside OUTDIR first; the staging copy is removed whatever happens. A failure removes every
disk this run converted, so OUTDIR never holds half a VM.

`--to lxc` makes a container instead (run_v2lxc): the source's guest becomes a rootfs
tarball and an LXC configuration (drivers.guest.lxc), its disks read where they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import drivers
import formats
from drivers import readers
from drivers.errors import DriverError
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from formats.convert import Progress, convert, convert_image
from formats.output import atomic_create

if TYPE_CHECKING:
    from drivers.guest.lxc import ContainerResult

log = logging.getLogger(__name__)

#: `--to lxc`: not a hypervisor platform (no disks, no VM definition) but a container
LXC = "lxc"

DEFAULT_MEMORY = 1 << 30

# partition types that say which OS a bare disk holds (GPT type GUIDs, MBR type bytes)
ESP_TYPES = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef"}
LINUX_TYPES = {
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",  # Linux root (x86-64)
    "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # Linux LVM
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",  # Linux swap
    "A19D880F-05FC-4D3B-A006-743F0F84911E",  # Linux RAID
    "BC13C2FF-59E6-4262-A352-B275FD6F7172",  # extended boot loader (/boot)
    "83", "82", "8e", "fd",
}  # fmt: skip
WINDOWS_TYPES = {
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",  # Microsoft reserved
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC",  # Windows recovery
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
    "7", "27",
}  # fmt: skip


@dataclass
class V2VRequest:
    source: str
    outdir: str
    platform: str = "kvm"
    out_format: str | None = None
    source_format: str | None = None  # bare disks only; probed when None
    name: str | None = None
    cpus: int | None = None
    memory: int | None = None
    firmware: str | None = None
    os: str | None = None
    bus: str | None = None
    nic_model: str | None = None
    network: str | None = None
    force: bool = False
    workers: int | None = None
    convert_guest: bool = True  # convert the guest on the output disks for the platform


@dataclass
class ConvertedDisk:
    source: str
    source_format: str
    output: str
    format: str
    virtual_size: int
    bytes_written: int
    seconds: float


@dataclass
class V2VResult:
    source: str
    source_kind: str  # vmx, ovf, ova, libvirt, xl, hyperv or disk
    platform: str
    outdir: str
    definition: str
    machine: dict[str, Any]
    disks: list[ConvertedDisk] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    checklist: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    conversion: Any = None  # drivers.guest.Conversion


def guess_boot(path: str, fmt: str | None) -> tuple[str, str | None]:
    """(firmware, OS family) a bare disk's partition table suggests: an EFI system
    partition means UEFI; Linux or Windows partition types name the OS."""
    from formats import partitions

    try:
        with formats.open(path, fmt, allow_backing=False) as img:
            table = partitions.read_table(img)
    except formats.FormatError as exc:
        log.debug("%s: no partition table read: %s", path, exc)
        return "bios", None
    if table is None:
        return "bios", None
    types = {p.type.upper() if len(p.type) > 8 else p.type for p in table.partitions}
    firmware = "uefi" if types & ESP_TYPES else "bios"
    family = None
    if types & LINUX_TYPES:
        family = "linux"
    elif types & WINDOWS_TYPES:
        family = "windows"
    return firmware, family


def _bare_disk(req: V2VRequest) -> MachineSpec:
    path = os.path.abspath(req.source)
    fmt = formats.normalize_format(req.source_format) if req.source_format else formats.probe(path)
    firmware, family = guess_boot(path, fmt)
    stem = os.path.splitext(os.path.basename(path))[0] or "vm"
    spec = MachineSpec(
        name=req.name or stem,
        cpus=req.cpus or 1,
        memory=req.memory or DEFAULT_MEMORY,
        firmware=req.firmware or firmware,
        disks=[DiskSpec(path, fmt)],
        nics=[NicSpec()],  # one NIC: a VM without a network is rarely what anyone wants
        os=req.os or family,
    )
    spec.warnings.append(
        f"a bare disk: {spec.cpus} CPU(s), {spec.memory >> 20} MiB, {spec.firmware} "
        f"({'from the partition table' if not req.firmware else 'as asked'}); "
        "pass --cpus, --memory, --firmware to change them"
    )
    return spec


def _overrides(spec: MachineSpec, req: V2VRequest) -> MachineSpec:
    changes: dict[str, Any] = {}
    for key in ("name", "cpus", "memory", "firmware", "os"):
        value = getattr(req, key)
        if value is not None:
            changes[key] = value
    if changes.get("firmware") == "bios":
        changes["secure_boot"] = False
    return spec.replace(**changes) if changes else spec


def read_source(req: V2VRequest, staging: str) -> tuple[MachineSpec, str]:
    """The source machine and its kind; an .ova is verified and unpacked into `staging`."""
    kind = readers.kind_of(req.source)
    if kind is None:
        return _bare_disk(req), "disk"
    if kind in ("ova", "ovf"):
        # through unpack, so every disk is checked against the manifest as it is read
        from formats.ovf import unpack

        res = unpack(req.source, staging)
        machine = dict(res.machine)
        machine["disks"] = [
            dict(d, path=d.get("output") or d.get("path")) for d in machine["disks"]
        ]
        spec = readers.machine_from_ovf(machine, staging, req.source)
        spec.warnings += [w for w in res.warnings if w not in spec.warnings]
        return _overrides(spec, req), kind
    return _overrides(drivers.read_definition(req.source), req), kind


def _check_disks(spec: MachineSpec, source: str) -> None:
    if not spec.disks:
        raise DriverError(f"{source}: the machine has no disks")
    for d in spec.disks:
        if not d.path or not os.path.isfile(d.path):
            raise DriverError(f"{source}: disk file {d.path} is missing")


def _convert_disk(
    path: str,
    fmt: str | None,
    output: str,
    target: drivers.DiskTarget,
    options: dict[str, str],
    req: V2VRequest,
    progress: Progress | None,
) -> ConvertedDisk:
    t0 = time.monotonic()
    base = os.path.dirname(os.path.abspath(path))
    with formats.open(path, fmt, backing_dirs=(base,)) as src:
        size = target.size_for(src.size)
        if size == src.size:
            stats = convert(
                src, output, target.format, options=options, force=req.force,
                progress=progress, workers=req.workers,
            )  # fmt: skip
        else:
            # the platform wants a rounded size (Azure: whole MiB); the tail reads as zeros
            with atomic_create(
                output, target.format, size, force=req.force, sources=tuple(src.files()), **options
            ) as dst:
                stats = convert_image(src, dst, progress=progress, workers=req.workers)
        return ConvertedDisk(
            source=path,
            source_format=src.format,
            output=output,
            format=target.format,
            virtual_size=size,
            bytes_written=stats.bytes_written,
            seconds=time.monotonic() - t0,
        )


def run_v2v(req: V2VRequest, progress: Progress | None = None) -> V2VResult:
    t0 = time.monotonic()
    platform = drivers.get_platform(req.platform)
    out_format = formats.normalize_format(req.out_format) if req.out_format else None
    target = platform.disk_target(out_format)
    parent = os.path.dirname(os.path.abspath(req.outdir))
    if not os.path.isdir(parent):
        raise DriverError(f"{req.outdir}: directory {parent} does not exist")
    os.makedirs(req.outdir, exist_ok=True)
    outdir = os.path.abspath(req.outdir)
    staging = tempfile.mkdtemp(prefix=".p2v-v2v-", dir=outdir)
    created: list[str] = []
    try:
        source, kind = read_source(req, staging)
        _check_disks(source, req.source)
        adapted = platform.adapt(source, bus=req.bus, nic_model=req.nic_model, network=req.network)
        spec = adapted.spec
        warnings = list(source.warnings)
        stem = platform.stem(spec)
        disks: list[ConvertedDisk] = []
        new_disks = []
        for i, d in enumerate(spec.disks, 1):
            output = os.path.join(outdir, f"{stem}-disk{i}.{target.extension}")
            options = platform.disk_options(target, d)
            done = _convert_disk(d.path or "", None, output, target, options, req, progress)
            created.append(output)
            if d.format and done.source_format != d.format:
                warnings.append(
                    f"disk {i}: the definition says {d.format}, the file is {done.source_format}"
                )
            disks.append(done)
            new_disks.append(
                DiskSpec(os.path.basename(output), target.format, d.bus, done.virtual_size)
            )
        final = spec.replace(disks=new_disks)
        definition = platform.write(final, outdir)
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    conversion = None
    if req.convert_guest:
        # after the definition: a conversion that fails leaves the disks as converted
        # above (it commits nothing), and they stay for convert-guest to try again
        from drivers.guest import convert_machine  # libguestfs: loaded only to convert

        conversion = convert_machine(final, platform.name, outdir)
    return V2VResult(
        source=req.source,
        source_kind=kind,
        platform=platform.name,
        outdir=req.outdir,
        definition=definition,
        machine=final.to_dict(),
        disks=disks,
        changes=adapted.changes,
        checklist=platform.checklist(source, final),
        warnings=warnings,
        seconds=time.monotonic() - t0,
        conversion=conversion,
    )


def run_v2lxc(req: V2VRequest) -> ContainerResult:
    """`p2v v2v --to lxc`: the source machine's Linux guest as an LXC container in OUTDIR
    (rootfs tarball and configuration); `req.network` names the bridge."""
    from drivers.guest import lxc

    os.makedirs(req.outdir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".p2v-v2v-", dir=os.path.abspath(req.outdir))
    try:
        source, _ = read_source(req, staging)
        _check_disks(source, req.source)
        spec = source.replace(name=lxc.container_name(source.name))
        result = lxc.make_container(
            [d.path or "" for d in spec.disks],
            spec,
            req.outdir,
            fmts=[d.format for d in spec.disks],
            bridge=req.network or lxc.DEFAULT_BRIDGE,
            force=req.force,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.warnings = [*source.warnings, *result.warnings]
    return result

"""Inspecting a machine's guest OS and converting it for a platform's virtual hardware,
through libguestfs (an appliance VM that runs the guest's own tools in the guest's root).

    appliance    the libguestfs handle: drives, launch (KVM or TCG, no network), mount,
                 capped reads, commands in the guest (the API drivers/guest/lxc.py uses)
    inspection   what is on the disks: OS, mounts, kernels and their drivers, boot loader,
                 initramfs tool, network configuration, hypervisor tools, SELinux
    linux        the conversion of a Linux guest, step by step, using
    devices      device names -> UUID= (fstab, crypttab, resume=, root=)
    bootloader   GRUB configuration remapped and regenerated, the UEFI fallback loader
    initramfs    initramfs-tools, dracut, mkinitrd with the target's drivers
    network      ifupdown, netplan, networkd, NetworkManager, ifcfg, udev rules
    tools        hypervisor tools removed, qemu-guest-agent enabled
    overlay      convert on qcow2 overlays, commit only on success
    volumes      the host-side check that any volume could hold an OS (no appliance)
    report       every change, as conversion.json and a summary

Windows guests are recognised and refused (not converted yet). Entry points:
`inspect_images` and `convert_images`; the platform's `guest_hardware` (drivers/) says
what the guest must be converted for, so the definition and the conversion agree.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..machine import DiskSpec, MachineSpec, NicSpec
from .appliance import NO_OS, Appliance
from .errors import GuestError
from .inspection import Inspection, inspect_guest
from .report import Change, Report, write_report

__all__ = [
    "Conversion",
    "GuestError",
    "Inspection",
    "convert_images",
    "convert_machine",
    "inspect_images",
]


@dataclass
class Conversion:
    """What `p2v convert-guest` (and clone/v2v's conversion step) did to a machine."""

    images: list[str]
    platform: str
    inspection: Inspection | None
    #: False: the disks held nothing to convert (no OS found, Windows) and are untouched
    converted: bool = True
    disk_drivers: list[str] = field(default_factory=list)
    nic_drivers: list[str] = field(default_factory=list)
    interface_names: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: step -> seconds (appliance, inspect, each conversion step, commit, total)
    seconds: dict[str, float] = field(default_factory=dict)
    accelerator: str = ""
    report: str | None = None

    def summary(self) -> list[str]:
        r = Report(self.platform, self.changes, self.warnings)
        return r.summary()


def _formats(images: Sequence[str], fmts: Sequence[str | None] | None) -> list[str]:
    from .overlay import image_format

    given = list(fmts) if fmts is not None else [None] * len(images)
    if len(given) != len(images):
        raise GuestError("open", "one format per image is needed")
    for path in images:
        if not os.path.isfile(path):
            raise GuestError("open", f"{path}: no such image file")
    return [image_format(p, f) for p, f in zip(images, given)]


def _precheck(images: Sequence[str], fmts: list[str]) -> None:
    from .volumes import may_hold_an_os

    if not may_hold_an_os(list(images), fmts):
        raise GuestError("inspect", NO_OS)


def inspect_images(images: Sequence[str], fmts: Sequence[str | None] | None = None) -> Inspection:
    """Inspect one machine's disk images (read-only: nothing is written to them)."""
    found_fmts = _formats(images, fmts)
    _precheck(images, found_fmts)
    with Appliance(list(zip(images, found_fmts)), readonly=True) as app:
        return inspect_guest(app, list(images))


def guest_spec(images: Sequence[str], fmts: Sequence[str], nics: int = 1) -> MachineSpec:
    """The machine convert-guest assumes when no definition is given: the images as disks,
    `nics` NICs, buses and models the platform's choice for Linux."""
    return MachineSpec(
        name="guest",
        cpus=1,
        memory=1 << 30,
        disks=[DiskSpec(p, f) for p, f in zip(images, fmts)],
        nics=[NicSpec(None) for _ in range(nics)],
        os="linux",
    )


def convert_images(
    images: Sequence[str],
    platform: str,
    *,
    spec: MachineSpec | None = None,
    fmts: Sequence[str | None] | None = None,
    report_dir: str | None = None,
    strict: bool = True,
) -> Conversion:
    """Convert the guest on `images` (one machine's disks, in order) for `platform`'s
    hardware as `spec` (the definition written for it) describes it. The images change
    only if every step succeeds; the report goes to `report_dir` as conversion.json.
    Not `strict`: disks with no OS, or one not converted yet (Windows), are left as they
    are with a warning instead of an error."""
    import drivers

    from . import overlay
    from .linux import convert_linux

    total = time.monotonic()
    target = drivers.get_platform(platform)
    found_fmts = _formats(images, fmts)
    spec = spec or guest_spec(images, found_fmts)
    hardware = target.guest_hardware(spec)
    try:
        _precheck(images, found_fmts)
    except GuestError as exc:
        if strict:
            raise
        return Conversion(list(images), target.name, None, False, warnings=[str(exc)])
    report = Report(target.name)
    seconds: dict[str, float] = {}
    workdir = os.path.dirname(os.path.abspath(images[0]))
    with tempfile.TemporaryDirectory(prefix=".p2v-guest-", dir=workdir) as tmp:
        overlays = [overlay.create(p, f, tmp) for p, f in zip(images, found_fmts)]
        start = time.monotonic()
        app = Appliance([(o, "qcow2") for o in overlays], readonly=False)
        app.launch()
        skipped: Conversion | None = None
        try:
            seconds["appliance"] = round(time.monotonic() - start, 2)
            start = time.monotonic()
            found = None
            try:
                found = inspect_guest(app, list(images))
            except GuestError as exc:
                if strict or exc.step != "inspect" or NO_OS not in str(exc):
                    raise
                skipped = Conversion(list(images), target.name, None, False, warnings=[str(exc)])
            seconds["inspect"] = round(time.monotonic() - start, 2)
            if found is not None and not found.convertible:
                name = found.product_name or found.os_family
                if strict:
                    raise GuestError("inspect", f"{name}: {found.note}")
                note = f"{name}: {found.note}"
                skipped = Conversion(list(images), target.name, found, False, warnings=[note])
            if skipped is None and found is not None:
                macs = [n.mac for n in target.complete(spec).nics]
                convert_linux(app, found, target.name, hardware, macs, report, seconds)
        except BaseException:
            # the appliance may be what failed: its shutdown must not hide the step's error
            with contextlib.suppress(Exception):
                app.close()
            raise
        app.close()  # flushes the guest's writes: a failure here commits nothing
        if skipped is not None or found is None:
            return skipped or Conversion(list(images), target.name, None, False)
        start = time.monotonic()
        for o, p, f in zip(overlays, images, found_fmts):
            overlay.commit(o, p, f)
        seconds["commit"] = round(time.monotonic() - start, 2)
    seconds["total"] = round(time.monotonic() - total, 2)
    result = Conversion(
        images=list(images),
        platform=target.name,
        inspection=found,
        disk_drivers=list(hardware.disk_drivers),
        nic_drivers=list(hardware.nic_drivers),
        interface_names=list(hardware.interface_names),
        changes=report.changes,
        warnings=report.warnings,
        seconds=seconds,
        accelerator=app.accel,
    )
    directory = report_dir or workdir
    result.report = os.path.join(directory, "conversion.json")
    write_report(asdict(result), directory)
    return result


def convert_machine(spec: MachineSpec, platform: str, outdir: str) -> Conversion:
    """clone's and v2v's conversion step: the guest on the disks of `spec` (paths relative
    to `outdir`, as the definition names them) converted for the definition `platform`
    writes from `spec`. A machine known to run Windows or another OS, or whose disks hold
    no OS, is left as it is, with a warning."""
    import drivers

    target = drivers.get_platform(platform)
    full = target.complete(spec)
    images = [os.path.join(outdir, d.path or "") for d in full.disks]
    if full.os in ("windows", "other"):
        note = (
            "converting Windows is not supported yet"
            if full.os == "windows"
            else "not a Linux guest"
        )
        return Conversion(
            images, target.name, None, False, warnings=[f"guest not converted: {note}"]
        )
    fmts = [d.format for d in full.disks]
    return convert_images(images, platform, spec=full, fmts=fmts, report_dir=outdir, strict=False)

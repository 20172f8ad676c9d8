"""What is on a machine's disks: libguestfs's inspection (OS, distribution, mounts,
packages) completed by reading the guest's own files (kernels and their drivers, boot
loader, initramfs tool, network configuration, hypervisor tools, SELinux).

Every file is read through the appliance with a size cap; nothing here writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from . import bootloader, network, tools
from .appliance import Appliance
from .errors import GuestError

#: the drivers `p2v inspect` reports per kernel: every platform's disk and NIC
DRIVERS = (
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "nvme",
    "hv_storvsc",
    "hv_netvsc",
    "vmw_pvscsi",
    "vmxnet3",
    "xen_blkfront",
    "xen_netfront",
    "ena",
)
#: a kernel's modules.builtin and module tree are read up to this size / count
MAX_MODULE_LIST = 4 << 20
_KVER = re.compile(r"^[0-9][A-Za-z0-9._+~-]{0,127}$")
_MODULE_FILE = re.compile(r"([^/]+)\.ko(?:\.(?:xz|zst|gz))?$")

WINDOWS_NOTE = "converting Windows is not supported yet"


@dataclass
class Kernel:
    version: str
    image: str | None
    initrd: str | None
    #: every known driver this kernel has, built in or as a module (module names)
    drivers: list[str] = field(default_factory=list)
    #: every module name the kernel has (set after creation: not part of the report)
    modules: ClassVar[frozenset[str]] = frozenset()

    def has(self, driver: str) -> bool:
        return driver.replace("-", "_") in self.modules


@dataclass
class Mount:
    mountpoint: str
    device: str
    fstype: str | None = None


@dataclass
class Inspection:
    """One machine's guest OS as `p2v inspect` reports it."""

    images: list[str]
    os_family: str
    distribution: str | None = None
    version: str | None = None
    architecture: str | None = None
    product_name: str | None = None
    hostname: str | None = None
    root: str | None = None
    package_format: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    logical_volumes: list[str] = field(default_factory=list)
    bootloader: str | None = None
    firmware: str | None = None
    default_kernel: str | None = None
    kernels: list[Kernel] = field(default_factory=list)
    initramfs_tool: str | None = None
    network: list[network.NetworkConfig] = field(default_factory=list)
    hypervisor_tools: list[str] = field(default_factory=list)
    selinux: str | None = None
    convertible: bool = True
    note: str | None = None
    warnings: list[str] = field(default_factory=list)

    def kernel(self, version: str | None) -> Kernel | None:
        return next((k for k in self.kernels if k.version == version), None)


def inspect_guest(app: Appliance, images: list[str]) -> Inspection:
    """Inspect the launched appliance's guest and mount its filesystems (read-only when
    the appliance is): the conversion goes on from this state."""
    g = app.g
    root = app.inspect()
    kind = g.inspect_get_type(root)
    found = Inspection(
        images=images,
        os_family=kind,
        distribution=_known(g.inspect_get_distro(root)),
        version=f"{g.inspect_get_major_version(root)}.{g.inspect_get_minor_version(root)}",
        architecture=_known(g.inspect_get_arch(root)),
        product_name=_known(g.inspect_get_product_name(root)),
        hostname=_known(g.inspect_get_hostname(root)),
        root=root,
        package_format=_known(g.inspect_get_package_format(root)),
    )
    if kind == "windows":
        found.convertible = False
        found.note = WINDOWS_NOTE
        return found
    if kind != "linux":
        found.convertible = False
        found.note = f"converting {kind} guests is not supported"
        return found
    for mp, dev in app.mount(root):
        found.mounts.append(Mount(mp, dev, _fstype(app, dev)))
    found.logical_volumes = list(g.lvs())
    found.kernels = _kernels(app)
    if not found.kernels:
        raise GuestError("inspect", "the guest has no kernel in /lib/modules and /boot")
    found.firmware, found.bootloader = bootloader.detect(app)
    found.default_kernel = bootloader.default_kernel(app, [k.version for k in found.kernels])
    found.initramfs_tool = _initramfs_tool(app)
    found.network = network.inspect(app)
    found.hypervisor_tools = tools.installed(app, root)
    found.selinux = _selinux(app)
    return found


def _fstype(app: Appliance, dev: str) -> str | None:
    if dev.startswith("btrfsvol:"):
        return "btrfs"
    try:
        return str(app.g.vfs_type(dev)) or None
    except RuntimeError:
        return None


def _known(value: str) -> str | None:
    return None if value in ("unknown", "") else value


def _kernels(app: Appliance) -> list[Kernel]:
    """Every kernel with both a module tree and an image in /boot, oldest first."""
    kernels = []
    for version in app.listdir("/lib/modules", limit=256):
        if not _KVER.match(version):
            continue
        image = next(
            (p for p in (f"/boot/vmlinuz-{version}", f"/boot/vmlinux-{version}") if app.exists(p)),
            None,
        )
        if image is None:
            continue
        initrd = next(
            (
                p
                for p in (
                    f"/boot/initrd.img-{version}",
                    f"/boot/initramfs-{version}.img",
                    f"/boot/initrd-{version}",
                )
                if app.exists(p)
            ),
            None,
        )
        modules = _modules(app, version)
        drivers = [d for d in DRIVERS if d in modules]
        kernel = Kernel(version, image, initrd, drivers)
        kernel.modules = frozenset(modules)  # type: ignore[misc]
        kernels.append(kernel)
    return sorted(kernels, key=lambda k: _version_key(k.version))


def _modules(app: Appliance, version: str) -> set[str]:
    """Module names (dashes as underscores) built into or shipped with a kernel."""
    names: set[str] = set()
    base = f"/lib/modules/{version}"
    builtin = f"{base}/modules.builtin"
    if app.exists(builtin):
        for line in app.read_text(builtin, MAX_MODULE_LIST, step="inspect").splitlines():
            m = _MODULE_FILE.search(line.strip())
            if m:
                names.add(m.group(1).replace("-", "_"))
    # modules.dep lists every module file; walking the tree is the fallback
    dep = f"{base}/modules.dep"
    if app.exists(dep):
        text = app.read_text(dep, MAX_MODULE_LIST, step="inspect")
        paths = (line.split(":", 1)[0] for line in text.splitlines())
    else:
        paths = iter(app.g.find(f"{base}/kernel") if app.exists(f"{base}/kernel") else [])
    for path in paths:
        m = _MODULE_FILE.search(path)
        if m:
            names.add(m.group(1).replace("-", "_"))
    return names


def _version_key(version: str) -> list[tuple[int, object]]:
    """Order kernel versions as `sort -V` does closely enough: numbers as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


def _initramfs_tool(app: Appliance) -> str | None:
    for tool, paths in (
        ("initramfs-tools", ("/usr/sbin/update-initramfs", "/sbin/update-initramfs")),
        ("dracut", ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut")),
        ("mkinitrd", ("/sbin/mkinitrd", "/usr/sbin/mkinitrd")),
    ):
        if any(app.exists(p) for p in paths):
            return tool
    return None


def _selinux(app: Appliance) -> str | None:
    if not app.exists("/etc/selinux/config"):
        return None
    for line in app.read_text("/etc/selinux/config", step="inspect").splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "SELINUX":
            return value.strip().strip("\"'").lower() or None
    return None

"""A machine's Linux guest as an LXC container: its root filesystem as a rootfs tarball
and an LXC configuration (the physical-to-container move Proxmox users make by hand with
rsync).

The guest is read through the libguestfs appliance, on qcow2 overlays of the images (the
images are never written): its filesystems are mounted as its fstab mounts them, what a
container must not carry is edited or left out on the overlays, and libguestfs's tar_out
writes the tree with numeric owners, xattrs and ACLs (device nodes are tar members like
any file). Left out: /boot and the kernels' module trees (the container runs on the
host's kernel). Edited: /etc/fstab loses the mounts of the machine's own disks (their
files are in the tarball now) and its swap; MAC-bound interface naming (udev's
persistent-net rules, systemd .link files) goes, and the interfaces are renamed to the
container's eth0, eth1, ... in every configuration that named them.

The configuration puts each NIC on a veth in a bridge (default lxcbr0), and carries the
machine description's memory and CPU count over as cgroup limits.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..machine import MachineSpec
from . import network, overlay
from .appliance import Appliance
from .errors import GuestError
from .inspection import Inspection, inspect_guest
from .report import Change, Report

DEFAULT_BRIDGE = "lxcbr0"
DEFAULT_LXC_PATH = "/var/lib/lxc"
#: what the tarball leaves out (tar --exclude patterns, relative to the root: ./boot/...)
EXCLUDES = ("./boot/*", "./lib/modules/*", "./usr/lib/modules/*")
#: what every container needs (mounts, devices, capabilities); the lxc package ships it
#: (the per-distribution files come with lxc-templates, which a host may not have)
COMMON_CONF = "/usr/share/lxc/config/common.conf"
_ARCH = {"x86_64": "amd64", "i386": "i386", "i686": "i386", "aarch64": "arm64"}
#: a container's name: LXC uses it as a directory name and in cgroup paths
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: fstab entries that name a block device: the machine's disks, whose files are in the tarball
_BLOCK_SPEC = re.compile(r"^(?:UUID|LABEL|PARTUUID|PARTLABEL)=|^/dev/")
CFS_PERIOD = 100_000  # microseconds; the cgroup default


@dataclass
class ContainerResult:
    """What `p2v v2v --to lxc` / `p2v convert-guest --to lxc` made."""

    name: str
    images: list[str]
    rootfs: str  # the rootfs tarball
    config: str  # the LXC configuration
    rootfs_path: str  # where the configuration expects the tarball extracted
    bridge: str
    cgroup: str  # v1 or v2: the keys the limits are written with
    cpus: int
    memory: int
    distribution: str | None = None
    version: str | None = None
    excluded: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def host_cgroup() -> str:
    """v2 when this host's memory controller is on the unified hierarchy, else v1."""
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            return "v2" if "memory" in f.read().split() else "v1"
    except OSError:
        return "v1"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise GuestError(
            "container", f"{name!r} is not a container name (letters, digits, '.', '_', '-')"
        )
    return name


def container_name(name: str) -> str:
    """A machine's name made fit for LXC (a VM's may hold spaces): other characters
    become '-'."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "").strip("-._")[:63]
    return clean or "container"


def fstab_for_container(text: str, own: set[str]) -> tuple[str, list[str]]:
    """/etc/fstab without the machine's own filesystems and swap: lines naming a block
    device, or mounting a mountpoint the guest's disks provide (`own`). Network, tmpfs
    and bind mounts stay. Returns the text and what was dropped."""
    kept, dropped = [], []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            kept.append(line)
            continue
        spec, mountpoint, fstype = fields[0], fields[1], fields[2]
        if _BLOCK_SPEC.match(spec) or mountpoint in own or fstype == "swap":
            dropped.append(f"dropped the mount of {spec} on {mountpoint} ({fstype})")
            kept.append(f"# {line}" if line.endswith("\n") else f"# {line}\n")
            continue
        kept.append(line)
    return "".join(kept), dropped


def config_text(
    spec: MachineSpec,
    found: Inspection,
    *,
    rootfs_path: str,
    bridge: str,
    cgroup: str,
    hwaddrs: Sequence[str],
) -> str:
    """The LXC configuration (lxc.container.conf(5)) for the container."""
    what = " ".join(w for w in (found.distribution, found.version) if w) or "Linux"
    lines = [
        f"# made by p2v from {', '.join(os.path.basename(i) for i in found.images)} ({what})",
        f"lxc.include = {COMMON_CONF}",
    ]
    arch = _ARCH.get(found.architecture or "")
    if arch:
        lines.append(f"lxc.arch = {arch}")
    lines += [
        # the machine's own hostname (systemd would set it from /etc/hostname anyway)
        f"lxc.uts.name = {_hostname(found.hostname) or spec.name}",
        f"lxc.rootfs.path = dir:{rootfs_path}",
        f"# limits: the machine's {spec.cpus} CPU(s) and {spec.memory >> 20} MiB",
    ]
    quota = spec.cpus * CFS_PERIOD
    if cgroup == "v2":
        lines += [
            f"lxc.cgroup2.memory.max = {spec.memory}",
            f"lxc.cgroup2.cpu.max = {quota} {CFS_PERIOD}",
        ]
    else:
        lines += [
            f"lxc.cgroup.memory.limit_in_bytes = {spec.memory}",
            f"lxc.cgroup.cpu.cfs_period_us = {CFS_PERIOD}",
            f"lxc.cgroup.cpu.cfs_quota_us = {quota}",
        ]
    for i, mac in enumerate(hwaddrs):
        lines += [
            f"lxc.net.{i}.type = veth",
            f"lxc.net.{i}.link = {bridge}",
            f"lxc.net.{i}.flags = up",
            f"lxc.net.{i}.name = eth{i}",
            f"lxc.net.{i}.hwaddr = {mac}",
        ]
    return "\n".join(lines) + "\n"


def _hostname(name: str | None) -> str | None:
    """The guest's hostname when it is one (a hostile guest's is not written as is)."""
    if name and re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62})$", name):
        return name
    return None


def _hwaddr() -> str:
    # 00:16:3e is Xen's OUI, which LXC's own templates use for containers
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def _edit_fstab(app: Appliance, found: Inspection, report: Report) -> None:
    if not app.exists("/etc/fstab"):
        return
    text = app.read_text("/etc/fstab", step="fstab")
    own = {m.mountpoint for m in found.mounts}
    new, dropped = fstab_for_container(text, own)
    if dropped:
        app.write_text("/etc/fstab", new, step="fstab")
        report.file("/etc/fstab", dropped)


def _edit_network(app: Appliance, found: Inspection, nics: int, report: Report) -> None:
    """MAC-bound naming goes; the interfaces the configuration names become eth0..."""
    kept = []
    for c in found.network:
        if c.system == "udev" or (c.system == "systemd-networkd" and c.path.endswith(".link")):
            app.g.rm(c.path)  # a symlink goes itself, never what it names
            report.file(c.path, ["removed: it names interfaces by the physical NICs' MACs"])
        else:
            kept.append(c)
    source = network.physical_names(kept)
    names = [f"eth{i}" for i in range(max(nics, 1))]
    mapping = {old: new for old, new in zip(source, names) if old != new}
    if len(source) > len(names):
        report.warn(
            f"interfaces {', '.join(source[len(names) :])} have no veth in the container; "
            "left as they are"
        )
    r = network.Rename(mapping, set(), {}, names[0] if len(names) == 1 else None)
    network.convert(app, kept, r, report)


def make_container(
    images: Sequence[str],
    spec: MachineSpec,
    outdir: str,
    *,
    fmts: Sequence[str | None] | None = None,
    bridge: str = DEFAULT_BRIDGE,
    lxc_path: str = DEFAULT_LXC_PATH,
    cgroup: str | None = None,
    force: bool = False,
) -> ContainerResult:
    """Write OUTDIR/NAME.rootfs.tar and OUTDIR/NAME.config for the Linux guest on
    `images` (one machine's disks, in order), as `spec` describes the machine."""
    total = time.monotonic()
    name = check_name(spec.name)
    if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", bridge):
        raise GuestError("container", f"{bridge!r} is not a bridge name")
    cgroup = cgroup or host_cgroup()
    given = list(fmts) if fmts is not None else [None] * len(images)
    for path in images:
        if not os.path.isfile(path):
            raise GuestError("open", f"{path}: no such image file")
    found_fmts = [overlay.image_format(p, f) for p, f in zip(images, given)]
    os.makedirs(outdir, exist_ok=True)
    tarball = os.path.join(outdir, f"{name}.rootfs.tar")
    config = os.path.join(outdir, f"{name}.config")
    for path in (tarball, config):
        if os.path.exists(path) and not force:
            raise GuestError("container", f"{path} exists (--force to overwrite)")
    report = Report("lxc")
    seconds: dict[str, float] = {}
    partial = tarball + ".partial"
    try:
        with tempfile.TemporaryDirectory(prefix=".p2v-lxc-", dir=outdir) as tmp:
            overlays = [overlay.create(p, f, tmp) for p, f in zip(images, found_fmts)]
            start = time.monotonic()
            with Appliance([(o, "qcow2") for o in overlays], readonly=False) as app:
                seconds["appliance"] = round(time.monotonic() - start, 2)
                start = time.monotonic()
                found = inspect_guest(app, list(images))
                seconds["inspect"] = round(time.monotonic() - start, 2)
                if found.os_family != "linux":
                    what = found.product_name or found.os_family
                    raise GuestError("inspect", f"{what}: only a Linux guest becomes a container")
                start = time.monotonic()
                _edit_fstab(app, found, report)
                _edit_network(app, found, len(spec.nics), report)
                seconds["edit"] = round(time.monotonic() - start, 2)
                start = time.monotonic()
                app.g.tar_out(
                    "/", partial, numericowner=True, xattrs=True, acls=True, excludes=list(EXCLUDES)
                )
                seconds["tar"] = round(time.monotonic() - start, 2)
        rootfs_path = os.path.join(lxc_path, name, "rootfs")
        hwaddrs = [_hwaddr() for _ in range(max(len(spec.nics), 1))]
        text = config_text(
            spec, found, rootfs_path=rootfs_path, bridge=bridge, cgroup=cgroup, hwaddrs=hwaddrs
        )
        from formats.fileio import write_file_atomic

        write_file_atomic(config, text.encode())
        os.replace(partial, tarball)
    except RuntimeError as exc:  # libguestfs's own errors
        raise GuestError("container", str(exc).strip().splitlines()[-1]) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    seconds["total"] = round(time.monotonic() - total, 2)
    return ContainerResult(
        name=name,
        images=list(images),
        rootfs=tarball,
        config=config,
        rootfs_path=rootfs_path,
        bridge=bridge,
        cgroup=cgroup,
        cpus=spec.cpus,
        memory=spec.memory,
        distribution=found.distribution,
        version=found.version,
        excluded=[p[2:] for p in EXCLUDES],
        changes=report.changes,
        warnings=report.warnings,
        next_steps=[
            f"mkdir -p {rootfs_path}",
            f"tar --numeric-owner --xattrs --xattrs-include='*' --acls -xpf {tarball} "
            f"-C {rootfs_path}",
            f"cp {config} {os.path.join(lxc_path, name, 'config')}",
            f"lxc-start -n {name}",
        ],
        seconds=seconds,
    )


def container_from_images(
    images: Sequence[str],
    outdir: str | None = None,
    *,
    fmts: Sequence[str | None] | None = None,
    bridge: str = DEFAULT_BRIDGE,
    force: bool = False,
) -> ContainerResult:
    """`p2v convert-guest --to lxc`: images copied earlier, with no machine description:
    the container is named after the first image, with convert-guest's default machine
    (1 CPU, 1 GiB, one NIC), written beside the images unless `outdir` is given."""
    from . import guest_spec

    if not images:
        raise GuestError("open", "no disk image given")
    stem = os.path.splitext(os.path.basename(images[0]))[0]
    spec = guest_spec(images, [f or "raw" for f in (fmts or [None] * len(images))])
    spec = spec.replace(name=container_name(stem))
    where = outdir or os.path.dirname(os.path.abspath(images[0]))
    return make_container(images, spec, where, fmts=fmts, bridge=bridge, force=force)

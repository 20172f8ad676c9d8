"""Hypervisor guest tools: which are installed, and removing the ones that belong to the
platform the guest leaves (with the guest's own package manager, inside the guest, with
no network: `dpkg --purge`, `rpm -e`; the VMware Tools and VirtualBox additions tarballs
through their own uninstallers), as virt-v2v does. An installed qemu-guest-agent is
enabled for KVM."""

from __future__ import annotations

from .appliance import Appliance
from .report import Report

#: platform -> the packages of its guest tools (Debian and RPM names)
PACKAGES = {
    "vmware": (
        "open-vm-tools", "open-vm-tools-desktop", "open-vm-tools-sdmp", "open-vm-tools-dev",
        "open-vm-tools-containerinfo", "open-vm-tools-salt-minion",
    ),
    "hyperv": (
        "hyperv-daemons", "hyperv-daemons-license", "hypervkvpd", "hypervvssd",
        "hypervfcopyd", "hyperv-tools",
    ),
    "xen": ("xe-guest-utilities", "xe-guest-utilities-xenstore", "xenstore-utils"),
    "virtualbox": (
        "virtualbox-guest-utils", "virtualbox-guest-x11", "virtualbox-guest-dkms",
        "virtualbox-guest-additions", "VirtualBox-guest-additions",
    ),
    "kvm": ("qemu-guest-agent",),
}  # fmt: skip
#: the platform family each target platform's tools belong to
FAMILY = {"vsphere": "vmware", "azure": "hyperv", "aws": "xen"}
#: installers that are not packages: (platform, how the inspection names it, uninstaller)
TARBALLS = (
    ("vmware", "vmware-tools (tarball)", "/usr/bin/vmware-uninstall-tools.pl"),
    ("virtualbox", "VirtualBox additions (tarball)", "/opt/VBoxGuestAdditions-*/uninstall.sh"),
)


def installed(app: Appliance, root: str) -> list[str]:
    """The hypervisor tools installed in the guest: package names, and the tarballs."""
    fmt = app.g.inspect_get_package_format(root)
    wanted = [p for pkgs in PACKAGES.values() for p in pkgs]
    if fmt == "rpm":
        # one query for all: every command in the appliance costs seconds under TCG
        names = set(app.run(["rpm", "-qa", "--qf", "%{NAME}\\n"], step="inspect").split())
        found = [p for p in wanted if p in names]
    elif fmt == "deb":
        listed = _dpkg_lists(app)
        found = [p for p in wanted if p in listed]
    else:
        found = []
    for _, name, path in TARBALLS:
        if app.g.glob_expand(path):
            found.append(name)
    return found


def _dpkg_lists(app: Appliance) -> set[str]:
    """Packages dpkg has unpacked: it keeps a file list for each (a removed one keeps
    none), all read in one call instead of one round trip per package."""
    try:
        paths = app.g.glob_expand("/var/lib/dpkg/info/*.list")
    except RuntimeError:  # more names than libguestfs's message limit: a hostile guest
        return set()
    names = (p.rsplit("/", 1)[-1][: -len(".list")] for p in paths)
    return {n.split(":", 1)[0] for n in names}


def convert(
    app: Appliance, platform: str, found: list[str], package_format: str | None, report: Report
) -> None:
    """Remove the tools of every other platform; enable qemu-guest-agent for KVM."""
    keep = FAMILY.get(platform, platform)
    doomed = [
        p for fam, pkgs in PACKAGES.items() if fam not in (keep, "kvm") for p in pkgs if p in found
    ]
    if doomed:
        argv = ["rpm", "-e", *doomed] if package_format == "rpm" else ["dpkg", "--purge", *doomed]
        report.command(argv, app.run(argv, step="remove-tools"))
        for p in doomed:
            report.package(p, "removed")
    for fam, name, pattern in TARBALLS:
        if fam == keep or name not in found:
            continue
        for script in app.g.glob_expand(pattern):
            argv = (
                ["/usr/bin/perl", script, "--default"]
                if script.endswith(".pl")
                else ["/bin/sh", script]
            )
            report.command(argv, app.run(argv, step="remove-tools"))
            report.package(name, f"removed by {script}")
    if platform == "kvm" and "qemu-guest-agent" in found:
        # Debian's unit has no [Install] section (udev starts it when the port appears):
        # systemctl says so, which is not a failure
        argv = ["systemctl", "enable", "qemu-guest-agent"]
        try:
            report.command(argv, app.run(argv, step="guest-agent"))
        except Exception as exc:  # a guest without systemd: the agent is started otherwise
            report.warn(f"qemu-guest-agent not enabled: {exc}")

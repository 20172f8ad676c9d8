"""Rebuilding a kernel's initramfs with the target's disk and NIC drivers, by the guest's
own tool inside the guest: initramfs-tools (the drivers listed in
/etc/initramfs-tools/modules, which every MODULES= mode includes), dracut (add_drivers in
a dracut.conf.d file, so later kernel updates keep them; the host-only command line is
left out, as it would name the appliance's root), or RHEL's mkinitrd (--with=).

Each rebuilt image is listed afterwards (lsinitramfs / lsinitrd in the guest) and must
hold every driver that is a module of that kernel."""

from __future__ import annotations

import shlex
import time

from .appliance import Appliance
from .errors import GuestError
from .inspection import Kernel
from .report import Report

MODULES_FILE = "/etc/initramfs-tools/modules"
DRACUT_CONF = "/etc/dracut.conf.d/60-p2v.conf"


def add_modules(text: str, drivers: tuple[str, ...], platform: str) -> tuple[str, list[str]]:
    """/etc/initramfs-tools/modules with the drivers it lacks appended."""
    listed = {
        line.split()[0].replace("-", "_")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    missing = [d for d in drivers if d.replace("-", "_") not in listed]
    if not missing:
        return text, []
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"# added by p2v: the {platform} disk and NIC drivers\n" + "".join(
        f"{d}\n" for d in missing
    )
    return text, [f"added {' '.join(missing)}"]


def _configure(
    app: Appliance, tool: str, drivers: tuple[str, ...], platform: str, report: Report
) -> None:
    if tool == "initramfs-tools":
        old = app.read_text(MODULES_FILE, step="initramfs") if app.exists(MODULES_FILE) else ""
        new, changes = add_modules(old, drivers, platform)
        if changes:
            app.write_text(MODULES_FILE, new, step="initramfs")
            report.file(MODULES_FILE, changes)
    elif tool == "dracut":
        app.g.mkdir_p("/etc/dracut.conf.d")
        app.write_text(
            DRACUT_CONF,
            f'# added by p2v: the {platform} disk and NIC drivers\nadd_drivers+=" {" ".join(drivers)} "\n',
            step="initramfs",
        )
        report.file(DRACUT_CONF, [f"add_drivers+= {' '.join(drivers)}"])


def _rebuild(kernel: Kernel, tool: str, drivers: tuple[str, ...]) -> list[str]:
    v = kernel.version
    if tool == "initramfs-tools":
        return ["update-initramfs", "-u" if kernel.initrd else "-c", "-k", v]
    initrd = kernel.initrd or f"/boot/initramfs-{v}.img"
    if tool == "dracut":
        return ["dracut", "-f", "--no-hostonly-cmdline", initrd, v]
    return ["mkinitrd", "-f", *(f"--with={d}" for d in drivers), initrd, v]


def _lister(tool: str, kernel: Kernel) -> list[str]:
    initrd = kernel.initrd or f"/boot/initramfs-{kernel.version}.img"
    return ["lsinitramfs", initrd] if tool == "initramfs-tools" else ["lsinitrd", initrd]


#: separates the rebuild's output from the listing in one command's output
_MARK = "--- p2v: initramfs listing ---"


def _rebuild_and_list(app: Appliance, rebuild: list[str], lister: list[str]) -> tuple[str, str]:
    """Rebuild, then list the new image, in one appliance command (each one costs seconds
    of mounts under TCG)."""
    script = f"{shlex.join(rebuild)} && echo '{_MARK}' && {shlex.join(lister)}"
    label = f"{shlex.join(rebuild)}, then {shlex.join(lister)}"
    out = app.run(["/bin/sh", "-c", script], step="initramfs", label=label)
    built, _, listing = out.partition(_MARK)
    return built, listing


def contains(listing: str, driver: str) -> bool:
    """Whether an initramfs listing holds the module file of `driver` (- and _ alike)."""
    want = driver.replace("-", "_")
    for line in listing.splitlines():
        name = line.rsplit("/", 1)[-1].split(".ko")[0]
        if ".ko" in line and name.replace("-", "_") == want:
            return True
    return False


def convert(
    app: Appliance,
    tool: str | None,
    kernels: list[Kernel],
    drivers: tuple[str, ...],
    platform: str,
    report: Report,
) -> None:
    """Rebuild the initramfs of every given kernel with `drivers` in it."""
    if tool is None:
        raise GuestError(
            "initramfs", "the guest has no initramfs tool (initramfs-tools, dracut, mkinitrd)"
        )
    _configure(app, tool, drivers, platform, report)
    for kernel in kernels:
        argv = _rebuild(kernel, tool, drivers)
        start = time.monotonic()
        if tool == "mkinitrd":  # RHEL 5's images have no lister in the guest
            report.command(argv, app.run(argv, step="initramfs"), time.monotonic() - start)
            continue
        out, listing = _rebuild_and_list(app, argv, _lister(tool, kernel))
        report.command(argv, out, time.monotonic() - start)
        builtin = _builtin(app, kernel)
        missing = [
            d for d in drivers if d.replace("-", "_") not in builtin and not contains(listing, d)
        ]
        if missing:
            raise GuestError(
                "initramfs", f"the rebuilt initramfs of {kernel.version} lacks {', '.join(missing)}"
            )


def _builtin(app: Appliance, kernel: Kernel) -> set[str]:
    path = f"/lib/modules/{kernel.version}/modules.builtin"
    if not app.exists(path):
        return set()
    return {
        line.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
        for line in app.read_text(path, 4 << 20, step="initramfs").splitlines()
    }

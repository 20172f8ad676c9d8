"""`p2v inspect` and `p2v convert-guest`: the guest OS on a machine's disk images, seen
and converted through libguestfs. The work is drivers.guest's."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from drivers.names import NAMES
from p2v.output import print_json

if TYPE_CHECKING:
    from drivers.guest import Conversion, Inspection


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe the guest OS on one machine's disk images (read-only)",
        description=(
            "Inspect the disk images of one machine (in disk order): OS and version, "
            "mounts, boot loader, kernels and the drivers each has, initramfs tool, network "
            "configuration, hypervisor tools, SELinux. Nothing is written to the images."
        ),
    )
    p.add_argument("-f", dest="fmt", help="format of every image (probed if omitted)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert-guest",
        help="convert the guest OS on copied disk images so it boots on a platform",
        description=(
            "Convert the guest on one machine's disk images (in disk order) for the target "
            "platform's virtual hardware: drivers in the initramfs, device names to UUIDs, "
            "network configuration for the new interface names, old hypervisor tools "
            "removed. The images change only if every step succeeds; conversion.json beside "
            "them records every change."
        ),
    )
    p.add_argument("--to", dest="platform", default="kvm", choices=(*NAMES, "lxc"),
                   help="target platform (default kvm); lxc: the guest as an LXC container")  # fmt: skip
    p.add_argument("-f", dest="fmt", help="format of every image (probed if omitted)")
    # --to lxc (drivers/guest/lxc.py): the images stay as they are
    p.add_argument("-o", dest="outdir", help="--to lxc: where the tarball and config go")
    p.add_argument("--bridge", default="lxcbr0", help="--to lxc: bridge for the veth (lxcbr0)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_convert_guest)


def cmd_inspect(args: argparse.Namespace) -> int:
    from drivers.guest import inspect_images

    found = inspect_images(args.images, [args.fmt] * len(args.images) if args.fmt else None)
    if args.output == "json":
        print_json(found)
    else:
        print_inspection(found)
    return 0


def cmd_convert_guest(args: argparse.Namespace) -> int:
    if args.platform == "lxc":
        return _convert_to_lxc(args)
    from drivers.guest import convert_images

    done = convert_images(
        args.images, args.platform, fmts=[args.fmt] * len(args.images) if args.fmt else None
    )
    if args.output == "json":
        print_json(done)
    else:
        print_conversion(done)
    return 0


def _convert_to_lxc(args: argparse.Namespace) -> int:
    from drivers.guest.lxc import container_from_images
    from p2v.commands.v2v import print_container

    fmts = [args.fmt] * len(args.images) if args.fmt else None
    made = container_from_images(args.images, args.outdir, fmts=fmts, bridge=args.bridge)
    if args.output == "json":
        print_json(made)
    else:
        print_container(made)
    return 0


def print_inspection(i: Inspection) -> None:
    name = i.product_name if i.os_family == "windows" else i.distribution
    print(f"{name or i.os_family} {i.version or ''} ({i.os_family}, {i.architecture})")
    if i.note:
        print(f"  {i.note}")
        return
    print(f"root: {i.root}")
    for m in i.mounts:
        print(f"  {m.mountpoint:<12} {m.device} ({m.fstype or '?'})")
    print(f"boot: {i.bootloader or 'unknown'} ({i.firmware}), default kernel {i.default_kernel}")
    for k in i.kernels:
        print(f"  kernel {k.version}: {', '.join(k.drivers) or 'none of the known drivers'}")
    print(f"initramfs: {i.initramfs_tool or 'none'}")
    for c in i.network:
        pins = f", bound to {', '.join(c.mac_pins)}" if c.mac_pins else ""
        print(f"network: {c.system} {c.path}: {', '.join(c.interfaces) or '-'}{pins}")
    print(f"hypervisor tools: {', '.join(i.hypervisor_tools) or 'none'}")
    print(f"SELinux: {i.selinux or 'absent'}")


def print_conversion(c: Conversion) -> None:
    if not c.converted:
        for w in c.warnings:
            print(f"guest: {w}")
        return
    print(f"guest converted for {c.platform} ({c.accelerator.upper()} appliance):")
    print(f"  drivers: {', '.join(dict.fromkeys(c.disk_drivers + c.nic_drivers))}")
    print(f"  interfaces: {', '.join(n or '?' for n in c.interface_names) or 'none'}")
    for line in c.summary():
        print(f"  - {line}")
    print(f"report: {c.report} ({c.seconds.get('total', 0):.0f} s)")
